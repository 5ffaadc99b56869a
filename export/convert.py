"""Conversion to ONNX (needs torch; runs in the build, never in the runtime).

- the language model: onnxruntime-genai's model builder (GQA attention with a KV cache,
  weight-only int4/int8 MatMulNBits or fp32), run as its documented command line;
- the sentence embedder (in the index stage): torch.onnx.export of the encoder with mean pooling
  and L2 normalisation inside the graph, then onnxruntime's dynamic int8 quantisation.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

from vertical.errors import VerticalError

log = logging.getLogger(__name__)

QUANTS = ("int4", "int8", "fp32")


def export_language_model(model_dir: Path, out: Path, quant: str, scratch: Path) -> Path:
    """Build `out` (an onnxruntime-genai model folder) from a Hugging Face folder."""
    if quant not in QUANTS:
        raise VerticalError(f"--quant {quant}: choose one of {', '.join(QUANTS)}")
    cache = scratch / "builder-cache"
    command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(model_dir), "-o", str(out),
               "-p", quant, "-e", "cpu", "-c", str(cache)]
    if quant != "fp32":  # prefill computes logits for the last position only
        command += ["--extra_options", "prune_lm_head=true"]
    log.info("export: %s", " ".join(command))
    result = subprocess.run(command, capture_output=True, text=True)
    shutil.rmtree(cache, ignore_errors=True)
    if result.returncode != 0 or not (out / "genai_config.json").is_file():
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-5:])
        raise VerticalError(f"onnxruntime-genai's model builder failed for {model_dir} ({quant}):\n{tail}")
    if quant != "int4":
        halve_embedding_table(out / "model.onnx")
    return out


def halve_embedding_table(model_path: Path) -> None:
    """Store the token-embedding table in float16 and cast looked-up rows back to float32.

    The builder quantises the MatMuls but keeps the embedding table (vocabulary x hidden, the
    largest single tensor of a small model) in float32 unless the precision is int4. Rows of the
    table are only looked up, never multiplied, so float16 loses nothing that matters and the
    bundle shrinks by half the table.
    """
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(model_path))
    initializers = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type != "Gather" or node.input[0] not in initializers:
            continue
        table = initializers[node.input[0]]
        if table.data_type != onnx.TensorProto.FLOAT or len(table.dims) != 2:
            continue
        half = numpy_helper.from_array(numpy_helper.to_array(table).astype(np.float16), table.name)
        table.CopyFrom(half)
        rows, cast = node.output[0], node.output[0] + "_fp16"
        node.output[0] = cast
        position = list(model.graph.node).index(node)
        model.graph.node.insert(position + 1, helper.make_node("Cast", [cast], [rows], to=onnx.TensorProto.FLOAT,
                                                               name=node.name + "/CastToFloat"))
        break
    else:
        return
    data = model_path.with_name(model_path.name + ".data")
    data.unlink(missing_ok=True)
    onnx.save_model(model, str(model_path), save_as_external_data=True, all_tensors_to_one_file=True,
              location=data.name, size_threshold=1024)


# The files of each embedder exported in this process, by (model folder, quantize): an export takes
# ~8 s, one process (a test session, a script) may build many indexes, and so each gets the same bytes.
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


def prefix_agreement(reference: list[int], other: list[int]) -> float:
    """Share of the reference's greedy tokens the other reproduces before the first difference."""
    if not reference:
        return 1.0 if not other else 0.0
    same = 0
    for a, b in zip(reference, other):
        if a != b:
            break
        same += 1
    return same / len(reference)
