"""`vertical export BUILD --format hf|gguf`: the build's model for the engines customers already run.

    hf    model/       the merged Hugging Face folder (safetensors, config, tokenizer, chat
                       template, generation config) that vLLM, TGI and transformers load as it is
    gguf  model.gguf   llama.cpp's format at Q8_0 (or F16), written with the maintained `gguf` package
          Modelfile    Ollama's recipe: the chat template, the pack's system prompt and
                       disclaimer, the stop token, greedy decoding
    both  retrieval/   the build's ONNX embedder, index and pack.json, for a RAG stack of the
                       customer's own (`vertical serve` on the ONNX bundle serves them as /v1/search)
          README.md    the commands for vllm serve, TGI, ollama create, llama-server
          metrics.json what was checked

The model is the one the ONNX bundle ships (`vertical.export.model_to_export`). A GGUF file is read
back twice before it is kept: by the `gguf` reader and by transformers' GGUF loader, whose greedy
answers (to the end of the turn, cut by the loop guard as the server cuts them) are compared with
the source model's on the pack's prompts, beside the share of prompts whose first 48 greedy
tokens are all the same and how far the logits of the prompt's last positions moved. The Q8_0 blocks are rounded with
their error on each layer's output compensated over the pack's other prompts (export/gptq.py) and
written in gguf's layout; Q4_K_M is not offered because the `gguf` package cannot write it.

By default (`auto`) the file is Q8_0 when its greedy answers agree with the source model's on at
least MIN_AGREEMENT of the prompts, and F16 otherwise: the customer's engine then gives the answers
the build measured, at twice the file size, instead of a smaller file whose answers differ.
"""

from __future__ import annotations

import json
import logging
import shutil
from functools import cached_property
from pathlib import Path
from typing import Any

from vertical.errors import VerticalError

log = logging.getLogger(__name__)

FORMATS = ("onnx", "gguf", "hf")
GGUF_FILE = "model.gguf"
GGUF_QUANTS = ("q8_0", "f16")  # Q8_0 halves the file; F16 keeps the model's greedy answers
MIN_AGREEMENT = 0.9  # share of the check's greedy answers a Q8_0 file must keep to be chosen by `auto`
AGREEMENT_TOKENS = 48  # greedy tokens compared per prompt between the source model and its GGUF
AGREEMENT_PROMPTS = 20
CALIBRATION_PROMPTS = 32  # pack prompts after the check's, whose layer inputs steer the Q8_0 rounding
# Ollama's documented PARAMETER names: the Modelfile uses no other
OLLAMA_PARAMETERS = ("num_ctx", "repeat_last_n", "repeat_penalty", "temperature", "seed", "stop", "num_predict",
                     "top_k", "top_p", "min_p")
HF_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "chat_template.jinja", "special_tokens_map.json")


def export_format(build_dir: Path, fmt: str, out: Path, check: bool = True, quant: str | None = None) -> dict[str, Any]:
    """Write the build's model in format `fmt` ("hf" or "gguf") into the new folder `out`;
    `quant` for gguf: auto (default: Q8_0 if it keeps MIN_AGREEMENT of the checked greedy answers,
    else F16), q8_0 or f16. Without `check`, auto means Q8_0."""
    from vertical.io import atomic_dir

    if fmt not in ("gguf", "hf"):
        raise VerticalError(f"--format {fmt}: use onnx, gguf or hf")
    if quant is not None and (fmt != "gguf" or quant not in ("auto", *GGUF_QUANTS)):
        raise VerticalError(f"--quant {quant}: a GGUF export is auto, {' or '.join(GGUF_QUANTS)}; an HF export is not quantised")
    context = _Context(build_dir)
    with atomic_dir(out) as tmp:
        metrics: dict[str, Any] = {"format": fmt, "model": context.role, "source": str(context.model_dir.relative_to(build_dir))}
        if fmt == "hf":
            _copy_hf_folder(context.model_dir, tmp / "model")
        else:
            metrics.update(_write_checked_gguf(context, tmp / GGUF_FILE, quant or "auto", check))
            (tmp / "Modelfile").write_text(modelfile(context.model_dir, context.pack.config.system_prompt,
                                                     context.pack.config.disclaimer), encoding="utf-8")
        _copy_retrieval(context, tmp / "retrieval")
        (tmp / "README.md").write_text(_readme(fmt, context.pack.config.name, out, metrics.get("gguf_quant")), encoding="utf-8")
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    return metrics


