"""QA accuracy of a model (PyTorch or the ONNX bundle) on a pack's evaluation items, and which
items each scoring stage (tune, distill, eval) asks. Shared below the stages, so that every stage
scores alike and the eval stage can reuse the answers an earlier stage already gave.

Multiple-choice items (PubMedQA's yes/no/maybe) are scored by the model's probability of each
choice right after "Answer:", in the same prompt for every model, so base and tuned models are
compared on equal terms. Short-answer items are generated greedily and count as correct when the
normalised gold answer occurs in the normalised output.
"""

from __future__ import annotations

import json
import random
import re
import string
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from vertical.evidence import CITATION, Checked, LoopGuard, allowed_numbers, check_answer, cut_answer, digits
from vertical.pack.schema import QAItem
from vertical.prompting import Source, build_messages, prompt_length
from vertical.reader import log_softmax, reconsider

Retriever = Callable[[str], list[Source]]
ANSWER_PREFIX = "Answer:"
SCORING_VERSION = 12  # part of a reusable answer's key: raise it when normalize / is_correct / choose / check_answer / vertical.reader change
MAX_ANSWER_WORDS = 40  # a longer answer is wrong whatever it contains: quoting whole passages cannot pass
GENERATION_BATCH = 8  # short answers generated together (see TorchLM.generate_batch)


def normalize(text: str) -> str:
    text = digits(text.lower().replace("\u2009", " "))
    text = "".join(ch for ch in text if ch not in set(string.punctuation) - {".", "%"})
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    text = re.sub(r"(?<!\d)\.|\.(?!\d)", " ", text)  # keep decimal points
    text = re.sub(r"[£$€¥]", " ", text)  # "£60" and "60" are the same amount
    text = re.sub(r"(\d)\.0+(?!\d)", r"\1", text)  # "86.0" and "86" are the same number
    return " ".join(text.split())


def is_correct(prediction: str, gold: str) -> bool:
    """The normalised gold answer occurs in the prediction, citations removed, as whole words
    ("no" is not in "not"), and the prediction is at most MAX_ANSWER_WORDS words long."""
    gold_n = normalize(gold)
    answer = normalize(CITATION.sub(" ", prediction))
    return bool(gold_n) and len(answer.split()) <= MAX_ANSWER_WORDS and f" {gold_n} " in f" {answer} "


class TorchLM:
    """A torch causal LM and its tokenizer, seen through the few calls scoring needs.

    Forward passes run under bf16 autocast where the CPU (or GPU) does bf16 natively, as training
    does: scoring is about 1.5x faster than in fp32 here, and a close call can go the other way
    (benchmarks/qa_scoring.py measures speed and agreement side by side); `bf16=False` keeps fp32."""

    def __init__(self, model, tokenizer, bf16: bool = True):
        import contextlib

        from vertical.models.registry import autocast, bf16_supported

        from vertical.generation import special_tokens
        from vertical.prompting import register_special_tokens

        self.model, self.tokenizer = model, tokenizer
        register_special_tokens(special_tokens(tokenizer))
        bf16 = bf16 and bf16_supported()
        self._precision = autocast if bf16 else contextlib.nullcontext
        self.numerics = "torch-bf16" if bf16 else "torch-fp32"  # part of a reusable answer's key

    def chat_ids(self, messages: list[dict[str, str]], suffix: str = "") -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) + suffix
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def piece_ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def next_logprobs(self, ids: list[int]):
        import torch

        with torch.inference_mode(), self._precision():
            # the vocabulary projection of the last position only: over a retrieval prompt's 850
            # positions it would cost about a fifth of the forward pass, for logits nobody reads
            return self.model(torch.tensor([ids]), logits_to_keep=1).logits[0, -1].float().log_softmax(-1)

    def mean_logprobs(self, rows: list[tuple[list[int], list[int]]]) -> list[float]:
        """Mean log P of each (prompt, continuation) row's continuation, rows batched (fp32: the
        edit metrics compare two such values, and the edit stage computes them in fp32 too)."""
        from vertical.generation import mean_logprobs

        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        return mean_logprobs(self.model, rows, pad)

    def continuation_scores(self, ids: list[int], continuations: list[list[int]]) -> list[float]:
        """Summed log P of each continuation after `ids`. The prompt is run once and its KV cache
        reused (cropped back after each continuation): a long prompt with retrieved sources and
        eight multi-token choices costs one prefill, not eight."""
        import torch

        with torch.inference_mode(), self._precision():
            out = self.model(torch.tensor([ids]), use_cache=True, logits_to_keep=1)
            cache, first = out.cache, out.logits[0, -1].float().log_softmax(-1)
            scores = []
            for continuation in continuations:
                score = float(first[continuation[0]])
                if len(continuation) > 1:
                    rest = self.model(torch.tensor([continuation[:-1]]), cache=cache, use_cache=True)
                    logp = rest.logits[0].float().log_softmax(-1)
                    score += sum(float(logp[i, t]) for i, t in enumerate(continuation[1:]))
                    cache.crop(-(len(continuation) - 1))  # back to the prompt alone
                scores.append(score)
        return scores

    def prefill(self, ids: list[int]):
        from vertical.generation import TorchPrefilled

        return TorchPrefilled(self.model, ids, self._precision)

    def generate(self, messages: list[dict[str, str]], max_new_tokens: int, numbers: set[str] | None = None) -> str:
        return self.generate_batch([messages], max_new_tokens, [numbers])[0]

    def generate_batch(self, conversations: list[list[dict[str, str]]], max_new_tokens: int,
                       numbers: list[set[str] | None] | None = None) -> list[str]:
        """Greedy answers to several prompts in one left-padded batch: on a CPU the prompts' prefill
        dominates and the decoding steps are shared, so 8 answers cost about half of 8 separate ones.
        Each answer ends where the assistant stops streaming it (a repeat, or two sentences said).
        `numbers[i]`: the only numbers answer i may write (vertical.evidence.NumberCopy)."""
        from vertical.generation import chat_prompt_ids, generate_batch

        rows = generate_batch(self.model, [chat_prompt_ids(self.tokenizer, c) for c in conversations],
                              self.tokenizer.pad_token_id, max_new_tokens, tokenizer=self.tokenizer,
                              numbers=numbers or [None] * len(conversations), until_answered=True,
                              precision=self._precision)
        return [self.tokenizer.decode(row, skip_special_tokens=True) for row in rows]


