"""Text generation with a build's torch model (the exported runtime has its own, ONNX-based)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vertical.errors import VerticalError
from vertical.evidence import NumberCopy, NumberVocabulary, cut_answer
from vertical.prompting import register_special_tokens

log = logging.getLogger(__name__)

class ChatModel:
    """A causal LM and its tokenizer, answering chat messages greedily (deterministic)."""

    def __init__(self, model_dir: Path):
        from vertical.models import load_causal_lm, load_tokenizer

        self.model_dir = Path(model_dir)
        self.tokenizer = load_tokenizer(self.model_dir)
        self.model = load_causal_lm(self.model_dir)
        register_special_tokens(special_tokens(self.tokenizer))
        if not self.tokenizer.chat_template:
            raise VerticalError(f"{model_dir}: the tokenizer has no chat template; use an instruct/chat model")

    def _inputs(self, messages: list[dict[str, str]]):
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                  return_dict=True)

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        return chat_prompt_ids(self.tokenizer, messages)

    def piece_ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prefill(self, ids: list[int]) -> "TorchPrefilled":
        """The prompt read once, for a second, extractive reading (vertical.reader)."""
        return TorchPrefilled(self.model, ids)

    def generate(self, messages: list[dict[str, str]], max_new_tokens: int = 200,
                 numbers: set[str] | None = None) -> str:
        return "".join(self.stream(messages, max_new_tokens, numbers))

    def stream(self, messages: list[dict[str, str]], max_new_tokens: int = 200,
               numbers: set[str] | None = None) -> Iterator[str]:
        """Text pieces of the greedy answer; with `numbers`, the only numbers it may write
        (vertical.evidence.NumberCopy)."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        # A caller that stops reading (an answer cut at a loop or after two sentences) stops the
        # generation too: a thread left decoding while the interpreter exits aborts the process.
        stop = threading.Event()

        class StopWhenAsked(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool)

        inputs = self._inputs(messages)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        kwargs = dict(**inputs, max_new_tokens=max_new_tokens, do_sample=False, streamer=streamer,
                      pad_token_id=self.tokenizer.pad_token_id,
                      logits_processor=copy_numbers(self.tokenizer, [numbers], inputs["input_ids"].shape[1]),
                      stopping_criteria=StoppingCriteriaList([StopWhenAsked()]))
        errors: list[BaseException] = []

        def work():
            try:
                with torch.inference_mode():
                    self.model.generate(**kwargs)
            except BaseException as exc:  # surfaced in the caller's thread below
                errors.append(exc)
                streamer.end()

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        try:
            yield from streamer
        finally:
            stop.set()
            thread.join()
        if errors:
            raise errors[0]


def chat_prompt_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """The token ids of chat messages in the tokenizer's template, ready for the answer."""
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                         return_dict=True)["input_ids"][0].tolist()


def left_padded(rows: list[list[int]], pad: int):
    """Token rows as one left-padded batch (ids, attention mask), so that every row continues at
    the end: what batched generation needs."""
    import torch

    width = max(len(row) for row in rows)
    ids = torch.tensor([[pad] * (width - len(row)) + row for row in rows])
    mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows])
    return ids, mask


def generate_batch(model, prompts: list[list[int]], pad: int, max_new_tokens: int, *, tokenizer=None,
                   numbers: list[set[str] | None] | None = None, until_answered: bool = False, precision=None,
                   **options) -> list[list[int]]:
    """The new tokens of each prompt (token ids), the prompts run together in one left-padded batch:
    on a CPU their prefill dominates and the decoding steps are shared, so 8 answers cost about half
    of 8 separate ones. Greedy unless `options` (transformers' generate arguments) say otherwise; a
    row that ends early is padded with `pad` to the batch's length. `numbers[i]`: the only numbers
    row i may write (vertical.evidence.NumberCopy); `until_answered`: a row ends where an answer
    stops being read (vertical.evidence.LoopGuard). Both need `tokenizer`."""
    import contextlib

    import torch

    ids, mask = left_padded(prompts, pad)
    width = ids.shape[1]
    if numbers is not None:
        options["logits_processor"] = copy_numbers(tokenizer, numbers, width)
    if until_answered:
        options["stopping_criteria"] = stop_when_answered(tokenizer, width)
    options.setdefault("do_sample", False)
    with torch.inference_mode(), (precision or contextlib.nullcontext)():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, pad_token_id=pad,
                             **options)
    return out[:, width:].tolist()


def special_tokens(tokenizer) -> list[str]:
    """A transformers tokenizer's control tokens as text (its special and added special tokens)."""
    added = [t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if getattr(t, "special", False)]
    return [*tokenizer.all_special_tokens, *added]