def _write_checked_gguf(context: "_Context", path: Path, quant: str, check: bool) -> dict[str, Any]:
    """Write `path` at `quant` and read it back; `auto` falls back from Q8_0 to F16 when Q8_0's
    greedy answers agree with the source model's on fewer than MIN_AGREEMENT of the prompts."""
    chosen = "q8_0" if quant == "auto" else quant
    moments = _calibration_moments(context) if chosen == "q8_0" else None
    metrics = write_gguf(context.model_dir, path, name=context.pack.config.name, quant=chosen, moments=moments)
    if not check:
        return {**metrics, "gguf_quant_reason": f"--quant {quant}, not read back"}
    prompts = context.prompts()
    source = SourceAnswers(context.model_dir, prompts)
    metrics.update(check_gguf(context.model_dir, path, prompts, source))
    if quant != "auto":
        return {**metrics, "gguf_quant_reason": f"--quant {quant}"}
    agreement = metrics["gguf_greedy_agreement"]
    if agreement >= MIN_AGREEMENT:
        return {**metrics, "gguf_quant_reason": f"Q8_0 keeps {agreement:.0%} of the checked greedy answers "
                                                f"(at least {MIN_AGREEMENT:.0%})"}
    log.warning("export: Q8_0 keeps %.0f%% of the checked greedy answers (below %.0f%%); writing F16 instead",
                100 * agreement, 100 * MIN_AGREEMENT)
    path.unlink()
    metrics = {**write_gguf(context.model_dir, path, name=context.pack.config.name, quant="f16"),
               **check_gguf(context.model_dir, path, prompts, source)}
    return {**metrics, "gguf_q8_0_greedy_agreement": agreement,
            "gguf_quant_reason": f"Q8_0 kept {agreement:.0%} of the checked greedy answers (below "
                                 f"{MIN_AGREEMENT:.0%}); F16 keeps {metrics['gguf_greedy_agreement']:.0%}"}


class _Context:
    """The build's pack, the model it ships and its prompts, loaded once."""

    def __init__(self, build_dir: Path):
        from vertical.export import model_to_export
        from vertical.pack import load_pack
        from vertical.pipeline import load_manifest

        manifest = load_manifest(build_dir)
        if not manifest.get("pack"):
            raise VerticalError(f"{build_dir}/manifest.json names no pack: rebuild with `vertical build PACK --out {build_dir}`")
        self.build_dir = build_dir
        self.pack = load_pack(manifest.get("pack_dir") or manifest["pack"])
        self.model_dir, self.role, _ = model_to_export(build_dir, self.pack.config.stages.export)

    def prompts(self, start: int = 0, count: int = AGREEMENT_PROMPTS) -> list[list[dict[str, str]]]:
        """The pack's questions from the `start`-th, `count` of them, with their retrieved sources, as
        the server asks them."""
        from vertical.export import pack_questions
        from vertical.answer import retrieve
        from vertical.prompting import build_messages

        index, embedder = self._retrieval
        prompts = []
        for question in pack_questions(self.pack)[start: start + count]:
            sources, _ = retrieve(index, embedder.encode_query, question, self.pack.config.stages.tune.rag_sources)
            prompts.append(build_messages(self.pack.config.system_prompt, question, sources or None))
        return prompts

    @cached_property
    def _retrieval(self):
        """The build's index and embedder, opened once for the calibration and the check prompts."""
        from vertical.index import open_index

        return open_index(self.build_dir)


def _calibration_moments(context: _Context) -> dict | None:
    """The layers' input moments over the pack's prompts that come after the check's own, or None
    (rounding to nearest) for a pack with no more prompts."""
    from vertical.export.gptq import input_moments
    from vertical.models import load_causal_lm, load_tokenizer

    prompts = context.prompts(AGREEMENT_PROMPTS, CALIBRATION_PROMPTS)
    if not prompts:
        log.warning("export: the pack has no prompts beyond the %d the check uses, so Q8_0 rounds to nearest; "
                    "add example questions or instructions to calibrate it", AGREEMENT_PROMPTS)
        return None
    ids = chat_ids(load_tokenizer(context.model_dir), prompts)
    log.info("export: calibrating the Q8_0 rounding on %d pack prompts", len(ids))
    return input_moments(load_causal_lm(context.model_dir).eval(), ids)


