"""`vertical export --format gguf|hf`: the model for llama.cpp / Ollama and for vLLM / TGI."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from vertical.export.formats import OLLAMA_PARAMETERS, check_gguf, modelfile, write_gguf

PROMPTS = [[{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": q}]
           for q in ("What colour is the Zorblat fruit?", "0123456789", "The quick brown fox [1].")]
# Ollama's documented Modelfile instructions (its docs' "Instructions" table)
OLLAMA_INSTRUCTIONS = {"FROM", "PARAMETER", "TEMPLATE", "SYSTEM", "ADAPTER", "LICENSE", "MESSAGE", "REQUIRES"}


def parse_modelfile(text: str) -> list[tuple[str, str]]:
    """A strict reading of Ollama's Modelfile grammar: `# comment`, or INSTRUCTION followed by a
    value that is bare, "quoted" or \"\"\"triple-quoted\"\"\" (which may span lines)."""
    commands, rest = [], text
    while rest:
        rest = rest.lstrip("\n")
        if not rest:
            break
        if rest.startswith("#"):
            rest = rest.split("\n", 1)[1] if "\n" in rest else ""
            continue
        match = re.match(r"([A-Za-z]+)[ \t]+", rest)
        assert match, f"not an instruction: {rest[:40]!r}"
        name, rest = match.group(1).upper(), rest[match.end():]
        assert name in OLLAMA_INSTRUCTIONS, name
        if rest.startswith('"""'):
            end = rest.index('"""', 3)
            value, rest = rest[3:end], rest[end + 3:]
            assert rest[:1] in ("", "\n"), "text after a closing triple quote"
        else:
            value, _, rest = rest.partition("\n")
        commands.append((name, value))
    return commands


def test_gguf_reads_back_with_the_same_greedy_answers_and_tokens(tiny_model_dir, tmp_path):
    import gguf

    folder = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    written = write_gguf(folder, folder / "model.gguf", name="tiny")
    assert written["gguf_tensors"]["Q8_0"] > 0 and written["gguf_tensors"]["F32"] > 0
    reader = gguf.GGUFReader(str(folder / "model.gguf"))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == "Q8_0" and types["blk.0.attn_norm.weight"] == "F32"
    assert "output.weight" not in types  # tied to token_embd, as in the source
    assert reader.fields["tokenizer.ggml.model"].contents() == "gpt2"
    checked = check_gguf(folder, folder / "model.gguf", PROMPTS)
    assert checked["gguf_greedy_agreement"] == 1.0 and checked["gguf_tokenizer_agreement"] == 1.0
    assert checked["gguf_logit_error"] < 0.05  # Q8_0's rounding only


def test_q8_0_blocks_are_laid_out_as_gguf_reads_them():
    import gguf
    import numpy as np

    from vertical.export.gptq import q8_0_bytes, round_q8_0

    weight = np.random.default_rng(0).normal(size=(6, 64)).astype(np.float32)
    weight[2, :32] = 0.0  # a block of zeros keeps a zero scale
    scales, values = round_q8_0(weight)
    read = gguf.quants.dequantize(q8_0_bytes(scales, values), gguf.GGMLQuantizationType.Q8_0)
    expected = np.repeat(scales.astype(np.float32), 32, axis=1) * values
    assert read.shape == weight.shape and np.array_equal(read, expected)
    step = np.repeat(scales.astype(np.float32), 32, axis=1)
    assert np.all(np.abs(read - weight) <= step / 2 + 1e-6)  # without moments: the nearest grid point
    assert np.all(read[2, :32] == 0) and np.abs(values).max() == 127


def test_compensated_rounding_moves_the_layer_output_less_than_nearest():
    """On inputs whose features are correlated (as a layer's are), GPTQ's rounding must change the
    output X W^T less than rounding each weight to nearest; a wrong update order or sign makes it worse."""
    import gguf
    import numpy as np
    import torch

    from vertical.export.gptq import q8_0_bytes, round_q8_0

    rng = np.random.default_rng(1)
    inputs = rng.normal(size=(512, 64)) @ rng.normal(size=(64, 64)) + rng.normal(size=(1, 64)) * 3
    weight = rng.normal(size=(48, 64)).astype(np.float32)
    moment = torch.from_numpy(inputs.T @ inputs)

    def output_error(scales, values):
        read = gguf.quants.dequantize(q8_0_bytes(scales, values), gguf.GGMLQuantizationType.Q8_0)
        return np.linalg.norm(inputs @ (read - weight).T)
    nearest, compensated = output_error(*round_q8_0(weight)), output_error(*round_q8_0(weight, moment))
    assert compensated < 0.7 * nearest, (compensated, nearest)


def test_gguf_rounded_with_the_model_s_own_inputs_reads_back_the_same(tiny_model_dir, tmp_path):
    from vertical.export.gptq import input_moments
    from vertical.models import load_causal_lm

    folder = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    moments = input_moments(load_causal_lm(folder).eval(), [[1, 5, 9, 12, 40, 7], [3, 3, 8, 2]])
    assert "lm_head" in moments and "model.layers.0.mlp.down_proj" in moments
    written = write_gguf(folder, folder / "model.gguf", name="tiny", moments=moments)
    assert written["gguf_rounding"] == "gptq"
    checked = check_gguf(folder, folder / "model.gguf", PROMPTS)
    assert checked["gguf_greedy_agreement"] == 1.0 and checked["gguf_logit_error"] < 0.05