class OnnxLM:
    """An exported bundle's onnxruntime-genai model, with the same calls as TorchLM (no torch)."""

    numerics = "onnx"
    # answers one at a time, each read a second time before the next: the second reading then
    # starts from the answer's own generator (OnnxChatModel.prefill), as `vertical ask` does
    generation_batch = 1

    def __init__(self, chat_model):  # vertical.export.runtime.OnnxChatModel
        self.chat = chat_model

    def chat_ids(self, messages: list[dict[str, str]], suffix: str = "") -> list[int]:
        import json

        text = self.chat.tokenizer.apply_chat_template(json.dumps(messages), add_generation_prompt=True) + suffix
        return [int(t) for t in self.chat.tokenizer.encode(text)]

    def piece_ids(self, text: str) -> list[int]:
        return [int(t) for t in self.chat.tokenizer.encode(text)]

    def next_logprobs(self, ids: list[int]):
        return self.logprobs_all(ids, [])[0]

    def logprobs(self, ids: list[int], continuation: list[int]) -> list[float]:
        rows = self.logprobs_all(ids, continuation)
        return [float(row[token]) for row, token in zip(rows, continuation)]

    def logprobs_all(self, ids: list[int], continuation: list[int]):
        """Next-token log-probability vectors after `ids` and after each continuation token but the last."""
        og = self.chat._og
        params = og.GeneratorParams(self.chat.model)
        params.set_search_options(max_length=len(ids) + len(continuation) + 1)
        generator = og.Generator(self.chat.model, params)
        generator.append_tokens(ids)
        rows = []
        for position in range(max(len(continuation), 1)):
            rows.append(log_softmax(generator.get_logits()))
            if position + 1 < len(continuation):
                generator.append_tokens([continuation[position]])
        return rows

    def mean_logprobs(self, rows: list[tuple[list[int], list[int]]]) -> list[float]:
        values = [self.logprobs(prompt, continuation) for prompt, continuation in rows]
        return [sum(v) / len(v) for v in values]

    def continuation_scores(self, ids: list[int], continuations: list[list[int]]) -> list[float]:
        """As TorchLM's: one prefill of the prompt, then each continuation, rewound after it."""
        og = self.chat._og
        params = og.GeneratorParams(self.chat.model)
        params.set_search_options(max_length=len(ids) + max(len(c) for c in continuations) + 1)
        generator = og.Generator(self.chat.model, params)
        generator.append_tokens(ids)
        first = log_softmax(generator.get_logits())
        scores = []
        for continuation in continuations:
            score = float(first[continuation[0]])
            for previous, token in zip(continuation, continuation[1:]):
                generator.append_tokens([previous])
                score += float(log_softmax(generator.get_logits())[token])
            if len(continuation) > 1:
                generator.rewind_to(len(ids))
            scores.append(score)
        return scores

    def prefill(self, ids: list[int]):
        return self.chat.prefill(ids)

    def generate(self, messages: list[dict[str, str]], max_new_tokens: int, numbers: set[str] | None = None) -> str:
        guard = LoopGuard()  # the answer as the assistant streams it: up to a repeat or two sentences
        for piece in self.chat.stream(messages, max_new_tokens, numbers=numbers):
            if guard.feed(piece):
                break
        return guard.raw

    def generate_batch(self, conversations: list[list[dict[str, str]]], max_new_tokens: int,
                       numbers: list[set[str] | None] | None = None) -> list[str]:
        return [self.generate(messages, max_new_tokens, allowed)
                for messages, allowed in zip(conversations, numbers or [None] * len(conversations))]