def chat_ids(tokenizer, prompts: list[list[dict[str, str]]]) -> list[list[int]]:
    """Each prompt's token ids in the model's chat template, as the server sends it."""
    return [tokenizer(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
                      add_special_tokens=False)["input_ids"] for messages in prompts]


def _copy_hf_folder(model_dir: Path, out: Path) -> None:
    out.mkdir(parents=True)
    for name in HF_FILES:
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, out / name)
    if not (out / "model.safetensors").is_file():
        raise VerticalError(f"{model_dir} holds no model.safetensors; rebuild the build with `vertical build PACK`")


def _copy_retrieval(context: _Context, out: Path) -> None:
    from vertical.index import EMBEDDER
    from vertical.index.store import RetrievalIndex

    index_dir = context.build_dir / "index"
    if not (index_dir / EMBEDDER).is_dir():
        raise VerticalError(f"{context.build_dir} has no index yet; run `vertical build {context.pack.config.name}` first")
    out.mkdir(parents=True)
    shutil.copytree(index_dir / EMBEDDER, out / "embedder")
    RetrievalIndex.load(index_dir).save(out / "index")
    config = context.pack.config
    info = {"name": config.name, "system_prompt": config.system_prompt, "disclaimer": config.disclaimer,
            "rag_sources": config.stages.tune.rag_sources}
    (out / "pack.json").write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# ---------------------------------------------------------------- GGUF


def _tokenizer_vocabulary(model_dir: Path, vocab_size: int) -> tuple[list[str], list[int], list[str], str]:
    """(tokens by id, their GGUF token types, BPE merges, pre-tokenizer name) from tokenizer.json."""
    import gguf

    spec = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise VerticalError(f"{model_dir}/tokenizer.json is a {model.get('type')} tokenizer; GGUF export supports "
                            "byte-level BPE tokenizers (SmolLM2, Llama 3, Qwen): use --format hf")
    by_id: dict[int, str] = {i: token for token, i in model["vocab"].items()}
    kinds: dict[int, int] = {}
    for added in spec.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        kinds[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    size = max(vocab_size, max(by_id) + 1)
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(size)]
    types = [kinds.get(i, gguf.TokenType.NORMAL if i in by_id else gguf.TokenType.UNUSED) for i in range(size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    # llama.cpp picks its pre-tokenizer by name: SmolLM's splits digits one by one before GPT-2's regex
    pre = json.dumps(spec.get("pre_tokenizer") or {})
    pre_name = "smollm" if '"individual_digits": true' in pre else "gpt-2"
    return tokens, [int(t) for t in types], merges, pre_name


def _llama_permute(weight, heads: int):
    """Q and K rows from Hugging Face's rotate-half order into llama.cpp's interleaved rotary order."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def write_gguf(model_dir: Path, path: Path, name: str = "", quant: str = "q8_0",
               moments: dict | None = None) -> dict[str, Any]:
    """Write a Llama-architecture Hugging Face folder as one GGUF file: matrices Q8_0 (or F16),
    norms F32. `moments` (`input_moments` of the model, by module name) make the Q8_0 rounding
    compensate its error on each layer's output (export/gptq.py); without them it rounds to nearest."""
    import gguf
    import numpy as np
    from safetensors import safe_open

    from vertical.export.gptq import BLOCK, q8_0_bytes, round_q8_0

    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    if config.get("model_type") != "llama":
        raise VerticalError(f"GGUF export supports Llama-architecture models (SmolLM2, Llama); {model_dir} is "
                            f"'{config.get('model_type')}': use --format hf")
    layers, heads = config["num_hidden_layers"], config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads", heads)
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    rope = config.get("rope_parameters") or {}
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_name(name or model_dir.name)
    writer.add_context_length(config.get("max_position_embeddings", 2048))
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(layers)
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", config.get("rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-5)))
    writer.add_vocab_size(config["vocab_size"])
    if quant not in GGUF_QUANTS:
        raise VerticalError(f"--quant {quant}: a GGUF export is {' or '.join(GGUF_QUANTS)}")
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if quant == "q8_0" else gguf.LlamaFileType.MOSTLY_F16)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    tokens, types, merges, pre_name = _tokenizer_vocabulary(model_dir, config["vocab_size"])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_name)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for key, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                     ("pad_token_id", writer.add_pad_token_id), ("unk_token_id", writer.add_unk_token_id)):
        value = config.get(key)
        if isinstance(value, list):
            value = value[0]
        if value is not None:
            add(int(value))
    writer.add_add_bos_token(False)
    template = model_dir / "chat_template.jinja"
    if template.is_file():
        writer.add_chat_template(template.read_text(encoding="utf-8"))

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, layers)
    counts = {"Q8_0": 0, "F16": 0, "F32": 0}
    with safe_open(str(model_dir / "model.safetensors"), framework="numpy") as weights:
        for key in weights.keys():
            if key == "lm_head.weight" and config.get("tie_word_embeddings"):
                continue
            if "rotary_emb" in key:
                continue
            target = names.get_name(key, try_suffixes=(".weight", ".bias"))
            if target is None:
                raise VerticalError(f"{model_dir}: tensor {key} has no GGUF name for a Llama model; use --format hf")
            data = weights.get_tensor(key).astype(np.float32)
            order = heads if key.endswith("q_proj.weight") else kv_heads if key.endswith("k_proj.weight") else None

            def permuted(array):
                return _llama_permute(array, order) if order else array
            if data.ndim == 2 and quant == "f16":
                writer.add_tensor(target, permuted(data).astype(np.float16))
                counts["F16"] += 1
            elif data.ndim == 2 and data.shape[-1] % BLOCK == 0:
                # The embedding has no moment (it is looked up, not multiplied by an input), so its
                # rounding has no output error to compensate.
                scales, values = round_q8_0(data, (moments or {}).get(key.removesuffix(".weight")))
                writer.add_tensor(target, q8_0_bytes(permuted(scales), permuted(values)),
                                  raw_dtype=gguf.GGMLQuantizationType.Q8_0)
                counts["Q8_0"] += 1
            else:
                writer.add_tensor(target, data)
                counts["F32"] += 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    rounding = None if quant != "q8_0" else "gptq" if moments else "nearest"
    return {"gguf_bytes": path.stat().st_size, "gguf_tensors": counts, "gguf_quant": quant.upper(),
            "gguf_rounding": rounding, "tokenizer_pre": pre_name}


