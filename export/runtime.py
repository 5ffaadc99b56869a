"""The torch-free runtime: answer questions from a verified bundle with onnxruntime only.

    load_models(bundle, manifest) -> (OnnxEmbedder, OnnxChatModel); vertical.answer.open_bundle
    puts them together with the bundle's index into an Assistant.

Nothing here imports torch or transformers (tests/test_export.py checks it in a fresh process):
the language model runs in onnxruntime-genai, the embedder in onnxruntime with the `tokenizers`
library, and the index is vertical's torch-free store.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from vertical.errors import VerticalError
from vertical.evidence import NumberCopy, NumberVocabulary
from vertical.prompting import register_special_tokens
from vertical.reader import log_softmax

log = logging.getLogger(__name__)

# Plain greedy decoding, as the torch path (vertical.generation) and the QA evaluation: no repetition
# penalty, because it also penalises the prompt's tokens, i.e. copying facts from the retrieved
# sources (docs/export.md, decoding, measures what a penalty of 1.1 costs).


class OnnxEmbedder:
    """Mean-pooled, L2-normalised sentence embeddings from an ONNX encoder (exported by vertical)."""

    def __init__(self, folder: Path, threads: int = 0):
        import onnxruntime as ort
        from tokenizers import Tokenizer

        info = json.loads((folder / "embedder.json").read_text(encoding="utf-8"))
        self.dim = int(info["dim"])
        self.max_tokens = int(info["max_tokens"])
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tokenizer.enable_truncation(self.max_tokens)
        self.tokenizer.enable_padding(pad_id=int(info["pad_id"]), pad_token=info["pad_token"])
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])
        self._inputs = {i.name for i in self.session.get_inputs()}

    def encode(self, texts: list[str], batch_size: int = 1,
               track: Callable[[Iterable, int, str], Iterator] | None = None) -> np.ndarray:
        """One text per run by default: the int8 graph quantises a run's activations with one scale,
        so alone a text's vector never depends on its batchmates, and nothing is padded (medical's
        chunks: 61.7 chunks/s alone, 50.4 in batches of 64, benchmarks/embedder.py)."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        batches = [texts[i:i + batch_size] for i in range(0, len(texts), batch_size)]
        iterator = track(batches, len(batches), f"embedding {len(texts)} texts") if track else batches
        parts = []
        for batch in iterator:
            encoded = self.tokenizer.encode_batch(batch)
            feeds = {"input_ids": np.array([e.ids for e in encoded], dtype=np.int64),
                     "attention_mask": np.array([e.attention_mask for e in encoded], dtype=np.int64),
                     "token_type_ids": np.array([e.type_ids for e in encoded], dtype=np.int64)}
            parts.append(self.session.run(None, {k: v for k, v in feeds.items() if k in self._inputs})[0])
        return np.concatenate(parts).astype(np.float32)

    def encode_query(self, texts: list[str]) -> np.ndarray:
        """Embed queries; a query longer than the embedder's window is truncated, with a warning."""
        for text in texts:
            if self.tokenizer.encode(text).overflowing:
                log.warning("a query longer than the embedder's %d tokens was truncated", self.max_tokens)
        return self.encode(texts)


def _usable_cpus() -> int:
    """The CPUs this process may run on (taskset, cgroups, systemd's CPUAffinity= limit them)."""
    if hasattr(os, "sched_getaffinity"):  # Linux
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


# tokens a second reading may append after the prompt: the longest candidate span and its citation
READING_ROOM = 64


class PromptTooLong(VerticalError):
    """The prompt and the requested answer do not fit in the model's context window."""


