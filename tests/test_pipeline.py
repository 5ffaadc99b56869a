"""Build orchestration: manifest, skipping, forced reruns, corruption detection, crash safety."""

from __future__ import annotations

import json

import pytest

from vertical import pipeline
from vertical.errors import VerticalError
from vertical.io import read_json


def _build(pack, out, model, **kw):
    return pipeline.build(pack, out=out, base_model=str(model), **kw)


def test_base_stage_runs_then_skips(tiny_pack, tiny_model_dir, tmp_path):
    out = tmp_path / "b"
    first = _build(tiny_pack, out, tiny_model_dir, steps=["base"])
    assert [(r.name, r.status) for r in first] == [("base", "ran")]
    manifest = read_json(out / "manifest.json")
    entry = manifest["stages"]["base"]
    assert manifest["pack"] == "tiny"
    assert entry["inputs"]["kind"] == "hf-folder"
    assert "model/model.safetensors" in entry["files"]
    assert (out / "base" / "metrics.json").is_file()
    assert read_json(out / "base" / "metrics.json")["parameters"] > 0
    second = _build(tiny_pack, out, tiny_model_dir, steps=["base"])
    assert second[0].status == "skipped"
    forced = _build(tiny_pack, out, tiny_model_dir, steps=["base"], force=["base"])
    assert forced[0].status == "ran"


def test_changed_input_reruns(tiny_pack, tiny_model_dir, tmp_path):
    from conftest import make_tiny_model

    out = tmp_path / "b"
    _build(tiny_pack, out, tiny_model_dir, steps=["base"])
    other = make_tiny_model(tmp_path / "other-model", layers=3)
    result = _build(tiny_pack, out, other, steps=["base"])
    assert result[0].status == "ran"
    assert read_json(out / "base" / "metrics.json")["num_hidden_layers"] == 3


@pytest.mark.parametrize("damage", ["truncate", "delete", "flip"])
def test_corrupt_artifact_is_detected_and_rebuilt(tiny_pack, tiny_model_dir, tmp_path, damage):
    out = tmp_path / "b"
    _build(tiny_pack, out, tiny_model_dir, steps=["base"])
    target = out / "base" / "model" / "config.json"
    good = target.read_bytes()
    target.unlink()  # break the hard link so the source model stays intact
    if damage == "truncate":
        target.write_bytes(good[: len(good) // 2])
    elif damage == "flip":
        target.write_bytes(good.replace(b"llama", b"LLAMA"))
    result = _build(tiny_pack, out, tiny_model_dir, steps=["base"])
    assert result[0].status == "ran"
    assert target.read_bytes() == good


def test_failed_stage_leaves_previous_output_and_manifest(tiny_pack, tiny_model_dir, tmp_path, monkeypatch):
    out = tmp_path / "b"
    _build(tiny_pack, out, tiny_model_dir, steps=["base"])
    before_manifest = (out / "manifest.json").read_bytes()
    before_files = sorted(p.name for p in (out / "base").iterdir())

    def explode(ctx, tmp):
        (tmp / "half-written.bin").write_bytes(b"x" * 10)
        raise RuntimeError("killed mid-stage")

    monkeypatch.setattr("vertical.base.run", explode)
    with pytest.raises(RuntimeError):
        _build(tiny_pack, out, tiny_model_dir, steps=["base"], force=["base"])
    assert (out / "manifest.json").read_bytes() == before_manifest
    assert sorted(p.name for p in (out / "base").iterdir()) == before_files
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp-")]


def test_stale_tmp_from_a_kill_is_cleaned(tiny_pack, tiny_model_dir, tmp_path):
    out = tmp_path / "b"
    (out / ".tmp-base-deadbeef").mkdir(parents=True)
    (out / ".tmp-base-deadbeef" / "model.safetensors").write_bytes(b"partial")
    result = _build(tiny_pack, out, tiny_model_dir, steps=["base"])
    assert result[0].status == "ran"
    assert not (out / ".tmp-base-deadbeef").exists()


def test_corrupt_manifest_rebuilds(tiny_pack, tiny_model_dir, tmp_path):
    out = tmp_path / "b"
    _build(tiny_pack, out, tiny_model_dir, steps=["base"])
    (out / "manifest.json").write_text('{"stages": {"base": ', encoding="utf-8")
    result = _build(tiny_pack, out, tiny_model_dir, steps=["base"])
    assert result[0].status == "ran"
    assert json.loads((out / "manifest.json").read_text())["stages"]["base"]["files"]


def test_unknown_stage_and_other_pack_are_refused(tiny_pack, tiny_model_dir, tmp_path):
    with pytest.raises(VerticalError, match="unknown stage 'bogus'"):
        _build(tiny_pack, tmp_path / "b", tiny_model_dir, steps=["bogus"])
    out = tmp_path / "c"
    _build(tiny_pack, out, tiny_model_dir, steps=["base"])
    manifest = read_json(out / "manifest.json")
    manifest["pack"] = "someone-else"
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(VerticalError, match="holds a build of pack 'someone-else'"):
        _build(tiny_pack, out, tiny_model_dir, steps=["base"])


def test_cli_build_errors_are_one_line(cli, tiny_pack, tmp_path):
    code, output = cli("build", tiny_pack, "--out", tmp_path / "b", "--base-model", "gpt-17-ultra")
    assert code != 0 and "unknown base model 'gpt-17-ultra'" in output and "Traceback" not in output
    code, output = cli("build", tiny_pack, "--out", tmp_path / "b", "--base-model", tmp_path / "nothing.gguf")
    assert code != 0 and "does not exist" in output
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"not a gguf at all")
    code, output = cli("build", tiny_pack, "--out", tmp_path / "b", "--base-model", fake)
    assert code != 0 and "not a GGUF file" in output
    code, output = cli("build", tiny_pack, "--steps", "base,nope")
    assert code != 0 and "unknown stage 'nope'" in output


def test_cli_build_runs(cli, tiny_pack, tiny_model_dir, tmp_path):
    code, output = cli("build", tiny_pack, "--out", tmp_path / "b", "--base-model", tiny_model_dir, "--steps", "base")
    assert code == 0, output
    assert "base" in output and "ran" in output