def served_answer(tokenizer, tokens: list[int]) -> str:
    """Greedy tokens as the server answers with them: to the end of the turn, cut by the loop guard."""
    from vertical.evidence import cut_answer

    ends = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}
    end = next((i for i, token in enumerate(tokens) if token in ends), len(tokens))
    return cut_answer(tokenizer.decode(tokens[:end]))[0]


LOGIT_POSITIONS = 32  # a prompt's last positions whose logits the check compares


class SourceAnswers:
    """The source model's side of the check, computed once however many files are checked: each
    prompt's token ids, greedy tokens and last LOGIT_POSITIONS logits."""

    def __init__(self, model_dir: Path, prompts: list[list[dict[str, str]]]):
        import torch

        from vertical.generation import greedy_ids
        from vertical.models import load_causal_lm, load_tokenizer

        model, self.tokenizer = load_causal_lm(model_dir).eval(), load_tokenizer(model_dir)
        self.texts = [self.tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in prompts]
        self.ids = [self.tokenizer(text, add_special_tokens=False)["input_ids"] for text in self.texts]
        self.tokens = [list(greedy_ids(model, ids, AGREEMENT_TOKENS)) for ids in self.ids]
        with torch.inference_mode():
            self.logits = [model(torch.tensor([ids]), logits_to_keep=LOGIT_POSITIONS).logits for ids in self.ids]