def test_gguf_with_q_and_k_left_in_hugging_face_order_is_caught(tiny_model_dir, tmp_path, monkeypatch):
    """The check can fail: without llama.cpp's rotary order for Q and K the logits move. A random
    tiny model attends almost uniformly, so its Q and K are sharpened first to make order matter."""
    from safetensors.torch import load_file, save_file

    from vertical.export import formats

    folder = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    weights = load_file(folder / "model.safetensors")
    save_file({k: v * 30 if ("q_proj" in k or "k_proj" in k) else v for k, v in weights.items()},
              folder / "model.safetensors", metadata={"format": "pt"})
    write_gguf(folder, folder / "right.gguf")
    monkeypatch.setattr(formats, "_llama_permute", lambda weight, heads: weight)
    write_gguf(folder, folder / "wrong.gguf")
    monkeypatch.undo()
    assert check_gguf(folder, folder / "right.gguf", PROMPTS)["gguf_logit_error"] < 0.15
    wrong = check_gguf(folder, folder / "wrong.gguf", PROMPTS)
    assert wrong["gguf_logit_error"] > 0.5 and wrong["gguf_greedy_agreement"] < 1.0


def test_modelfile_uses_documented_instructions_only(tiny_model_dir):
    text = modelfile(tiny_model_dir, "You answer from sources.", "Not advice.")
    commands = parse_modelfile(text)
    assert commands[0] == ("FROM", "./model.gguf")
    parameters = [value.split(None, 1) for name, value in commands if name == "PARAMETER"]
    assert {p[0] for p in parameters} <= set(OLLAMA_PARAMETERS)
    assert ["stop", '"<|im_end|>"'] in parameters
    system = dict(commands)["SYSTEM"]
    assert "You answer from sources." in system and "Not advice." in system
    assert "{{ .System }}" in dict(commands)["TEMPLATE"]


def test_a_model_gguf_cannot_hold_is_one_clear_error(tiny_model_dir, tmp_path):
    from vertical.errors import VerticalError

    folder = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "gpt_neox"}))
    with pytest.raises(VerticalError, match="--format hf"):
        write_gguf(folder, tmp_path / "x.gguf")


def test_export_formats_from_the_cli(exported_build, tmp_path, cli):
    import torch
    from transformers import AutoModelForCausalLM

    from vertical.generation import greedy_ids
    from vertical.models import load_causal_lm

    code, out = cli("export", str(exported_build), "--format", "gguf", "--out", str(tmp_path / "gguf"))
    assert code == 0, out
    metrics = json.loads((tmp_path / "gguf" / "metrics.json").read_text())
    assert metrics["gguf_greedy_agreement"] >= 0.9 and metrics["gguf_agreement_prompts"] >= 2
    assert metrics["gguf_quant"] == "Q8_0" and "keeps" in metrics["gguf_quant_reason"]  # auto kept Q8_0
    assert {p.name for p in (tmp_path / "gguf").iterdir()} >= {"model.gguf", "Modelfile", "README.md", "retrieval"}
    assert (tmp_path / "gguf" / "retrieval" / "index" / "chunks.jsonl").is_file()
    parse_modelfile((tmp_path / "gguf" / "Modelfile").read_text())

    code, out = cli("export", str(exported_build), "--format", "hf", "--out", str(tmp_path / "hf"))
    assert code == 0, out
    source = exported_build / metrics["source"]
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf" / "model", dtype=torch.float32)
    ids = [1, 5, 9, 12]
    assert list(greedy_ids(exported, ids, 8)) == list(greedy_ids(load_causal_lm(source), ids, 8))

    code, out = cli("export", str(exported_build), "--format", "hf", "--out", str(tmp_path / "hf"))
    assert code != 0 and "exists" in out and "Traceback" not in out
    code, out = cli("export", str(exported_build), "--format", "gguf", "--quant", "int4")
    assert code != 0 and "auto, q8_0 or f16" in out and "Traceback" not in out
    code, out = cli("export", str(exported_build), "--format", "gguf", "--quant", "f16", "--out", str(tmp_path / "f16"))
    assert code == 0, out
    f16 = json.loads((tmp_path / "f16" / "metrics.json").read_text())
    assert f16["gguf_quant"] == "F16" and f16["gguf_greedy_agreement"] == 1.0 and f16["gguf_logit_error"] < 0.01


def test_auto_writes_f16_when_q8_0_changes_greedy_answers(exported_build, tmp_path, monkeypatch, cli):
    import gguf

    from vertical.export import formats

    monkeypatch.setattr(formats, "MIN_AGREEMENT", 1.01)  # no Q8_0 file can keep more than every answer
    code, out = cli("export", str(exported_build), "--format", "gguf", "--out", str(tmp_path / "gguf"))
    assert code == 0, out
    metrics = json.loads((tmp_path / "gguf" / "metrics.json").read_text())
    assert metrics["gguf_quant"] == "F16" and "gguf_q8_0_greedy_agreement" in metrics
    assert "below" in metrics["gguf_quant_reason"] and metrics["gguf_greedy_agreement"] == 1.0
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(tmp_path / "gguf" / "model.gguf")).tensors}
    assert types["blk.0.attn_q.weight"] == "F16"
    assert "GGUF (F16)" in (tmp_path / "gguf" / "README.md").read_text()
    assert [p.name for p in (tmp_path / "gguf").glob("*.gguf")] == ["model.gguf"]