def number_vocabulary(tokenizer) -> NumberVocabulary:
    """The tokenizer's number-writing tokens (decoding 50k tokens once: kept on the tokenizer)."""
    found = getattr(tokenizer, "_vertical_numbers", None)
    if found is None:
        found = NumberVocabulary(tokenizer.batch_decode([[i] for i in range(len(tokenizer))]))
        tokenizer._vertical_numbers = found
    return found


def copy_numbers(tokenizer, allowed: list[set[str] | None], prompt_width: int):
    """A transformers logits-processor list that holds each row of a (left-padded) batch to its
    own allowed numbers (None: no constraint for that row); empty when no row has any."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    if all(a is None for a in allowed):
        return LogitsProcessorList()
    vocabulary = number_vocabulary(tokenizer)
    rules = [None if a is None else NumberCopy(a, vocabulary) for a in allowed]

    class CopyNumbers(LogitsProcessor):
        def __call__(self, input_ids, scores):
            for row, rule in enumerate(rules):
                if rule is None:
                    continue
                text = tokenizer.decode(input_ids[row, prompt_width:], skip_special_tokens=True)
                mask = torch.from_numpy(rule.blocked(text))
                scores[row, : mask.shape[0]] = scores[row, : mask.shape[0]].masked_fill(mask, float("-inf"))
            return scores

    return LogitsProcessorList([CopyNumbers()])


def stop_when_answered(tokenizer, prompt_width: int):
    """A transformers stopping-criteria list that ends each row of a (left-padded) batch at the
    token where the assistant stops streaming an answer (vertical.evidence.LoopGuard: a repeat, or
    two sentences said). A scored answer is then the text a user gets, and the batch stops once
    every row has answered instead of writing words that are cut anyway."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Answered(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            texts = tokenizer.batch_decode(input_ids[:, prompt_width:], skip_special_tokens=True)
            return torch.tensor([cut_answer(text, final=False)[1] for text in texts], device=input_ids.device)

    return StoppingCriteriaList([Answered()])


def mean_logprobs(model, rows: list[tuple[list[int], list[int]]], pad: int, batch_size: int = 16) -> list[float]:
    """Mean log P of each continuation's tokens after its prompt, for (prompt ids, continuation ids)
    rows run together in right-padded batches of similar length: padding after a row changes none
    of its logits under the causal mask, so each value is the single-row one (to float rounding)."""
    import torch

    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]) + len(rows[i][1]))
    values = [0.0] * len(rows)
    for start in range(0, len(order), batch_size):
        chosen = order[start:start + batch_size]
        width = max(len(rows[i][0]) + len(rows[i][1]) for i in chosen)
        ids = torch.full((len(chosen), width), pad)
        mask = torch.zeros((len(chosen), width), dtype=torch.long)
        for row, i in enumerate(chosen):
            sequence = rows[i][0] + rows[i][1]
            ids[row, :len(sequence)] = torch.tensor(sequence)
            mask[row, :len(sequence)] = 1
        with torch.inference_mode():
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
        for row, i in enumerate(chosen):
            prompt, continuation = rows[i]
            logp = logits[row, len(prompt) - 1:len(prompt) + len(continuation) - 1].log_softmax(-1)
            values[i] = float(logp[torch.arange(len(continuation)), torch.tensor(continuation)].mean())
    return values


class TorchPrefilled:
    """A torch causal LM after one pass over a prompt (vertical.reader.Prefilled): the prompt's KV
    cache is kept, and the paths that follow it run in one forward pass as a token tree.

    Candidate spans share their beginnings ("5 mg [1]", "5 mg twice [1]", "5 mg twice daily [1]"),
    so the paths are merged into a trie, each shared prefix is one input token, and a tree
    attention mask lets a token see the prompt and its own ancestors only. A question's hundred
    paths cost one pass over their few hundred distinct tokens, not a pass per path with its own
    copy of the prompt's cache."""

    def __init__(self, model, prompt_ids: list[int], precision=None):
        import contextlib

        import torch

        self.model, self._prompt_length = model, len(prompt_ids)
        self._precision = precision or contextlib.nullcontext
        with torch.inference_mode(), self._precision():
            out = model(torch.tensor([prompt_ids]), use_cache=True, logits_to_keep=1)
        self._cache = out.cache
        self.first = out.logits[0, -1].float().log_softmax(-1).numpy()

    def follow(self, paths: list[list[int]]) -> list[list[float]]:
        import torch

        # the trie of the paths' inputs (a path's last token is never input): node -> (token, parent)
        tokens: list[int] = []
        parents: list[int] = []
        children: dict[tuple[int, int], int] = {}
        path_nodes: list[list[int]] = []
        for path in paths:
            node, nodes = -1, []
            for token in path[:-1]:
                if (node, token) not in children:
                    children[(node, token)] = len(tokens)
                    tokens.append(token)
                    parents.append(node)
                node = children[(node, token)]
                nodes.append(node)
            path_nodes.append(nodes)
        rows = [[float(self.first[path[0]])] for path in paths]
        if not tokens:  # one-token paths: the prompt's own next-token distribution scores them
            return rows
        count, prompt = len(tokens), self._prompt_length
        # a node sees itself and its ancestors (parents come before their children)
        sees = torch.zeros((count, count), dtype=torch.bool)
        depth = torch.zeros(count, dtype=torch.long)
        for node, parent in enumerate(parents):
            if parent >= 0:
                sees[node] = sees[parent]
                depth[node] = depth[parent] + 1
            sees[node, node] = True
        mask = torch.cat([torch.ones((count, prompt), dtype=torch.bool), sees], dim=1)[None, None]
        with torch.inference_mode(), self._precision():
            logits = self.model(torch.tensor([tokens]), attention_mask=mask, position_ids=(prompt + depth)[None],
                                cache=self._cache, use_cache=True).logits[0].float().log_softmax(-1)
        self._cache.crop(-count)  # back to the prompt alone, for another call
        for row, path, nodes in zip(rows, paths, path_nodes):
            row.extend(float(logits[node, token]) for node, token in zip(nodes, path[1:]))
        return rows