def check_gguf(model_dir: Path, path: Path, prompts: list[list[dict[str, str]]],
               source: SourceAnswers | None = None) -> dict[str, Any]:
    """Read the file back (the `gguf` reader, then transformers' GGUF loader) and compare its greedy
    answers and tokenisation with the source model's on `prompts` (`source`: already computed)."""
    import gguf
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vertical.generation import greedy_ids

    reader = gguf.GGUFReader(str(path))
    if reader.fields["general.architecture"].contents() != "llama":
        raise VerticalError(f"{path}: the GGUF reader does not read back a llama model")
    source = source or SourceAnswers(model_dir, prompts)
    try:
        loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        loaded_tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as exc:  # noqa: BLE001 - any failure to load is the check failing
        raise VerticalError(f"{path}: transformers cannot load the GGUF file back ({exc})") from exc
    loaded.eval()
    same_answers = same_tokens = same_ids = 0
    errors = []
    for text, ids, expected_ids, expected in zip(source.texts, source.ids, source.tokens, source.logits):
        same_tokens += loaded_tokenizer(text, add_special_tokens=False)["input_ids"] == ids
        got_ids = list(greedy_ids(loaded, ids, AGREEMENT_TOKENS))
        same_ids += expected_ids == got_ids
        same_answers += served_answer(source.tokenizer, expected_ids) == served_answer(source.tokenizer, got_ids)
        with torch.inference_mode():  # how far the prompt's last logits moved, relative to their size
            got = loaded(torch.tensor([ids]), logits_to_keep=LOGIT_POSITIONS).logits
        errors.append(float((got - expected).norm() / expected.norm()))
    count = max(len(source.ids), 1)
    return {"gguf_tensors_read": len(reader.tensors), "gguf_agreement_prompts": len(source.ids),
            "gguf_greedy_agreement": round(same_answers / count, 4),
            f"gguf_same_{AGREEMENT_TOKENS}_tokens": round(same_ids / count, 4),
            "gguf_tokenizer_agreement": round(same_tokens / count, 4), "gguf_logit_error": round(max(errors, default=0.0), 4)}


def _quoted(text: str) -> str:
    """A Modelfile value in triple quotes (which the value itself must not hold)."""
    return '"""' + text.replace('"""', "'''") + '"""'


def modelfile(model_dir: Path, system_prompt: str, disclaimer: str) -> str:
    """Ollama's Modelfile for model.gguf: ChatML as SmolLM2's template writes it, the pack's
    system prompt with its disclaimer, the end-of-turn stop token and greedy decoding, in
    documented instructions only (FROM, TEMPLATE, SYSTEM, PARAMETER)."""
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    template = (model_dir / "chat_template.jinja").read_text(encoding="utf-8") if (model_dir / "chat_template.jinja").is_file() else ""
    if "<|im_start|>" not in template:
        raise VerticalError(f"{model_dir}: only ChatML chat templates (<|im_start|> ... <|im_end|>) are written to a "
                            "Modelfile; use --format hf")
    go_template = ("{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
                   "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
                   "<|im_start|>assistant\n")
    system = system_prompt.strip() + (f"\n\nEnd every answer with this note: {disclaimer.strip()}" if disclaimer.strip() else "")
    lines = [f"# {config.get('_name_or_path') or model_dir.name}: exported by vertical; retrieval is not part of the",
             "# model: send the sources in the user message as `vertical serve`'s /v1/search returns them",
             f"FROM ./{GGUF_FILE}",
             f"TEMPLATE {_quoted(go_template)}",
             f"SYSTEM {_quoted(system)}",
             'PARAMETER stop "<|im_end|>"',
             'PARAMETER stop "<|endoftext|>"',
             "PARAMETER temperature 0",
             f"PARAMETER num_ctx {min(int(config.get('max_position_embeddings', 2048)), 4096)}"]
    return "\n".join(lines) + "\n"


def _readme(fmt: str, name: str, out: Path, quant: str | None = None) -> str:
    retrieval = ("`retrieval/` holds the build's ONNX embedder and index. Beside these engines, `vertical serve`\n"
                 "on the build's ONNX bundle answers `/v1/search` and `/v1/embeddings` from them.\n")
    if fmt == "hf":
        return (f"# {name}: Hugging Face folder\n\n`model/` is the build's model as safetensors with its tokenizer and "
                f"chat template.\n\n```\nvllm serve {out}/model --served-model-name {name}\n"
                f"docker run -p 8080:80 -v {out}/model:/data/model ghcr.io/huggingface/text-generation-inference "
                f"--model-id /data/model\n```\n\n{retrieval}")
    return (f"# {name}: GGUF ({quant})\n\n```\nollama create {name} -f {out}/Modelfile && ollama run {name}\n"
            f"llama-server -m {out}/{GGUF_FILE} --jinja -c 4096\n```\n\n{retrieval}")