class OnnxChatModel:
    """A chat model in onnxruntime-genai; one generator per request, so concurrent requests share
    the weights but never their state."""

    def __init__(self, folder: Path, threads: int = 0):
        import onnxruntime_genai as og

        self._og = og
        self.folder = Path(folder)
        # onnxruntime-genai runs the decoder on one thread unless told otherwise; running it on every
        # CPU this process may use about halves a retrieval prompt's prefill on two cores.
        og_config = og.Config(str(folder))
        threads = threads or _usable_cpus()
        og_config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
        self.model = og.Model(og_config)
        self.tokenizer = og.Tokenizer(self.model)
        config = json.loads((folder / "genai_config.json").read_text(encoding="utf-8"))
        self.context_length = int(config["model"]["context_length"])
        self.vocabulary_size = int(config["model"]["vocab_size"])
        self._numbers: NumberVocabulary | None = None
        tokenizer_file = folder / "tokenizer.json"
        if tokenizer_file.is_file():  # its control tokens, so that no document can write one
            added = json.loads(tokenizer_file.read_text(encoding="utf-8")).get("added_tokens", [])
            register_special_tokens([t.get("content") for t in added if t.get("special")])
        self._lock = threading.Lock()  # tokenizer calls are cheap; keep them serial to be safe
        self._recent = threading.local()  # per thread: the last answer's generator, for its second reading

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        with self._lock:
            text = self.tokenizer.apply_chat_template(json.dumps(messages), add_generation_prompt=True)
            return list(self.tokenizer.encode(text))

    def stream(self, messages: list[dict[str, str]], max_new_tokens: int = 200,
               stop: threading.Event | None = None, numbers: set[str] | None = None) -> Iterator[str]:
        """Text pieces of the greedy answer; setting `stop` ends generation at the next token;
        with `numbers`, the only numbers it may write (vertical.evidence.NumberCopy)."""
        yield from self.stream_ids(self.prompt_ids(messages), max_new_tokens, stop, numbers)

    def stream_ids(self, ids: list[int], max_new_tokens: int, stop: threading.Event | None = None,
                   numbers: set[str] | None = None) -> Iterator[str]:
        og = self._og
        if len(ids) + 1 > self.context_length:
            raise PromptTooLong(f"the prompt is {len(ids)} tokens; the model's context is {self.context_length}")
        params = og.GeneratorParams(self.model)
        max_length = min(len(ids) + max_new_tokens, self.context_length)
        params.set_search_options(max_length=max_length, do_sample=False)
        generator = og.Generator(self.model, params)
        generator.append_tokens(ids)
        first = np.array(generator.get_logits(), dtype=np.float32)  # the prompt's, before any rule
        rule = NumberCopy(numbers, self.number_vocabulary) if numbers is not None else None
        with self._lock:
            decoder = self.tokenizer.create_stream()
        text = ""
        try:
            while not generator.is_done() and not (stop is not None and stop.is_set()):
                if rule is not None:  # the greedy pick is taken from the logits as set here
                    logits = np.array(generator.get_logits(), dtype=np.float32)
                    blocked = rule.blocked(text)
                    logits[..., : blocked.shape[0]][..., blocked] = np.float32(-1e9)
                    generator.set_logits(logits)
                generator.generate_next_token()
                token = int(generator.get_next_tokens()[0])
                if generator.is_done() and token in self.eos_ids:
                    break
                piece = decoder.decode(token)
                text += piece
                yield piece
        finally:  # also when the caller stops reading: the answer was cut at a loop or two sentences
            if max_length - len(ids) >= READING_ROOM:
                self._recent.reading = (tuple(ids), generator, first)

    def piece_ids(self, text: str) -> list[int]:
        with self._lock:
            return [int(t) for t in self.tokenizer.encode(text)]

    def prefill(self, ids: list[int]) -> "OnnxPrefilled":
        """The prompt read once, for extractive answers (vertical.reader): where the last answer
        this thread streamed had the same prompt, its generator rewound to the prompt (the same
        state, without a second prefill: about 0.7 s of a retrieval prompt on two cores), else a
        new generator that reads it."""
        recent, self._recent.reading = getattr(self._recent, "reading", None), None
        if recent is not None and recent[0] == tuple(ids):
            _, generator, first = recent
            generator.rewind_to(len(ids))
            return OnnxPrefilled(generator, len(ids), first)
        return OnnxPrefilled.read(self, ids)

    @property
    def number_vocabulary(self) -> NumberVocabulary:
        if self._numbers is None:
            with self._lock:
                self._numbers = NumberVocabulary([self.tokenizer.decode([i]) for i in range(self.vocabulary_size)])
        return self._numbers

    @property
    def eos_ids(self) -> set[int]:
        return {int(t) for t in self.tokenizer.eos_token_ids}

    def generate(self, messages: list[dict[str, str]], max_new_tokens: int = 200,
                 numbers: set[str] | None = None) -> str:
        return "".join(self.stream(messages, max_new_tokens, numbers=numbers))

    def greedy_ids(self, ids: list[int], max_new_tokens: int) -> list[int]:
        """Token ids of the greedy continuation (for comparing quantisations)."""
        og = self._og
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=min(len(ids) + max_new_tokens, self.context_length), do_sample=False)
        generator = og.Generator(self.model, params)
        generator.append_tokens(ids)
        while not generator.is_done():
            generator.generate_next_token()
        return [int(t) for t in generator.get_sequence(0)[len(ids):]]


