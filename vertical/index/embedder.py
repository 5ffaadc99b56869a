"""The index's sentence embedder as one ONNX graph (token ids -> normalised mean-pooled vector),
int8 by default: the index stage embeds the chunks with it, and the bundle embeds questions with
the very same file, so the build and the deployment search alike."""

from __future__ import annotations

import json
import logging
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

from vertical.errors import VerticalError

_EXPORTED: dict[tuple[str, bool], dict[str, bytes]] = {}


def export_embedder(spec: str, out: Path, quantize: bool = True) -> dict:
    """The sentence embedder as one ONNX graph (ids -> normalised mean-pooled vector)."""
    from vertical.models.registry import resolve_embedder

    key = (str(resolve_embedder(spec)), quantize)
    if key not in _EXPORTED:
        with tempfile.TemporaryDirectory() as scratch:
            _export_embedder(spec, Path(scratch), quantize)
            _EXPORTED[key] = {p.name: p.read_bytes() for p in sorted(Path(scratch).iterdir())}
    out.mkdir(parents=True, exist_ok=True)
    for name, data in _EXPORTED[key].items():
        (out / name).write_bytes(data)
    return json.loads(_EXPORTED[key]["embedder.json"])


def _export_embedder(spec: str, out: Path, quantize: bool) -> None:
    import torch
    from sentence_transformers import SentenceTransformer

    from vertical.models.registry import resolve_embedder

    st = SentenceTransformer(str(resolve_embedder(spec)), device="cpu", local_files_only=True)
    encoder = st[0].auto_model.eval()
    tokenizer = st.tokenizer

    class Pooled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = encoder

        def forward(self, input_ids, attention_mask, token_type_ids):
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                                  token_type_ids=token_type_ids).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, dim=-1)

    out.mkdir(parents=True, exist_ok=True)
    sample = tokenizer(["a short text", "a somewhat longer second text"], padding=True, return_tensors="pt")
    if "token_type_ids" not in sample:
        raise VerticalError(f"embedder {spec}: only BERT-style encoders (with token_type_ids) can be exported")
    batch, length = torch.export.Dim("batch"), torch.export.Dim("length")
    full = out / "model.fp32.onnx"
    with _library_advice_hidden():
        torch.onnx.export(Pooled().eval(), (sample["input_ids"], sample["attention_mask"], sample["token_type_ids"]),
                          str(full), input_names=["input_ids", "attention_mask", "token_type_ids"],
                          output_names=["sentence_embedding"], dynamo=True, external_data=False, verbose=False,
                          dynamic_shapes={name: {0: batch, 1: length}
                                          for name in ("input_ids", "attention_mask", "token_type_ids")})
        if quantize:
            from onnxruntime.quantization import QuantType, quantize_dynamic

            quantize_dynamic(str(full), str(out / "model.onnx"), weight_type=QuantType.QInt8)
            full.unlink()
        else:
            full.rename(out / "model.onnx")
    tokenizer.backend_tokenizer.save(str(out / "tokenizer.json"))
    info = {"spec": spec, "dim": int(encoder.config.hidden_size), "max_tokens": int(st.max_seq_length),
            "pad_id": int(tokenizer.pad_token_id), "pad_token": tokenizer.pad_token, "pooling": "mean",
            "normalized": True, "quantized": quantize}
    (out / "embedder.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


@contextmanager
def _library_advice_hidden():
    """The embedder export's known library chatter, hidden from the build's output: torch.onnx's
    notes on optional operators (torchvision's) and renamed axes, and onnxruntime's suggestion to
    pre-process before quantising (its shape inference; dynamic int8 of this encoder works without).
    Errors still surface."""
    loggers = [logging.getLogger(), logging.getLogger("torch.onnx")]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
