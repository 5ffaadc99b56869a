"""Integration: the real default base model, converted from its GGUF, killed and resumed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vertical.io import read_json

pytestmark = pytest.mark.integration


def _vertical(*args: str, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "vertical", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_default_model_converts_survives_kill_and_skips(tiny_pack, tmp_path):
    env = dict(os.environ)
    cache = Path(env["VERTICAL_CACHE"])
    out = tmp_path / "build"

    # 1. kill -9 while the GGUF is being converted into the cache
    proc = _vertical("build", str(tiny_pack), "--steps", "base", "--out", str(out), env=env)
    deadline = time.time() + 120
    while time.time() < deadline:
        tmp_dirs = list((cache / "models").glob(".tmp-*")) if (cache / "models").is_dir() else []
        if tmp_dirs:
            break
        time.sleep(0.2)
    assert tmp_dirs, "conversion never started"
    time.sleep(2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "base").exists()
    assert not any(p.name.startswith("smollm2") and not p.name.endswith(".lock") for p in (cache / "models").iterdir())

    # 2. the next run completes the conversion and the stage
    proc = _vertical("build", str(tiny_pack), "--steps", "base", "--out", str(out), env=env)
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output
    assert not list((cache / "models").glob(".tmp-*"))
    entry = read_json(out / "manifest.json")["stages"]["base"]
    assert entry["inputs"]["sha256"] == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    assert entry["metrics"]["num_hidden_layers"] == 30

    # 3. a second run skips the stage
    proc = _vertical("build", str(tiny_pack), "--steps", "base", "--out", str(out), env=env)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "skipped" in output, output

    # 4. the converted model is the real instruct model: it answers a simple question
    from vertical.models import load_causal_lm, load_tokenizer

    model_dir = out / "base" / "model"
    tokenizer, model = load_tokenizer(model_dir), load_causal_lm(model_dir)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    generated = model.generate(**ids, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(generated[0][ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer
