"""Distill stage: the student's layers, the loss, training, resume, and the re-applied edits."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from vertical import pipeline
from vertical.distill.train import distillation_loss
from vertical.distill.student import candidate_layouts, choose_layers, kept_layers, make_student, student_layer
from vertical.errors import VerticalError
from vertical.models import load_causal_lm

from conftest import fast_pack, make_tiny_model


@pytest.mark.parametrize("layers,keep,expected", [(30, 0.4, 12), (30, 0.5, 15), (4, 0.5, 2), (6, 0.01, 1)])
def test_kept_layers_are_evenly_spaced_with_first_and_last(layers, keep, expected):
    kept = kept_layers(layers, keep)
    assert len(kept) == expected and kept == sorted(set(kept))
    if expected > 1:
        assert kept[0] == 0 and kept[-1] == layers - 1


def test_edit_layer_maps_to_the_nearest_kept_layer():
    kept = kept_layers(30, 0.4)
    assert kept[student_layer(6, kept)] in (5, 6, 7)
    assert all(abs(kept[student_layer(t, kept)] - t) <= 2 for t in range(30))


def test_student_copies_the_kept_layers(tmp_path):
    teacher = load_causal_lm(make_tiny_model(tmp_path / "four", layers=4))
    kept = [0, 2, 3]
    student = make_student(teacher, kept)
    assert student.config.num_hidden_layers == 3
    for i, t in enumerate(kept):
        assert torch.equal(student.model.layers[i].mlp.down_proj.weight, teacher.model.layers[t].mlp.down_proj.weight)
    assert torch.equal(student.get_input_embeddings().weight, teacher.get_input_embeddings().weight)
    with pytest.raises(VerticalError, match="smaller"):
        make_student(teacher, [0, 1, 2, 3])
    with pytest.raises(VerticalError, match="keeps all"):
        choose_layers(teacher, 1.0, [[1, 2, 3]], 2.0)


def test_models_saved_after_training_generate_with_a_kv_cache(tmp_path):
    """Gradient checkpointing switches the KV cache off in a model's configs; a student or merged
    model saved like that once generated every token by re-running the whole sequence."""
    teacher = load_causal_lm(make_tiny_model(tmp_path / "four", layers=4))
    teacher.config.use_cache = False
    teacher.generation_config.use_cache = False
    student = make_student(teacher, [0, 3])
    assert student.config.use_cache
    student.config.use_cache = student.generation_config.use_cache = False
    student.save_pretrained(tmp_path / "student")
    loaded = load_causal_lm(tmp_path / "student")
    assert loaded.config.use_cache and loaded.generation_config.use_cache


def test_layouts_follow_the_hidden_states():
    # layers 3..6 barely change the hidden state: `block` drops them, `influence` keeps the others
    torch.manual_seed(0)
    states = [torch.randn(5, 8)]
    for layer in range(10):
        step = 0.01 if 3 <= layer <= 6 else 1.0
        states.append(states[-1] + step * torch.randn(5, 8))
    layouts = candidate_layouts(states, 6)
    assert layouts["block"] == [0, 1, 2, 7, 8, 9]
    assert layouts["influence"] == [0, 1, 2, 7, 8, 9]
    assert layouts["even"] == kept_layers(10, 0.6)


def test_chosen_layout_has_the_smallest_untrained_kl(tmp_path):
    teacher = load_causal_lm(make_tiny_model(tmp_path / "six", layers=6))
    kept, kl = choose_layers(teacher, 0.5, [[5, 9, 3, 7, 11, 2, 8], [4, 4, 6, 1]], 2.0)
    assert set(kl) == {"even", "influence", "block"} and len(kept) == 3
    assert all(value >= 0 for value in kl.values())
    best = min(kl, key=kl.get)
    assert kl[best] == min(kl.values())


def test_distillation_loss_is_zero_only_when_the_student_matches():
    torch.manual_seed(0)
    teacher = torch.randn(7, 11)  # [positions the loss reads, vocabulary]
    targets = torch.full((7,), -100)
    same, kd, ce = distillation_loss(teacher.clone(), teacher, targets, 2.0)
    assert float(kd) == pytest.approx(0.0, abs=1e-6) and float(ce) == 0.0
    student = torch.randn(7, 11, requires_grad=True)
    loss, kd, _ = distillation_loss(student, teacher, targets, 2.0)
    assert float(kd) > 0.01
    loss.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    targets[3] = 4  # a teacher-generated token adds cross-entropy
    _, _, ce = distillation_loss(student, teacher, targets, 2.0)
    assert float(ce) > 0
    only_first = torch.zeros(7)
    only_first[0] = 1.0  # all the weight on one position: the KL of that position alone
    _, kd_first, _ = distillation_loss(student, teacher, targets, 2.0, only_first)
    _, kd_alone, _ = distillation_loss(student[:1], teacher[:1], targets[:1], 2.0)
    assert float(kd_first) == pytest.approx(float(kd_alone), rel=1e-5)


def test_selected_logits_equal_the_full_forward_at_those_positions(tmp_path):
    from vertical.models import selected_logits

    model = load_causal_lm(make_tiny_model(tmp_path / "m", layers=2))
    ids = torch.tensor([[5, 9, 3, 7, 11, 2], [4, 4, 6, 1, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    rows, columns = torch.tensor([0, 0, 1]), torch.tensor([2, 5, 3])
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).logits
        picked = selected_logits(model, ids, mask, rows, columns)
    assert torch.allclose(picked, full[rows, columns], atol=1e-5)


def test_held_out_loss_is_the_models_own_loss_on_the_labelled_tokens(tmp_path):
    from vertical.scoring import mean_loss

    model = load_causal_lm(make_tiny_model(tmp_path / "m", layers=2))
    features = [{"input_ids": [5, 9, 3, 7, 11, 2], "attention_mask": [1] * 6, "labels": [-100, -100, -100, 7, 11, 2]},
                {"input_ids": [4, 4, 6, 1], "attention_mask": [1] * 4, "labels": [-100, -100, 6, 1]}]
    with torch.no_grad():  # the model's token-weighted cross-entropy: 3 + 2 labelled tokens
        losses = [float(model(input_ids=torch.tensor([f["input_ids"]]), labels=torch.tensor([f["labels"]])).loss)
                  for f in features]
    expected = (3 * losses[0] + 2 * losses[1]) / 5
    assert mean_loss(model, features, batch_size=2) == pytest.approx(expected, rel=1e-4)


def test_student_trains_on_answers_and_documents_not_on_prompts():
    from vertical.distill.data import sequence
    from vertical.distill.train import collate

    conversation = sequence(list(range(20)), [14, 15, 16, 17, 18])  # the assistant's tokens are 15..19
    assert conversation["targets"] == [-100] * 5  # KL only
    answer = sequence(list(range(100, 120)), [9, 10, 11], teacher_tokens=True)
    assert answer["targets"] == [110, 111, 112]  # the teacher's own tokens: cross-entropy too
    assert sequence([1, 2, 3], [0, 1]) is None and sequence(list(range(20)), []) is None
    batch = collate([conversation, answer], pad_id=0)
    rows, columns, weights = batch["rows"], batch["columns"], batch["weights"]
    assert rows.tolist() == [0] * 5 + [1] * 3 and columns.tolist() == [14, 15, 16, 17, 18, 9, 10, 11]
    assert float(weights[:5].sum()) == pytest.approx(0.5) and float(weights[5:].sum()) == pytest.approx(0.5)


def test_distill_stage_trains_a_smaller_student_and_reapplies_edits(exported_build):
    metrics = json.loads((exported_build / "distill" / "metrics.json").read_text())
    assert metrics["teacher"] == "edit/model"
    assert metrics["student_layers"] == 2 and metrics["teacher_layers"] == 4
    assert metrics["student_parameters"] < metrics["teacher_parameters"]
    assert metrics["kd_loss_end"] < metrics["kd_loss_start"], metrics["loss_curve"]
    assert metrics["teacher_answers"] == 4 and metrics["document_chunks"] > 0
    for key in ("teacher_score", "student_score", "speedup", "teacher_tokens_per_s", "student_tokens_per_s"):
        assert key in metrics
    edits = metrics["edits"]
    assert edits["edits"] == 1 and edits["student_layers"] == [student_layer(1, metrics["kept_layers"])]
    # a 2-layer random student's margins are too small for the efficacy value itself to mean much
    # (tests/test_edit.py checks ROME's effect); here: the edit ran on the student and was measured
    assert metrics["edit_efficacy"] == edits["after"]["efficacy"]
    assert set(edits["before"]) == set(edits["after"]) and edits["seconds_per_edit"] > 0
    student = load_causal_lm(exported_build / "distill" / "model")
    assert student.config.num_hidden_layers == 2


def test_a_later_memit_edit_is_replayed_on_the_student_with_memit(exported_build, tmp_path, cli):
    build = Path(shutil.copytree(exported_build, tmp_path / "build"))
    manifest = json.loads((build / "manifest.json").read_text())
    requests = tmp_path / "memit.jsonl"
    requests.write_text(json.dumps({"prompt": "The Siln river flows into", "subject": "Siln", "target_new": "Lake Vor",
                                    "target_true": "the sea"}) + "\n")
    code, output = cli("edit", build, "--requests", requests, "--method", "memit")
    assert code == 0, output
    result = pipeline.build(manifest["pack_dir"], out=build, steps=["distill"],
                            base_model=manifest["stages"]["base"]["inputs"]["base_model"])[-1]
    edits = result.metrics["edits"]
    assert result.status == "ran" and edits["method"] == "rome+memit" and edits["edits"] == 2
    assert [run["method"] for run in edits["runs"]] == ["rome", "memit"]
    assert set(edits["after"]) >= {"efficacy", "generalization", "locality"}


def test_a_student_that_will_not_ship_is_not_given_the_edits(exported_build, tmp_path, cli):
    import yaml

    from vertical.distill import EDITS_SKIPPED

    build = Path(shutil.copytree(exported_build, tmp_path / "build"))
    manifest = json.loads((build / "manifest.json").read_text())
    pack = Path(shutil.copytree(manifest["pack_dir"], tmp_path / "pack"))
    config = yaml.safe_load((pack / "pack.yaml").read_text())
    config["stages"]["export"]["model"] = "teacher"
    (pack / "pack.yaml").write_text(yaml.safe_dump(config))
    result = pipeline.build(pack, out=build, steps=["distill"],
                            base_model=manifest["stages"]["base"]["inputs"]["base_model"])[-1]
    assert result.status == "ran"  # the export choice is one of the stage's inputs
    assert "edits" not in result.metrics and "teacher" in result.metrics[EDITS_SKIPPED]
    # forcing that student out later would ship it without the edits: refused, saying what to do
    code, output = cli("export", build, "--model", "student")
    assert code == 1 and "lacks the build's knowledge edits" in output and "Traceback" not in output
    from vertical.evaluate import evaluate_path

    report, summary = evaluate_path(build, out=tmp_path / "report")
    assert set(summary["edits"]) == {"base", "edited", "bundle (ONNX)"}  # no student row: it has no edits
    assert "The student was not given the edits" in (report / "report.md").read_text()


def test_distill_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    from vertical.distill.train import CHECKPOINT_EVERY

    model = make_tiny_model(tmp_path / "model", layers=4)
    pack = fast_pack(tmp_path, distill={"steps": 24, "teacher_answers": 2, "answer_tokens": 8, "documents": 2,
                                        "keep_layers": 0.5})
    pipeline.build(pack, out=tmp_path / "b", steps=["index", "base"], base_model=str(model))
    from vertical.distill import train

    real_loss = train.distillation_loss
    calls = {"n": 0}

    def crash_after_22_steps(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 22:
            raise KeyboardInterrupt("simulated kill")
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(train, "distillation_loss", crash_after_22_steps)
    with pytest.raises(KeyboardInterrupt):
        pipeline.build(pack, out=tmp_path / "b", steps=["distill"], base_model=str(model))
    assert not (tmp_path / "b" / "distill").exists()  # nothing half-written in place
    monkeypatch.setattr(train, "distillation_loss", real_loss)
    result = pipeline.build(pack, out=tmp_path / "b", steps=["distill"], base_model=str(model))[-1]
    assert result.metrics["resumed_at_step"] == CHECKPOINT_EVERY
    assert result.metrics["steps"] == 24


@pytest.mark.slow
def test_a_larger_teacher_of_the_same_tokenizer_teaches_the_builds_own_model(tmp_path):
    small = make_tiny_model(tmp_path / "small", layers=2, hidden=64)
    large = make_tiny_model(tmp_path / "large", layers=4, hidden=96)
    teacher = load_causal_lm(large)
    with torch.no_grad():  # a random model is near uniform: sharpen it, so there is something to learn
        teacher.model.norm.weight.mul_(30.0)
    teacher.save_pretrained(large)
    pack = fast_pack(tmp_path, distill={"steps": 12, "teacher_answers": 2, "answer_tokens": 8, "documents": 2,
                                        "teacher": str(large)})
    pipeline.build(pack, out=tmp_path / "b", steps=["index", "base", "distill"], base_model=str(small))
    metrics = json.loads((tmp_path / "b" / "distill" / "metrics.json").read_text())
    assert metrics["teacher"] == str(large) and metrics["teacher_layers"] == 4
    assert metrics["student_layers"] == 2 and metrics["kept_layers"] == [0, 1]  # the whole small model
    assert metrics["student_parameters"] < metrics["teacher_parameters"]
    assert metrics["kd_loss_end"] < metrics["kd_loss_start"], metrics["loss_curve"]
    student = load_causal_lm(tmp_path / "b" / "distill" / "model")
    assert student.config.hidden_size == 64 and student.config.num_hidden_layers == 2
    # the teacher's weights, not only its path, are an input: new weights there run the stage again
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["stages"]["distill"]["inputs"]["teacher_sha256"]


def test_a_teacher_with_another_tokenizer_is_refused(tmp_path, tiny_model_dir):
    from vertical.distill import external_teacher
    from vertical.errors import VerticalError

    small = tiny_model_dir
    other = make_tiny_model(tmp_path / "other", layers=4, vocab=500)
    with pytest.raises(VerticalError, match=r"^stages.distill.teacher: .* has another tokenizer than the build's model"):
        external_teacher(str(other), small, tmp_path)
    with pytest.raises(VerticalError, match=r"^stages.distill.teacher: unknown base model 'no-such-model'"):
        external_teacher("no-such-model", small, tmp_path)
    # a relative path is the pack folder's, as the pack's data paths are
    assert external_teacher(small.name, small, small.parent).resolve() == small.resolve()


@pytest.mark.slow
def test_distill_under_torchrun_two_processes(tmp_path):
    """`torchrun -m vertical build --steps distill` trains the student on every rank (DDP over gloo);
    rank 0 measures, decides at the halfway check for all ranks, and writes the stage."""
    import os
    import subprocess
    import sys

    model = make_tiny_model(tmp_path / "model", layers=4)
    pack = fast_pack(tmp_path, distill={"steps": 6, "teacher_answers": 2, "answer_tokens": 8, "documents": 2,
                                        "keep_layers": 0.5})
    out = tmp_path / "b"
    pipeline.build(pack, out=out, steps=["index", "base"], base_model=str(model))
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "vertical", "build", str(pack),
               "--out", str(out), "--steps", "distill", "--base-model", str(model)]
    done = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    metrics = json.loads((out / "distill" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 6
    assert (out / "distill" / "model" / "model.safetensors").is_file()


@pytest.mark.slow
def test_distill_under_accelerate_launch_with_the_shipped_deepspeed_zero2_config(tmp_path):
    """`accelerate launch --config_file configs/accelerate/deepspeed_zero2.yaml -m vertical build
    --steps distill`: two processes on CPU, the student's Trainer under DeepSpeed ZeRO-2."""
    import os
    import subprocess
    import sys

    model = make_tiny_model(tmp_path / "model", layers=4)
    pack = fast_pack(tmp_path, distill={"steps": 6, "teacher_answers": 2, "answer_tokens": 8, "documents": 2,
                                        "keep_layers": 0.5})
    out = tmp_path / "b"
    pipeline.build(pack, out=out, steps=["index", "base"], base_model=str(model))
    root = Path(__file__).resolve().parent.parent
    accelerate = Path(sys.executable).with_name("accelerate")
    command = [str(accelerate), "launch", "--config_file", "configs/accelerate/deepspeed_zero2.yaml", "-m", "vertical",
               "build", str(pack), "--out", str(out), "--steps", "distill", "--base-model", str(model)]
    done = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600, cwd=root)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    metrics = json.loads((out / "distill" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["deepspeed_zero_stage"] == 2 and metrics["steps"] == 6
    assert (out / "distill" / "model" / "model.safetensors").is_file()


@pytest.mark.parametrize("go_on", [True, False])
def test_the_check_halfway_can_stop_the_training_there(tmp_path, go_on):
    from vertical.distill.train import train_student
    from vertical.pack.schema import DistillSettings

    teacher = load_causal_lm(make_tiny_model(tmp_path / "four", layers=4))
    student = make_student(teacher, [0, 3])
    sequences = [{"input_ids": list(range(3 + i, 15 + i)), "positions": [8, 9, 10], "targets": [-100] * 3}
                 for i in range(4)]
    calls = []

    def check() -> bool:
        calls.append(student.training)
        return go_on

    result = train_student(student, teacher, sequences, DistillSettings(steps=6, batch_size=2), 0, tmp_path, check)
    assert calls == [False]  # called once, the student in eval mode
    assert result["steps"] == (6 if go_on else 3) and len(result["loss_curve"]) == result["steps"]
    assert result["stopped_at_step"] == (None if go_on else 3)


def test_unset_steps_train_on_a_gpu_and_skip_the_student_on_a_cpu(monkeypatch):
    import torch

    from vertical.distill import GPU_STEPS, training_steps
    from vertical.pack.schema import DistillSettings

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    steps, why = training_steps(DistillSettings())
    assert steps == 0 and "skipped on a CPU" in why and "stages.distill.steps" in why
    assert training_steps(DistillSettings(steps=12))[0] == 12  # asked for: trained on a CPU too
    assert training_steps(DistillSettings(teacher="bigger"))[0] == GPU_STEPS  # so is a named teacher's student
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert training_steps(DistillSettings())[0] == GPU_STEPS


def test_a_cpu_build_with_unset_steps_makes_no_student_and_ships_the_teacher(exported_build, tmp_path, cli,
                                                                            monkeypatch):
    import torch
    import yaml

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU build, on any test machine

    build = Path(shutil.copytree(exported_build, tmp_path / "build"))
    manifest = json.loads((build / "manifest.json").read_text())
    pack = Path(shutil.copytree(manifest["pack_dir"], tmp_path / "pack"))
    config = yaml.safe_load((pack / "pack.yaml").read_text())
    del config["stages"]["distill"]["steps"]
    config["stages"]["export"]["model"] = "auto"
    (pack / "pack.yaml").write_text(yaml.safe_dump(config))
    results = pipeline.build(pack, out=build, steps=["distill", "export"],
                             base_model=manifest["stages"]["base"]["inputs"]["base_model"])
    distilled, exported = results[-2], results[-1]
    assert distilled.status == "ran" and "skipped on a CPU" in distilled.metrics["skipped"]
    assert not (build / "distill" / "model").exists()
    assert exported.metrics["model"] == "teacher" and "skipped on a CPU" in exported.metrics["model_reason"]
    code, output = cli("export", build, "--model", "student")
    assert code == 1 and "made none" in output and "Traceback" not in output