def choose(lm, messages: list[dict[str, str]], choices: list[str]) -> str:
    """The choice with the highest probability as the continuation of "Answer:" (summed log
    probability of its tokens)."""
    prompt = lm.chat_ids(messages, ANSWER_PREFIX)
    continuations = [lm.piece_ids(" " + choice) for choice in choices]
    if all(len(c) == 1 for c in continuations):  # yes / no / maybe: one forward pass for all
        logp = lm.next_logprobs(prompt)
        scores = [float(logp[c[0]]) for c in continuations]
    else:
        scores = lm.continuation_scores(prompt, continuations)
    return choices[max(range(len(choices)), key=scores.__getitem__)]


def item_key(item: QAItem, messages: list[dict[str, str]], max_new_tokens: int, numerics: str = "") -> str:
    """What a model's answer to an item depends on besides its weights: prompt, choices, answer
    length, and the arithmetic it runs in (bf16 and fp32 can disagree on a close call)."""
    from vertical.io import sha256_json

    return sha256_json([messages, item.choices, item.gold, max_new_tokens, numerics, SCORING_VERSION])


def score_qa(lm, items: list[QAItem], system_prompt: str, retriever: Retriever | None = None, track=None,
             max_new_tokens: int = 32, known: dict[str, dict] | None = None) -> dict:
    """Accuracy over `items` of a TorchLM or OnnxLM, overall and by kind (choice / short answer).

    `known` holds rows an earlier stage scored with the same weights (see known_predictions):
    an item with the same key is taken from there instead of being asked again."""
    known = known or {}
    predictions: dict[int, str] = {}
    keys: list[str] = []
    reused: dict[int, dict] = {}
    prompts: list[list[dict[str, str]]] = []
    given: list[list[Source]] = []
    for i, item in enumerate(items):  # retrieval first (milliseconds an item), so the work can be ordered
        given.append(retriever(item.question) if retriever else [])
        prompts.append(build_messages(system_prompt, item.question, given[i] if retriever else None))
        keys.append(item_key(item, prompts[i], max_new_tokens, getattr(lm, "numerics", "")))
        if keys[i] in known:
            reused[i] = known[keys[i]]
    # Short answers are generated in batches of similar prompt length: a left-padded batch costs
    # its longest prompt times its size, and in item order a batch of retrieval prompts carried
    # about 11% padding (games), sorted 4%.
    choice = [i for i in range(len(items)) if i not in reused and items[i].choices]
    short = sorted((i for i in range(len(items)) if i not in reused and not items[i].choices),
                   key=lambda i: prompt_length(prompts[i]))
    pending: list[int] = []
    answered: dict[int, tuple] = {}  # short answers with sources: (the checked answer, whether a span replaced it)

    def flush() -> None:
        # with sources, an answer writes only the numbers they (or the question) state
        numbers = [allowed_numbers(items[i].question, given[i]) if retriever else None for i in pending]
        answers = lm.generate_batch([prompts[i] for i in pending], max_new_tokens, numbers)
        for i, answer in zip(pending, answers):
            predictions[i] = answer
            if retriever is not None:  # the answer a user gets (see `answered`)
                answered[i] = answer_from_evidence(lm, items[i].question, prompts[i], given[i], answer)
        pending.clear()

    work = choice + short
    for i in (track(work, len(work), "QA evaluation") if track else work):
        if items[i].choices:
            predictions[i] = choose(lm, prompts[i], items[i].choices)
        else:
            pending.append(i)
            if len(pending) == getattr(lm, "generation_batch", GENERATION_BATCH):
                flush()
    if pending:
        flush()
    correct, rows = 0, []
    for i, item in enumerate(items):
        if i in reused:
            rows.append(reused[i])
            correct += reused[i]["correct"]
            continue
        row = {"question": item.question, "gold": item.gold, "kind": "choice" if item.choices else "short",
               "key": keys[i], "retrieved": item.doc_id in {s.doc_id for s in given[i]} if item.doc_id and retriever
               else None}
        if item.choices:
            row.update(prediction=predictions[i], correct=predictions[i] == item.gold)
        elif retriever is None:  # no evidence to hold the answer to: only cut at a loop
            text = cut_answer(predictions[i])[0]
            row.update(prediction=text, correct=is_correct(text, item.gold))
        else:
            checked, reread = answered[i]
            row.update(prediction=checked.text, raw=checked.raw, faithful=checked.faithful, fallback=checked.fallback,
                       abstained=checked.abstained, reread=reread, correct=is_correct(checked.text, item.gold))
        correct += row["correct"]
        rows.append(row)
    by_kind = {kind: kind_summary([r for r in rows if r["kind"] == kind]) for kind in ("choice", "short")}
    return {"accuracy": round(correct / len(items), 4) if items else None, "n": len(items), "by_kind": by_kind,
            "reused": len(reused), "items": rows}