# ---------------------------------------------------------------- decode speed

# One prompt for every decode-speed number of a build, long enough to keep a model writing.
SPEED_PROMPT = [{"role": "user", "content": "Summarise the main points of the guideline in detail."}]


@dataclass
class DecodeSpeed:
    tokens_per_s: float  # tokens after the first, per second: decoding alone
    first_token_ms: float  # reading the prompt and writing the first token


def time_decoding(tokens: Iterable[Any]) -> DecodeSpeed | None:
    """Times one decoding, given as the iterator of its tokens (None if it wrote fewer than two)."""
    started, first, count = time.perf_counter(), None, 0
    for _ in tokens:
        count += 1
        if first is None:
            first = time.perf_counter()
    if first is None or count < 2:
        return None
    return DecodeSpeed((count - 1) / (time.perf_counter() - first), (first - started) * 1000)


def decode_speeds(decoders: dict[str, Callable[[], Iterable[Any]]], runs: int = 3) -> dict[str, DecodeSpeed]:
    """The best decode speed of each named decoder (a callable that starts one decoding), after one
    warm-up run each; the decoders take turns, so that a busy moment of a shared CPU slows all of
    them alike instead of one."""
    for decode in decoders.values():
        time_decoding(decode())
    best = {name: DecodeSpeed(0.0, float("inf")) for name in decoders}
    for _ in range(runs):
        for name, decode in decoders.items():
            speed = time_decoding(decode())
            if speed is not None:
                best[name] = DecodeSpeed(max(best[name].tokens_per_s, speed.tokens_per_s),
                                         min(best[name].first_token_ms, speed.first_token_ms))
    return best


def median_speeds(decoders: dict[str, Callable[[Any], Iterable[Any]]], prompts: list, ids_of: Callable[[Any], Any],
                  runs: int) -> dict[str, tuple[float, float]]:
    """Per named decoder (prompt ids -> token iterator): the median over `prompts` of its best decode
    tokens/s and best first-token ms, the decoders taking turns on each prompt (`decode_speeds`), so
    that one slow prompt or one busy moment does not decide a comparison."""
    import statistics

    per_prompt = []
    for prompt in prompts:
        ids = ids_of(prompt)
        per_prompt.append(decode_speeds({name: (lambda d=decode: d(ids)) for name, decode in decoders.items()}, runs))
    return {name: (statistics.median(p[name].tokens_per_s for p in per_prompt),
                   statistics.median(p[name].first_token_ms for p in per_prompt)) for name in decoders}


def greedy_rows(model, prompts: list[list[int]], pad: int, new_tokens: int) -> list[list[int]]:
    """greedy_ids for several prompts in one left-padded batch, the decoding steps shared: each
    row's `new_tokens` greedy tokens, an end-of-text token taken like any other."""
    import torch

    ids, mask = left_padded(prompts, pad)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    columns = []
    with torch.inference_mode():
        out = model(ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
        for _ in range(new_tokens):
            tokens = out.logits[:, -1].argmax(-1)
            columns.append(tokens)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            positions = positions[:, -1:] + 1
            out = model(tokens[:, None], attention_mask=mask, position_ids=positions, cache=out.cache, use_cache=True)
    return torch.stack(columns, dim=1).tolist()


def greedy_ids(model, prompt_ids: list[int], new_tokens: int) -> Iterator[int]:
    """A torch model's greedy tokens after a prompt, `new_tokens` of them whatever they are (no
    stop at end of text): the loop whose speed is comparable with onnxruntime-genai's."""
    import torch

    with torch.inference_mode():
        out = model(torch.tensor([prompt_ids]), use_cache=True, logits_to_keep=1)
        for _ in range(new_tokens):
            token = int(out.logits[0, -1].argmax())
            yield token
            out = model(torch.tensor([[token]]), cache=out.cache, use_cache=True)
