"""Tune stage: assistant-only labels, retrieval-aware examples, LoRA outputs, resume after a kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from vertical import pipeline
from vertical.pack.schema import TuneSettings
from vertical.tune import _verdict, hyperparameters
from vertical.tune.data import IGNORE, READING_CORE, build_examples, reading_core_examples, share_evenly, tokenize


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from vertical.models import load_tokenizer

    return load_tokenizer(tiny_model_dir)


def test_labels_cover_only_assistant_turns(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Colour of Zorblat?"},
                {"role": "assistant", "content": "Purple."}, {"role": "user", "content": "And Quentar?"},
                {"role": "assistant", "content": "Cold valley."}]
    feature, truncated = tokenize(tokenizer, messages, 512)
    assert not truncated
    learned = tokenizer.decode([t for t, label in zip(feature["input_ids"], feature["labels"]) if label != IGNORE])
    assert learned == "Purple.<|im_end|>\nCold valley.<|im_end|>\n"
    assert len(feature["input_ids"]) == len(feature["labels"]) == len(feature["attention_mask"])


def test_truncation_is_reported_and_empty_answers_dropped(tokenizer):
    messages = [{"role": "user", "content": "word " * 300}, {"role": "assistant", "content": "Answer."}]
    feature, truncated = tokenize(tokenizer, messages, 64)
    assert feature is None and truncated
    feature, truncated = tokenize(tokenizer, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "long " * 100}], 64)
    assert truncated and len(feature["input_ids"]) == 64


def _with_tune(pack: Path, **settings) -> None:
    config = yaml.safe_load((pack / "pack.yaml").read_text())
    config["stages"]["tune"] = settings
    (pack / "pack.yaml").write_text(yaml.safe_dump(config))


def test_the_example_cap_is_shared_evenly_between_files():
    # file 0 is a large borrowed set, file 1 a small hand-written one, file 2 smaller than its share
    tagged = [(0, f"big{i}") for i in range(50)] + [(1, f"own{i}") for i in range(12)] + [(2, "one")]
    tagged = [tagged[i] for i in [*range(0, 63, 2), *range(1, 63, 2)]]  # any order
    chosen = share_evenly(tagged, 21)
    assert len(chosen) == 21
    assert [file for file, _ in chosen].count(0) == 10 and [file for file, _ in chosen].count(1) == 10
    assert (2, "one") in chosen
    assert chosen == [pair for pair in tagged if pair in chosen]  # the given order is kept
    assert share_evenly(tagged, None) == share_evenly(tagged, 100) == tagged


def test_retrieval_aware_examples_cite_and_refuse(tiny_pack, tmp_path):
    from vertical.index import open_index
    from vertical.pack import load_pack

    out = tmp_path / "b"
    pipeline.build(tiny_pack, out=out, steps=["index"])
    index, embedder = open_index(out)
    pack = load_pack(tiny_pack)
    settings = TuneSettings(rag_fraction=1.0, no_answer_fraction=1.0, rag_sources=2)
    examples = build_examples(pack.instructions(), pack.config.system_prompt, index, embedder, settings, seed=0)
    rag = [e for e in examples if e.kind == "rag"]
    assert rag, [e.kind for e in examples]
    for example in rag:
        user, answer = example.messages[1]["content"], example.messages[-1]["content"]
        # the model reads evidence sentences (5 by default), grouped by chunk: [1], maybe [2] and [3]
        assert "<sources>" in user and "[1]" in user and "[6]" not in user
        cited = int(answer.rsplit("[", 1)[1].rstrip("]"))
        assert f"[{cited}]" in user
    assert any(e.kind == "given-sources" for e in examples)  # the hand-written one with [1] is kept as is
    assert all(e.messages[0]["role"] == "system" for e in examples)


def test_tune_stage_outputs_and_learns(tiny_pack, tmp_path, tiny_model_dir, monkeypatch):
    from peft import PeftModel

    # fp32: bf16 rounding swamps the tiny 64-wide model's few updates (real models train in bf16)
    monkeypatch.setenv("VERTICAL_BF16", "0")
    from transformers import AutoModelForCausalLM

    # rank 16 at 1e-2 falls ~0.9 below its start; rank 4 at 3e-2 plateaued ~0.2 below it, and on an
    # AVX2-only CPU (other rounding) just short of the old 0.2 threshold (2 December)
    _with_tune(tiny_pack, epochs=12, learning_rate=1e-2, batch_size=2, gradient_accumulation=1, eval_holdout=0,
               lora_rank=16, lora_alpha=32, save_steps=100)
    out = tmp_path / "b"
    results = pipeline.build(tiny_pack, out=out, steps=["tune"], base_model=str(tiny_model_dir))
    assert [r.name for r in results] == ["base", "index", "tune"]
    metrics = json.loads((out / "tune" / "metrics.json").read_text())
    for key in ("accuracy_base", "accuracy_tuned", "train_tokens_per_s", "train_loss", "verdict", "lora_rank"):
        assert key in metrics
    assert metrics["lora_rank"] == 16 and metrics["train_tokens"] > 0
    from vertical.pack import load_pack

    pack = load_pack(tiny_pack)  # no holdout, fewer than the cap: every conversation, counted by its file
    assert list(metrics["conversations_by_file"]) == pack.config.data.instructions
    assert sum(metrics["conversations_by_file"].values()) == len(pack.instructions())
    base = AutoModelForCausalLM.from_pretrained(out / "base" / "model")
    adapted = PeftModel.from_pretrained(base, out / "tune" / "adapter")
    merged = AutoModelForCausalLM.from_pretrained(out / "tune" / "merged")
    import torch

    ids = torch.tensor([[1, 5, 9, 30, 42]])
    fresh_base = AutoModelForCausalLM.from_pretrained(out / "base" / "model")
    with torch.no_grad():
        assert torch.allclose(adapted(ids).logits, merged(ids).logits, atol=1e-4)
        assert not torch.allclose(fresh_base(ids).logits, merged(ids).logits, atol=1e-4)
    # it learned: the training loss fell well below where it started (~ln(vocab) for a random model)
    curve = metrics["train_loss_curve"]
    assert len(curve) >= 6 and sum(curve[-3:]) / 3 < sum(curve[:3]) / 3 - 0.5, curve
    assert pipeline.build(tiny_pack, out=out, steps=["tune"], base_model=str(tiny_model_dir))[-1].status == "skipped"


def test_verdict_says_worse_loudly(caplog):
    worse = _verdict({"eval_loss_base": 1.0, "eval_loss_tuned": 1.2, "accuracy_base": 0.6, "accuracy_tuned": 0.5})
    assert worse.startswith("TUNED MODEL IS WORSE THAN THE BASE") and "0.6 -> 0.5" in worse
    assert "WORSE" in caplog.text
    assert "at least as good" in _verdict({"eval_loss_base": 1.0, "eval_loss_tuned": 0.8, "accuracy_base": 0.5, "accuracy_tuned": 0.5})


def test_verdict_calls_fewer_right_answers_worse_only_beyond_chance(caplog):
    scored = {"eval_loss_base": 1.0, "eval_loss_tuned": 0.8, "accuracy_base": 0.5, "qa_questions": 20}
    noise = _verdict({**scored, "accuracy_tuned": 0.4, "qa_lost": 4, "qa_gained": 2})
    assert not noise.startswith("TUNED MODEL IS WORSE") and "within chance" in noise and "4 lost, 2 gained" in noise
    assert "0.5 -> 0.4" in caplog.text
    clear = _verdict({**scored, "accuracy_tuned": 0.2, "qa_lost": 6, "qa_gained": 0})
    assert clear.startswith("TUNED MODEL IS WORSE THAN THE BASE") and "p = 0.02" in clear


def test_defaults_by_model_size():
    settings = TuneSettings()
    assert hyperparameters(settings, 135_000_000)["learning_rate"] == 1e-3
    assert hyperparameters(settings, 7_000_000_000)["learning_rate"] == 1e-4
    assert hyperparameters(TuneSettings(lora_rank=4), 135_000_000) == {"lora_rank": 4, "lora_alpha": 8, "learning_rate": 1e-3}


def test_adapters_sit_in_the_top_layers_and_gradients_stop_there(tmp_path):
    import torch
    from peft import get_peft_model

    from tests.conftest import make_tiny_model
    from vertical.models import load_causal_lm
    from vertical.tune import lora_config, lora_targets

    base = load_causal_lm(make_tiny_model(tmp_path / "three", layers=3))
    assert lora_targets(base, TuneSettings(lora_layers=1.0)) == "all-linear"
    top_two = lora_targets(base, TuneSettings(lora_layers=0.67))
    assert {name.split(".")[2] for name in top_two} == {"1", "2"} and len(top_two) == 14  # 7 linear layers each
    assert lora_targets(base, TuneSettings(lora_layers=0.34, target_modules=["q_proj", "v_proj"])) == [
        "model.layers.2.self_attn.q_proj", "model.layers.2.self_attn.v_proj"]

    model = get_peft_model(base, lora_config(base, TuneSettings(lora_layers=0.67), hyperparameters(TuneSettings(), 1000)))
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".layers.1." in name or ".layers.2." in name for name in trainable)
    seen = {}
    layer0 = model.base_model.model.model.layers[0]
    layer0.register_forward_hook(lambda _m, _a, out: seen.update(out=out[0] if isinstance(out, tuple) else out))
    model(input_ids=torch.tensor([[3, 4, 5, 6]])).logits.sum().backward()
    assert not seen["out"].requires_grad  # nothing below the lowest adapted layer is back-propagated


@pytest.mark.slow
def test_tune_resumes_after_kill(tiny_pack, tmp_path, tiny_model_dir):
    _with_tune(tiny_pack, epochs=20, batch_size=1, gradient_accumulation=1, eval_holdout=0, eval_questions=0,
               save_steps=5, lora_rank=4)
    out = tmp_path / "b"
    pipeline.build(tiny_pack, out=out, steps=["index"], base_model=str(tiny_model_dir))
    command = [sys.executable, "-m", "vertical", "build", str(tiny_pack), "--out", str(out), "--steps", "tune",
               "--base-model", str(tiny_model_dir)]
    proc = subprocess.Popen(command, env=dict(os.environ), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while time.time() < deadline and not list((out / ".work").glob("tune/*/checkpoints/checkpoint-*")):
        time.sleep(0.2)
    assert list((out / ".work").glob("tune/*/checkpoints/checkpoint-*")), "no checkpoint was written"
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "tune").exists()
    done = subprocess.run(command, env=dict(os.environ), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    metrics = json.loads((out / "tune" / "metrics.json").read_text())
    assert metrics["resumed"] is True
    assert not (out / ".work" / "tune").exists() or not any((out / ".work" / "tune").iterdir())


@pytest.mark.slow
def test_tune_under_torchrun_two_processes(tiny_pack, tmp_path, tiny_model_dir):
    """`torchrun -m vertical build` trains on every rank (DDP over gloo here); rank 0 writes the build."""
    _with_tune(tiny_pack, epochs=2, batch_size=1, gradient_accumulation=1, eval_holdout=0, eval_questions=0, lora_rank=4)
    out = tmp_path / "b"
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "vertical", "build", str(tiny_pack),
               "--out", str(out), "--steps", "tune", "--base-model", str(tiny_model_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    metrics = json.loads((out / "tune" / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["stages"]) == {"base", "index", "tune"}
    assert (out / "tune" / "merged" / "model.safetensors").is_file()


@pytest.mark.slow
def test_tune_under_accelerate_launch_with_the_shipped_deepspeed_zero2_config(tiny_pack, tmp_path, tiny_model_dir):
    """`accelerate launch --config_file configs/accelerate/deepspeed_zero2.yaml -m vertical build`: two
    processes on CPU, the Trainer under DeepSpeed ZeRO-2."""
    _with_tune(tiny_pack, epochs=2, batch_size=1, gradient_accumulation=1, eval_holdout=0, eval_questions=0, lora_rank=4)
    out = tmp_path / "b"
    root = Path(__file__).resolve().parent.parent
    accelerate = Path(sys.executable).with_name("accelerate")
    command = [str(accelerate), "launch", "--config_file", "configs/accelerate/deepspeed_zero2.yaml", "-m", "vertical",
               "build", str(tiny_pack), "--out", str(out), "--steps", "tune", "--base-model", str(tiny_model_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=root)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    metrics = json.loads((out / "tune" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["deepspeed_zero_stage"] == 2
    assert (out / "tune" / "merged" / "model.safetensors").is_file()


def test_a_docs_only_pack_trains_on_generated_questions_and_is_scored_on_held_out_ones(tiny_pack, tmp_path,
                                                                                       tiny_model_dir):
    from vertical.scoring import eval_sample
    from vertical.scoring import normalize
    from vertical.pack import load_pack

    config = yaml.safe_load((tiny_pack / "pack.yaml").read_text())
    config["data"]["instructions"], config["data"]["qa_eval"] = [], []
    config["stages"]["tune"] = {"generated_questions": 6, "eval_questions": 4, "batch_size": 2}
    (tiny_pack / "pack.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "b"
    metrics = pipeline.build(tiny_pack, out=out, steps=["tune"], base_model=str(tiny_model_dir))[-1].metrics
    trained = [json.loads(line) for line in (out / "tune" / "generated.jsonl").read_text().splitlines()]
    held = [json.loads(line) for line in (out / "tune" / "heldout_qa.jsonl").read_text().splitlines()]
    assert trained and held and metrics["examples_by_kind"]["generated"] == len(trained) <= 6
    # the shipped worked examples stand in for the instruction data the pack lacks
    assert metrics["examples_by_kind"]["reading-core"] == len(READING_CORE.read_text().splitlines())
    assert (out / "tune" / "merged" / "model.safetensors").is_file()
    # every generated answer is a span of its document, and no held-out fact is trained on
    for record in trained:
        assert record["answer"] in record["sentence"] and record["provenance"]
    assert not {(h["doc_id"], normalize(h["answer"])) for h in held} & {(t["doc_id"], normalize(t["answer"]))
                                                                         for t in trained}
    # the build has a score: the later stages score the held-out questions
    assert [i.question for i in eval_sample(load_pack(tiny_pack), out)] and metrics["qa_questions"] > 0


def test_the_shipped_worked_examples_answer_from_their_cited_source():
    rows = [json.loads(line) for line in READING_CORE.read_text(encoding="utf-8").splitlines()]
    examples = reading_core_examples("Answer from the sources.")
    assert len(examples) == len(rows) >= 60 and {e.kind for e in examples} == {"reading-core"}
    for row, example in zip(rows, examples):
        prompt, reply = example.messages[-2]["content"], example.messages[-1]["content"]
        assert reply.startswith(f"{row['answer']} [{row['source']}].\n") and reply.endswith(f" [{row['source']}].")
        assert f"Question: {row['question']}" in prompt and row["answer"] not in row["question"]
        cited = row["sources"][row["source"] - 1]
        assert f"[{row['source']}] {cited['title']}" in prompt
        assert any(row["answer"] in sentence for sentence in cited["sentences"])


def test_pack_without_instructions_or_generated_questions_skips_training(tiny_pack, tmp_path, tiny_model_dir):
    config = yaml.safe_load((tiny_pack / "pack.yaml").read_text())
    config["data"]["instructions"] = []
    config["stages"]["tune"] = {"generated_questions": 0}
    (tiny_pack / "pack.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "b"
    results = pipeline.build(tiny_pack, out=out, steps=["tune"], base_model=str(tiny_model_dir))
    assert results[-1].metrics == {"skipped": "the pack has no instruction data"}
    assert not (out / "tune" / "merged").exists()
    from vertical.edit import source_model_dir

    assert source_model_dir(out) == out / "base" / "model"


def test_half_written_checkpoint_is_not_resumed(tmp_path):
    from vertical.models.training import last_complete_checkpoint

    (tmp_path / "checkpoint-5").mkdir()
    (tmp_path / "checkpoint-5" / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-10").mkdir()  # killed while writing: no trainer_state.json
    assert last_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-5"
    assert not (tmp_path / "checkpoint-10").exists()
    assert last_complete_checkpoint(tmp_path / "none") is None


def test_answer_loss_equals_the_models_own_loss(tokenizer, tiny_model_dir, tmp_path):
    """The trainer projects to the vocabulary only where a label is: same loss and gradients as
    the model's full-vocabulary loss, including a row with two answers and rows of unequal length."""
    import torch
    from peft import get_peft_model

    from vertical.models import load_causal_lm
    from vertical.tune import lora_config, make_trainer

    settings = TuneSettings(batch_size=3, gradient_accumulation=1, lora_rank=4, lora_dropout=0.0)
    hp = hyperparameters(settings, 1000)
    conversations = [
        [{"role": "user", "content": "Colour of Zorblat?"}, {"role": "assistant", "content": "Purple."}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where is Quentar, the old city?"},
         {"role": "assistant", "content": "In the cold valley."}, {"role": "user", "content": "And Mirrow?"},
         {"role": "assistant", "content": "By the sea."}],
        [{"role": "user", "content": "Name the river."}, {"role": "assistant", "content": "The Sable, which floods."}],
    ]
    features = [tokenize(tokenizer, messages, 512)[0] for messages in conversations]
    torch.manual_seed(0)
    base = load_causal_lm(tiny_model_dir)
    model = get_peft_model(base, lora_config(base, settings, hp))
    model.train()
    trainer = make_trainer(model, tokenizer, features, settings, hp, tmp_path / "out")
    batch = trainer.data_collator(features)
    assert (batch["labels"][:, 1:] != -100).float().mean() < 0.5  # most positions have no label

    def loss_and_grads(compute):
        model.zero_grad()
        loss = compute()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    ours, our_grads = loss_and_grads(lambda: trainer.compute_loss(model, dict(batch)))
    theirs, their_grads = loss_and_grads(lambda: model(**batch).loss)
    assert torch.allclose(ours, theirs, atol=1e-5), (ours, theirs)
    assert max(float((a - b).abs().max() / (b.abs().max() + 1e-12)) for a, b in zip(our_grads, their_grads)) < 1e-4
    # over an accumulated batch the sum is divided by the count Trainer passes, as the model does
    count = int((batch["labels"][:, 1:] != -100).sum()) * 2
    halved = trainer.compute_loss(model, dict(batch), num_items_in_batch=torch.tensor(count))
    assert torch.allclose(halved, ours / 2, atol=1e-5)


def test_training_order_is_fixed_by_the_seed_and_covers_every_epoch():
    from vertical.tune import training_order

    lengths = [5, 9, 2, 7, 3, 8, 1]
    order = training_order(lengths, 2.5, batch=1, seed=3)
    assert len(order) == round(2.5 * len(lengths))
    assert sorted(order[:7]) == sorted(order[7:14]) == list(range(7))  # each whole epoch takes every example once
    assert order[:7] != order[7:14]  # reshuffled each epoch
    assert order == training_order(lengths, 2.5, batch=1, seed=3)
    assert order != training_order(lengths, 2.5, batch=1, seed=4)
    window = training_order(list(range(200)), 1, batch=4, seed=0)  # one window of 200: batches of like length
    assert all(max(window[b:b + 4]) - min(window[b:b + 4]) == 3 for b in range(0, 200, 4))