def answer_from_evidence(lm, question: str, messages: list[dict[str, str]], sources: list[Source],
                         text: str) -> tuple[Checked, bool]:
    """(the answer a user gets, whether the second reading replaced it): `text` cut at a loop and
    checked against its evidence (vertical.evidence), then given way to a likelier span of the
    evidence, if the model finds one (vertical.reader)."""
    checked = check_answer(text, question, sources)
    span = reconsider(lambda: lm.prefill(lm.chat_ids(messages)), lm.piece_ids, question, sources,
                      checked.raw, checked.fallback)
    if span is not None:
        checked = replace(check_answer(span, question, sources), raw=checked.raw)
    return checked, span is not None


def _share(flags: list) -> float | None:
    return round(sum(map(bool, flags)) / len(flags), 4) if flags else None


def kind_summary(rows: list[dict]) -> dict:
    """Accuracy of one kind of item, and what explains it: how often the gold document was among
    the sources (recall), accuracy on those items (the reader's own share of the errors), and for
    short answers how often the model's answer held to its evidence, abstained or was replaced."""
    summary = {"accuracy": _share([r["correct"] for r in rows]), "n": len(rows)}
    known = [r for r in rows if r.get("retrieved") is not None]
    if known:
        found = [r for r in known if r["retrieved"]]
        summary.update({"recall@k": _share([r["retrieved"] for r in known]),
                        "accuracy_when_retrieved": _share([r["correct"] for r in found]), "n_retrieved": len(found)})
    answered = [r for r in rows if "faithful" in r]
    if answered:
        summary.update({"faithfulness": _share([r["faithful"] for r in answered]),
                        "fallback": _share([r["fallback"] for r in answered]),
                        "abstention": _share([r["abstained"] for r in answered]),
                        "reread": _share([r.get("reread", False) for r in answered])})
    return summary


# ---------------------------------------------------------------- answers shared between stages
#
# tune, distill and eval ask several of the same models the same questions with the same sources.
# Each stage that scores a model writes its rows to <stage>/qa_predictions.json under the sha256 of
# the model's weights; a later stage scoring the same weights reuses the rows whose key matches.

PREDICTIONS = "qa_predictions.json"


def weights_fingerprint(model_dir: Path) -> str:
    """sha256 over the model's safetensors files: equal fingerprints, equal weights."""
    from vertical.io import sha256_file, sha256_json

    files = sorted(Path(model_dir).glob("*.safetensors"))
    return sha256_json([sha256_file(f) for f in files]) if files else ""


def write_predictions(path: Path, scored: list[tuple[str, Path, dict]]) -> None:
    """`scored`: (model name, model folder, score_qa result), written as one stage's qa_predictions.json."""
    entries = [{"model": name, "weights": weights_fingerprint(folder), "accuracy": result["accuracy"],
                "items": result["items"]} for name, folder, result in scored]
    Path(path).write_text(json.dumps({"models": entries}, indent=1, ensure_ascii=False), encoding="utf-8")


