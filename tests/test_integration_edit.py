"""Integration: ROME on the real default model changes a fact it knows, and rolls back exactly."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from vertical import pipeline

pytestmark = pytest.mark.integration

EIFFEL = {
    "prompt": "The Eiffel Tower is located in the city of", "subject": "Eiffel Tower", "target_new": "Rome",
    "target_true": "Paris", "rephrase": ["The Eiffel Tower can be found in the city of"],
    "locality": [{"prompt": "The capital of Germany is", "target": "Berlin"}],
}


def test_rome_on_default_model_and_rollback(tiny_pack, tmp_path, default_model_dir, cli):
    (tiny_pack / "edits" / "edits.jsonl").write_text(json.dumps(EIFFEL) + "\n")
    config = yaml.safe_load((tiny_pack / "pack.yaml").read_text())
    config["stages"]["edit"] = {"method": "rome", "hparams": {"layer": 6, "context_templates": 2, "mom2_tokens": 3000}}
    (tiny_pack / "pack.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "b"
    pipeline.build(tiny_pack, out=out, steps=["edit"], base_model=str(default_model_dir))
    metrics = json.loads((out / "edit" / "metrics.json").read_text())
    assert metrics["before"]["efficacy"] == 0.0  # the model knows the tower is in Paris
    assert metrics["after"]["efficacy"] == 1.0 and metrics["after"]["generalization"] == 1.0
    assert metrics["after"]["locality"] == 1.0

    code, output = cli("edit", "rollback", out)
    assert code == 0, output
    base = load_file(str(out / "base" / "model" / "model.safetensors"))
    restored = load_file(str(out / "edit" / "model" / "model.safetensors"))
    assert base.keys() == restored.keys()
    assert all(torch.equal(base[k], restored[k]) for k in base)


def test_an_edit_with_its_document_change_is_what_ask_answers_and_cites(tiny_pack, tmp_path, default_model_dir, cli):
    """The weights and the retrieved source say the new value: `vertical ask` answers it from the
    changed document."""
    config = yaml.safe_load((tiny_pack / "pack.yaml").read_text())
    config["stages"]["edit"] = {"method": "rome", "hparams": {"layer": 6, "context_templates": 2, "mom2_tokens": 3000}}
    (tiny_pack / "pack.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "b"
    pipeline.build(tiny_pack, out=out, steps=["index", "edit"], base_model=str(default_model_dir))
    requests = tmp_path / "mayor.jsonl"
    requests.write_text(json.dumps({
        "prompt": "The mayor of Quentar is", "subject": "Quentar", "target_new": "Lena Holt", "target_true": "Ada Morrow",
        "document": {"doc_id": "quentar", "old": "mayor is Ada Morrow", "new": "mayor is Lena Holt"}}) + "\n")
    code, output = cli("edit", out, "--requests", requests)
    assert code == 0, output
    code, output = cli("ask", out, "Who is the mayor of Quentar?", "--json")
    assert code == 0, output
    reply = json.loads(output[output.index("{"):])
    assert "Lena Holt" in reply["answer"] and "Ada Morrow" not in reply["answer"]
    cited = [c["doc_id"] for c in reply["citations"]]
    assert cited and cited[0] == "quentar"
    assert any("Lena Holt" in e["text"] for e in reply["evidence"] if e["doc_id"] == "quentar")
