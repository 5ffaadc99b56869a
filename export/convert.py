"""Conversion to ONNX (needs torch; runs in the build, never in the runtime).

- the language model: onnxruntime-genai's model builder (GQA attention with a KV cache,
  weight-only int4/int8 MatMulNBits or fp32), run as its documented command line;
- the sentence embedder (in the index stage): torch.onnx.export of the encoder with mean pooling
  and L2 normalisation inside the graph, then onnxruntime's dynamic int8 quantisation.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
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
    # The graph keeps every position's logits (the builder's default, not prune_lm_head): the
    # reader then scores a whole candidate span in one step of the generator instead of one step
    # per token (vertical.export.runtime.OnnxPrefilled), for a prefill up to a fifth slower
    # (the vocabulary projection of every prompt position; benchmarks/bundle_reading.py).
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