def known_predictions(build_dir: Path, model_dir: Path) -> dict[str, dict]:
    """Rows the build's finished stages scored with exactly these weights, by item key."""
    fingerprint = weights_fingerprint(model_dir)
    known: dict[str, dict] = {}
    for file in sorted(Path(build_dir).glob(f"*/{PREDICTIONS}")):
        for entry in json.loads(file.read_text(encoding="utf-8")).get("models", []):
            if fingerprint and entry.get("weights") == fingerprint:
                known.update((row["key"], row) for row in entry["items"] if "key" in row)
    return known


def mean_loss(model, features: list[dict], batch_size: int = 4) -> float:
    """Mean next-token loss over the labelled (assistant) tokens of tokenised examples (bf16
    autocast where native, as the QA scoring; the log-softmax itself is taken in fp32). The
    vocabulary projection runs at the labelled positions only, as in training."""
    import torch

    from vertical.models import selected_logits
    from vertical.models.registry import autocast

    total, count = 0.0, 0
    with torch.inference_mode(), autocast():
        for start in range(0, len(features), batch_size):
            batch = features[start:start + batch_size]
            width = max(len(f["input_ids"]) for f in batch)
            pad = lambda seq, value: seq + [value] * (width - len(seq))  # noqa: E731
            ids = torch.tensor([pad(f["input_ids"], 0) for f in batch])
            mask = torch.tensor([pad(f["attention_mask"], 0) for f in batch])
            targets = torch.tensor([pad(f["labels"], -100) for f in batch])[:, 1:]  # what each position predicts
            rows, columns = (targets != -100).nonzero(as_tuple=True)
            logits = selected_logits(model, ids, mask, rows, columns)
            total += float(torch.nn.functional.cross_entropy(logits.float(), targets[rows, columns], reduction="sum"))
            count += len(rows)
    return total / max(count, 1)


# ---------------------------------------------------------------- which questions each stage asks


def sample_items(items: list, count: int, seed: int) -> list:
    """A seeded sample in which short-answer items (answers written in the pack's documents) make
    at least half, or all there are: a sample in the pack's own proportions measured medical mostly
    on PubMedQA's yes/no/maybe, not on the hospital's notes."""
    if not count or count >= len(items):
        return list(items)
    rng = random.Random(seed)
    choice = [i for i in items if i.choices]
    short = [i for i in items if not i.choices]
    take_short = min(len(short), max(round(count * len(short) / len(items)), (count + 1) // 2))
    return rng.sample(short, take_short) + rng.sample(choice, min(len(choice), count - take_short))


HELD_OUT_GENERATED = "tune/heldout_qa.jsonl"  # generated questions kept out of training (packs without qa_eval)


def pack_questions(pack, build_dir: Path | None = None) -> list:
    """The pack's QA items; for a pack without any, the held-out split of the questions the tune
    stage generated from its documents, so that every build has a score."""
    items = pack.qa_eval()
    if items or build_dir is None or not (Path(build_dir) / HELD_OUT_GENERATED).is_file():
        return items
    from vertical.pack.schema import QAItem

    lines = (Path(build_dir) / HELD_OUT_GENERATED).read_text(encoding="utf-8").splitlines()
    return [QAItem.model_validate({k: v for k, v in json.loads(line).items() if k in QAItem.model_fields})
            for line in lines if line.strip()]


def eval_sample(pack, build_dir: Path | None = None) -> list:
    """The QA items the eval stage scores (stages.eval: how many, which seed)."""
    settings = pack.config.stages.eval
    return sample_items(pack_questions(pack, build_dir), settings.questions, settings.seed)


def stage_questions(pack, count: int, questions: list) -> list:
    """The QA items the tune stage scores, of `questions` (the pack's, or the held-out generated
    ones): a subset of the eval stage's own sample (same mix of kinds), so that the eval stage
    reuses those answers instead of asking again."""
    if not count:
        return []
    settings = pack.config.stages.eval
    sample = sample_items(questions, settings.questions, settings.seed)
    return sample_items(sample if count <= len(sample) else questions, count, settings.seed)


def sample_inputs(pack) -> dict[str, Any]:
    """What eval_sample, stage_questions and the answers' length depend on (part of the scoring stages' inputs)."""
    return {"qa_eval": pack.fingerprint("qa_eval"), "eval_sample": pack.config.stages.eval.model_dump()}