class OnnxPrefilled:
    """An onnxruntime-genai generator after one pass over a prompt (vertical.reader.Prefilled)."""

    def __init__(self, generator, prompt_length: int, first_logits: np.ndarray | None = None):
        """`generator` holds the prompt's `prompt_length` tokens and nothing after them;
        `first_logits`: the logits it gave after the prompt, where it has moved on since."""
        self._generator, self._prompt_length = generator, prompt_length
        self.first = log_softmax(generator.get_logits() if first_logits is None else first_logits)
        self._every_position = True  # whether the graph returns the logits of every appended token

    @classmethod
    def read(cls, chat: OnnxChatModel, ids: list[int], longest: int = READING_ROOM) -> "OnnxPrefilled":
        """A new generator of `chat`'s model that reads `ids`, with room for paths of `longest` tokens."""
        og = chat._og
        if len(ids) + longest > chat.context_length:
            raise PromptTooLong(f"the prompt is {len(ids)} tokens; the model's context is {chat.context_length}")
        params = og.GeneratorParams(chat.model)
        params.set_search_options(max_length=len(ids) + longest)
        generator = og.Generator(chat.model, params)
        generator.append_tokens(ids)
        return cls(generator, len(ids))

    def follow(self, paths: list[list[int]]) -> list[list[float]]:
        # Paths in sorted order share their longest prefixes with their neighbours, so the generator
        # is rewound only to where the next path departs (a trie walked depth first) and the rest of
        # the path is appended in one step: "5 mg [1]" and "5 mg twice daily [1]" read "5 mg" once.
        self._generator.rewind_to(self._prompt_length)  # what an earlier call appended goes
        appended: list[int] = []
        after: list[np.ndarray] = []  # log P of the next token after each appended token
        rows: list[list[float]] = [[] for _ in paths]
        for index in sorted(range(len(paths)), key=lambda i: paths[i]):
            path = paths[index]
            keep = 0
            while keep < min(len(appended), len(path) - 1) and appended[keep] == path[keep]:
                keep += 1
            if keep < len(appended):
                self._generator.rewind_to(self._prompt_length + keep)
                del appended[keep:], after[keep:]
            after += self._append(path[keep:-1])
            appended += path[keep:-1]
            rows[index] = [float(self.first[path[0]])] + [float(after[j][path[j + 1]]) for j in range(len(path) - 1)]
        return rows

    def _append(self, tokens: list[int]) -> list[np.ndarray]:
        """Append `tokens` to the generator: log P of the next token after each of them."""
        if not tokens:
            return []
        if self._every_position:
            self._generator.append_tokens(tokens)
            logits = np.asarray(self._generator.get_output("logits"))
            logits = logits.reshape(-1, logits.shape[-1])
            if len(logits) == len(tokens):
                return [log_softmax(row) for row in logits]
            # a graph that keeps the last position's logits only (exported with the builder's
            # prune_lm_head): the same scores, one token at a time
            self._every_position = False
            self._generator.rewind_to(self._generator.get_sequence(0).shape[0] - len(tokens))
        steps = []
        for token in tokens:
            self._generator.append_tokens([token])
            steps.append(log_softmax(self._generator.get_logits()))
        return steps


def _installed(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def _load(what: str, path: Path, manifest: dict[str, Any], packages: list[str], make: Callable[[], Any]):
    """`make()`, with a failure of the ONNX libraries turned into one line that compares the
    versions the bundle was exported with to the ones installed (the usual cause)."""
    try:
        return make()
    except Exception as exc:  # onnxruntime raises its own exception types for unreadable models
        exported = manifest.get("versions", {})
        versions = ", ".join(f"{p} {exported.get(p, '?')} exported / {_installed(p)} here" for p in packages)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise VerticalError(f"bundle {path}: cannot load the {what} ({first}); {versions}: install the "
                            "versions it was exported with") from None


def load_models(path: Path, manifest: dict[str, Any]) -> tuple["OnnxEmbedder", "OnnxChatModel"]:
    """A bundle's embedder and language model; a failure to load either is one line naming the
    versions it was exported with and the ones installed."""
    embedder = _load("embedder", path, manifest, ["onnxruntime", "tokenizers"], lambda: OnnxEmbedder(path / "embedder"))
    model = _load("language model", path, manifest, ["onnxruntime-genai"], lambda: OnnxChatModel(path / "model"))
    return embedder, model
