"""A model cut down to the vocabulary its pack uses, with a tokenizer that still encodes any text.

    the pack's texts -> the base tokenizer's ids they use
    + every special token, every byte token, and the tokens of the first CORE_MERGES merges (BPE
      learns its merges most frequent first, so these are the general language's commonest pieces)
    + the parts each kept token is merged from, down to bytes (so every kept token stays reachable)
    -> a BPE tokenizer of just those tokens and the merges that make them; the embedding rows and
       output-head rows of those tokens, in the same order

SmolLM2's 49,152-word embedding and head are as large as about eight of its 30 layers, and the head
costs each decoded token as much. A domain uses a fraction of that vocabulary.

Why the trimmed tokenizer is exact on the pack's texts: byte-level BPE merges the lowest-ranked
applicable pair until none applies. Every merge that the full tokenizer applies to a kept text
produces a kept token (a final token or one of its parts), so it is kept; a kept merge the full
tokenizer did not apply at some step had a higher rank than the one it did, and loses again. So
the same merges apply in the same order: the same tokens, renumbered. A text outside the pack still
encodes, in more and smaller pieces (bytes at worst). The head's kept rows are unchanged, so where
the full model's greedy token is kept, the trimmed model chooses it too.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from vertical.errors import VerticalError

log = logging.getLogger(__name__)

CORE_MERGES = 8192  # the general core: tokens of the commonest merges, kept whatever the pack says
VOCABULARY_FILE = "vocabulary.json"  # the trimmed model's record: which token of the full vocabulary each id was


@dataclass(frozen=True)
class TrimmedVocabulary:
    kept: list[int]  # full-vocabulary id of each trimmed id, ascending
    full_size: int

    @property
    def size(self) -> int:
        return len(self.kept)


def kept_tokens(tokenizer_json: dict, used: Iterable[int], core_merges: int = CORE_MERGES) -> list[int]:
    """The full-vocabulary ids to keep: `used`, the special tokens, the byte tokens, the first
    `core_merges` merges' tokens, and every part they are merged from, ascending."""
    model = tokenizer_json["model"]
    if model.get("type") != "BPE":
        raise VerticalError(f"its tokenizer is {model.get('type')}, and only a BPE vocabulary can be cut")
    vocab: dict[str, int] = model["vocab"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    made_from: dict[str, tuple[str, str]] = {}
    for left, right in merges:
        made_from.setdefault(left + right, (left, right))  # the first merge that makes a token makes it
    by_id = {i: token for token, i in vocab.items()}
    keep = {by_id[i] for i in used if i in by_id}
    keep |= {token for token in vocab if token not in made_from}  # bytes and any token no merge makes
    keep |= {left + right for left, right in merges[:core_merges]}
    pending = list(keep)
    while pending:
        parts = made_from.get(pending.pop())
        for part in parts or ():
            if part not in keep:
                keep.add(part)
                pending.append(part)
    ids = {vocab[token] for token in keep if token in vocab}
    ids |= {added["id"] for added in tokenizer_json.get("added_tokens", [])}
    return sorted(ids)


def trimmed_tokenizer_json(tokenizer_json: dict, kept: list[int]) -> dict:
    """`tokenizer_json` with only the `kept` tokens, renumbered in order, and the merges that make them."""
    new_id = {old: new for new, old in enumerate(kept)}
    model = dict(tokenizer_json["model"])
    vocab = {token: new_id[i] for token, i in model["vocab"].items() if i in new_id}
    merges = []
    for merge in model["merges"]:
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        if left + right in vocab and left in vocab and right in vocab:
            merges.append(merge)
    model.update(vocab=vocab, merges=merges)
    trimmed = dict(tokenizer_json, model=model, post_processor=copy.deepcopy(tokenizer_json.get("post_processor")))
    trimmed["added_tokens"] = [dict(added, id=new_id[added["id"]]) for added in tokenizer_json.get("added_tokens", [])]
    processor = trimmed["post_processor"] or {}
    for step in [processor, *processor.get("processors", [])]:  # a template's special tokens name their ids
        for special in (step.get("special_tokens") or {}).values():
            special["ids"] = [new_id[i] for i in special.get("ids", [])]
    return trimmed


def _remap_ids(config: dict, new_id: dict[int, int], keys: Iterable[str]) -> None:
    for key in keys:
        value = config.get(key)
        if isinstance(value, int):
            config[key] = new_id[value]
        elif isinstance(value, list):
            config[key] = [new_id[v] for v in value]


def trim_vocabulary(model_dir: Path, texts: Iterable[str], out: Path, core_merges: int = CORE_MERGES) -> TrimmedVocabulary:
    """Write to `out` the Hugging Face model of `model_dir` cut to the tokens that `texts` use (plus
    the general core, see the module's doc), with its trimmed tokenizer and `vocabulary.json`."""
    import torch
    from tokenizers import Tokenizer

    from vertical.models.registry import load_causal_lm

    if not (model_dir / "tokenizer.json").is_file():
        raise VerticalError(f"{model_dir} has no tokenizer.json, and only a fast (tokenizers) vocabulary can be cut")
    tokenizer_json = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    tokenizer = Tokenizer.from_str(json.dumps(tokenizer_json))
    used: set[int] = set()
    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) == 4096:
            used.update(i for encoding in tokenizer.encode_batch(batch, add_special_tokens=False) for i in encoding.ids)
            batch.clear()
    used.update(i for encoding in tokenizer.encode_batch(batch, add_special_tokens=False) for i in encoding.ids)
    kept = kept_tokens(tokenizer_json, used, core_merges)
    new_id = {old: new for new, old in enumerate(kept)}

    model = load_causal_lm(model_dir)
    full_size = model.get_input_embeddings().weight.shape[0]
    index = torch.tensor(kept)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    embedding = torch.nn.Embedding(len(kept), model.config.hidden_size)
    embedding.weight.data.copy_(model.get_input_embeddings().weight.data[index])
    head = model.get_output_embeddings()
    new_head = torch.nn.Linear(head.in_features, len(kept), bias=head.bias is not None)
    new_head.weight.data.copy_(head.weight.data[index])
    if head.bias is not None:
        new_head.bias.data.copy_(head.bias.data[index])
    model.set_input_embeddings(embedding)
    model.set_output_embeddings(new_head)
    model.config.vocab_size = len(kept)
    token_keys = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "decoder_start_token_id")
    _remap_ids(model.config.__dict__, new_id, token_keys)
    if model.generation_config is not None:
        _remap_ids(model.generation_config.__dict__, new_id, token_keys)
    if tied:
        model.tie_weights()

    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(out)
    for extra in model_dir.iterdir():  # chat template, tokenizer settings: token strings, not ids
        if extra.is_file() and extra.suffix in (".jinja", ".json") and not (out / extra.name).exists() \
                and extra.name not in ("tokenizer.json", "vocab.json", "merges.txt"):
            shutil.copy2(extra, out / extra.name)
    tokenizer_config = out / "tokenizer_config.json"
    if tokenizer_config.is_file():  # added tokens by id, where the file lists them
        settings = json.loads(tokenizer_config.read_text(encoding="utf-8"))
        if "added_tokens_decoder" in settings:
            settings["added_tokens_decoder"] = {str(new_id[int(k)]): v for k, v in settings["added_tokens_decoder"].items()}
            tokenizer_config.write_text(json.dumps(settings, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "tokenizer.json").write_text(json.dumps(trimmed_tokenizer_json(tokenizer_json, kept), ensure_ascii=False),
                                        encoding="utf-8")
    trimmed = TrimmedVocabulary(kept=kept, full_size=full_size)
    (out / VOCABULARY_FILE).write_text(json.dumps({"full_size": full_size, "kept": kept, "core_merges": core_merges}) + "\n",
                                       encoding="utf-8")
    log.info("vocabulary: %d of %d tokens kept (%d used by the pack's texts)", trimmed.size, full_size, len(used))
    return trimmed
