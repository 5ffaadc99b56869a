"""Text generation with a build's torch model (the exported runtime has its own, ONNX-based)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from pathlib import Path

from vertical.errors import VerticalError

log = logging.getLogger(__name__)

# Most refined model first: what `vertical ask` and the demo use for a build.
MODEL_PREFERENCE = ("edit/model", "tune/merged", "base/model")


def best_model_dir(build_dir: Path) -> Path:
    for rel in MODEL_PREFERENCE:
        path = Path(build_dir) / rel
        if (path / "config.json").is_file():
            return path
    raise VerticalError(f"{build_dir} has no model yet; run `vertical build PACK` first")


class ChatModel:
    """A causal LM and its tokenizer, answering chat messages greedily (deterministic)."""

    def __init__(self, model_dir: Path):
        from vertical.models import load_causal_lm, load_tokenizer

        self.model_dir = Path(model_dir)
        self.tokenizer = load_tokenizer(self.model_dir)
        self.model = load_causal_lm(self.model_dir)
        if not self.tokenizer.chat_template:
            raise VerticalError(f"{model_dir}: the tokenizer has no chat template; use an instruct/chat model")

    def _inputs(self, messages: list[dict[str, str]]):
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                  return_dict=True)

    def generate(self, messages: list[dict[str, str]], max_new_tokens: int = 200) -> str:
        return "".join(self.stream(messages, max_new_tokens))

    def stream(self, messages: list[dict[str, str]], max_new_tokens: int = 200) -> Iterator[str]:
        import torch
        from transformers import TextIteratorStreamer

        inputs = self._inputs(messages)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        kwargs = dict(**inputs, max_new_tokens=max_new_tokens, do_sample=False, streamer=streamer,
                      pad_token_id=self.tokenizer.pad_token_id)
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
        yield from streamer
        thread.join()
        if errors:
            raise errors[0]
