"""Stage `tune`: LoRA supervised fine-tuning on the pack's instructions and on questions generated
from its documents, measured against the base.

    instructions -> examples (some with retrieved evidence, some "I don't know")
    documents -> generated questions whose answer is a span of their evidence -> tune/generated.jsonl
    -> chat template, loss on assistant tokens -> transformers Trainer + PEFT LoRA -> tune/adapter/, tune/merged/

A pack without evaluation items gets a held-out split of the generated questions
(tune/heldout_qa.jsonl), never trained on, so every later stage has a score to go by.

Training runs on transformers' Trainer, so checkpoints, resume after a kill (from the build's
scratch folder), gradient accumulation and devices are Trainer's. Before and after training the
stage measures the loss on held-out examples and QA accuracy with retrieval, and says loudly
when the tuned model is worse than the base.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

from vertical.errors import VerticalError
from vertical.io import sha256_file, sha256_text
from vertical.models.training import last_complete_checkpoint

log = logging.getLogger(__name__)


def inputs(ctx) -> dict[str, Any]:
    from vertical.scoring import sample_inputs
    from vertical.tune.data import READING_CORE

    pack = ctx.pack
    return {
        "instructions": pack.fingerprint("instructions"),
        "system_prompt": sha256_text(pack.config.system_prompt),
        "settings": pack.config.stages.tune.model_dump(),
        # the worked examples train only a pack without instruction data
        **({} if pack.config.data.instructions else {"reading_core": sha256_file(READING_CORE)}),
        **sample_inputs(pack),
    }


def hyperparameters(settings, n_params: int) -> dict[str, Any]:
    """Fill in what the pack left open, by model size: small models take a larger rank and rate."""
    if n_params < 1_000_000_000:
        rank, rate = 16, 1e-3  # few steps on CPU: a small model's adapters need a brisk rate
    elif n_params < 10_000_000_000:
        rank, rate = 16, 1e-4
    else:
        rank, rate = 8, 5e-5
    rank = settings.lora_rank or rank
    return {"lora_rank": rank, "lora_alpha": settings.lora_alpha or 2 * rank,
            "learning_rate": settings.learning_rate or rate}


def lora_targets(model, settings) -> list[str] | str:
    """The modules that get adapters: `target_modules` (every linear layer by default) in the top
    `lora_layers` share of the decoder layers. Gradients then stop at the lowest adapted layer, so
    the layers below cost a forward pass only."""
    import re

    import torch

    if settings.lora_layers >= 1:
        return settings.target_modules
    count = model.config.num_hidden_layers
    first = count - max(1, round(count * settings.lora_layers))
    wanted = None if settings.target_modules == "all-linear" else set(settings.target_modules)
    names = []
    for name, module in model.named_modules():
        layer = re.search(r"\.layers\.(\d+)\.", name)  # the decoder layer stack of Llama-style models
        if (isinstance(module, torch.nn.Linear) and layer and int(layer.group(1)) >= first
                and (wanted is None or name.rsplit(".", 1)[-1] in wanted)):
            names.append(name)
    if not names:
        log.warning("tune: no '.layers.N.' linear modules found in %s; adapting all layers (stages.tune.lora_layers "
                    "is ignored)", type(model).__name__)
        return settings.target_modules
    return names


def lora_config(model, settings, hp: dict[str, Any]):
    from peft import LoraConfig

    return LoraConfig(r=hp["lora_rank"], lora_alpha=hp["lora_alpha"], lora_dropout=settings.lora_dropout,
                      target_modules=lora_targets(model, settings), task_type="CAUSAL_LM")


def _answer_loss_trainer():
    """transformers' Trainer with a loss that runs the vocabulary projection only at the positions
    that have a label (forward_with_head_at): computing and back-propagating the others' logits was
    about a fifth of each step, for nothing. The loss is the model's own token-weighted cross-entropy."""
    import torch
    from transformers import Trainer

    from vertical.models.training import forward_with_head_at

    class AnswerLossTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            inputs = dict(inputs)
            targets = inputs.pop("labels")[:, 1:]  # the token each position predicts
            rows, columns = (targets != -100).nonzero(as_tuple=True)
            outputs = forward_with_head_at(model, rows, columns, self.accelerator.unwrap_model(model), **inputs)
            loss = torch.nn.functional.cross_entropy(outputs.logits.float(), targets[rows, columns], reduction="sum")
            if num_items_in_batch is not None:  # counted over the whole accumulated batch (and every device)
                loss = loss / num_items_in_batch
                if self.args.average_tokens_across_devices:
                    loss = loss * self.accelerator.num_processes  # DDP averages the gradients again
            else:
                loss = loss / max(len(rows), 1)
            return (loss, outputs) if return_outputs else loss

    return AnswerLossTrainer


def training_order(lengths: list[int], epochs: float, batch: int, seed: int) -> list[int]:
    """The examples' indices for the whole run, epoch after epoch (a fractional last epoch takes
    its share of the examples). Each epoch is a fresh shuffle, seeded by the seed and the epoch,
    cut into batches of like length (less padding) within windows of 50 batches, and the batches
    shuffled. The order is laid out before training because Trainer's own length-grouped sampler
    draws each epoch's shuffle from the global torch generator, whose state after a resume differs
    from the uninterrupted run's: the resumed run would then train on other batches and end with
    other weights."""
    order: list[int] = []
    window = 50 * batch
    total = max(1, round(epochs * len(lengths)))
    epoch = 0
    while len(order) < total:
        rng = random.Random(f"{seed}:{epoch}")
        indices = list(range(len(lengths)))
        rng.shuffle(indices)
        for start in range(0, len(indices), window):
            by_length = sorted(indices[start:start + window], key=lambda i: -lengths[i])
            batches = [by_length[b:b + batch] for b in range(0, len(by_length), batch)]
            rng.shuffle(batches)
            order += [i for b in batches for i in b]
        epoch += 1
    return order[:total]


def make_trainer(model, tokenizer, features: list[dict], settings, hp: dict[str, Any], output_dir: Path, **overrides):
    """The stage's Trainer (also used by benchmarks/tune.py, so both measure the same thing). It
    takes the examples once each, in `training_order`, so resuming from a checkpoint skips exactly
    the batches the killed run had trained on."""
    import torch
    from transformers import DataCollatorForSeq2Seq, TrainingArguments

    from vertical.models.registry import bf16_supported

    use_gpu = torch.cuda.is_available()
    options = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.gradient_accumulation,
        num_train_epochs=1,  # the epochs are laid out in the dataset itself, by training_order
        learning_rate=hp["learning_rate"],
        lr_scheduler_type="cosine",
        warmup_steps=max(1, int(0.05 * len(features) / (settings.batch_size * settings.gradient_accumulation))),
        logging_steps=1 if len(features) < 200 else 5,
        save_strategy="steps",
        save_steps=settings.save_steps,
        save_total_limit=2,
        report_to=[],
        seed=settings.seed,
        train_sampling_strategy="sequential",
        dataloader_num_workers=0,
        bf16=bf16_supported("cuda" if use_gpu else "cpu"),  # mixed precision on a GPU, or a CPU with native bf16
        use_cpu=not use_gpu,
        include_num_input_tokens_seen="non_padding",
    )
    options.update(overrides)
    batch = settings.batch_size * settings.gradient_accumulation
    order = training_order([len(f["input_ids"]) for f in features], settings.epochs, batch, settings.seed)
    return _answer_loss_trainer()(model=model, args=TrainingArguments(**options), train_dataset=[features[i] for i in order],
                   data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100))


def _features(tokenizer, examples, max_length: int) -> tuple[list[dict], int, int]:
    from vertical.tune.data import tokenize

    features, truncated, dropped = [], 0, 0
    for example in examples:
        feature, was_truncated = tokenize(tokenizer, example.messages, max_length)
        truncated += was_truncated
        if feature is None:
            dropped += 1
        else:
            features.append(feature)
    return features, truncated, dropped


def _make_reproducible(adapter: Path) -> None:
    """PEFT writes target_modules in set order (it changes with the hash seed) and a model card
    naming the absolute path of the base model; sort the one, drop the other."""
    config_path = adapter / "adapter_config.json"
    config = json.loads(config_path.read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True))
    (adapter / "README.md").unlink(missing_ok=True)


HELD_OUT_QUESTIONS = 30  # generated questions scored instead of qa_eval in a pack that has none


def _generated_data(ctx, index, embedder, settings, tokenizer, out: Path) -> tuple[list, list, dict[str, int]]:
    """(training examples from generated questions, held-out QA items, counts). The pack's
    evaluation facts and questions are excluded before anything is generated."""
    from vertical.scoring import normalize
    from vertical.io import atomic_write_text
    from vertical.pack.schema import QAItem
    from vertical.tune.data import generated_examples
    from vertical.tune.generate import generate_questions

    pack = ctx.pack
    if not settings.generated_questions:
        return [], [], {}
    eval_items = pack.qa_eval()
    held_facts = {(i.doc_id, normalize(i.gold)) for i in eval_items if i.doc_id and not i.choices}
    held_questions = [i.question for i in eval_items] + [r.question for r in pack.retrieval_eval()]
    wanted = settings.generated_questions + (0 if eval_items else HELD_OUT_QUESTIONS)
    candidates = generate_questions(index.chunks, 2 * wanted, settings.seed, held_facts, held_questions)
    examples, kept = generated_examples(candidates, pack.config.system_prompt, index, embedder, settings, tokenizer)
    # a third at most, so that a pack of a few documents still has something to train on
    hold_out = 0 if eval_items or len(kept) < 2 else min(HELD_OUT_QUESTIONS, max(1, len(kept) // 3))
    held = kept[:hold_out]
    held_keys = {(q.doc_id, normalize(q.answer)) for q in held}
    train = [(e, q) for e, q in zip(examples[hold_out:], kept[hold_out:]) if (q.doc_id, normalize(q.answer)) not in held_keys]
    train = train[: settings.generated_questions]
    atomic_write_text(out / "generated.jsonl", "".join(json.dumps(q.record()) + "\n" for _, q in train))
    items = [QAItem(id=f"generated-{n + 1:03d}", question=q.question, answer=q.answer, doc_id=q.doc_id)
             for n, q in enumerate(held)]
    if held:
        atomic_write_text(out / "heldout_qa.jsonl", "".join(json.dumps(i.model_dump(exclude_none=True)) + "\n"
                                                             for i in items))
    counts = {"generated_candidates": len(candidates), "generated_kept": len(kept), "generated_trained": len(train),
              "generated_held_out": len(held)}
    log.info("tune: %d questions generated from the documents, %d found their evidence; %d trained on, %d held out",
             *counts.values())
    return [e for e, _ in train], items, counts


def run(ctx, out: Path) -> dict[str, Any]:
    from peft import get_peft_model

    from vertical.answer import retrieve
    from vertical.base import count_parameters
    from vertical.scoring import TorchLM, known_predictions, mean_loss, score_qa, stage_questions, write_predictions
    from vertical.index import open_index
    from vertical.models import load_causal_lm, load_tokenizer, save_tokenizer
    from vertical.pipeline import PhaseClock
    from vertical.tune.data import build_examples, reading_core_examples, share_evenly

    settings = ctx.pack.config.stages.tune
    clock = PhaseClock()
    system_prompt = ctx.pack.config.system_prompt
    base_dir = ctx.stage_dir("base") / "model"
    tokenizer = load_tokenizer(base_dir)
    if not tokenizer.chat_template:
        raise VerticalError(f"base model {base_dir} has no chat template; tune needs an instruct/chat model")
    # (file, conversation): the cap on examples is shared evenly between the instruction files
    conversations = [(file, c) for file, group in enumerate(ctx.pack.instructions_by_file()) for c in group]
    if not conversations and not settings.generated_questions:  # checked first: nothing is loaded for nothing
        log.warning("pack '%s' has no instruction data (data.instructions in pack.yaml) and generated_questions is 0: "
                    "nothing to tune; later stages use the base model", ctx.pack.name)
        return {"skipped": "the pack has no instruction data"}
    index, embedder = open_index(ctx.build_dir)
    generated, held_out_items, generated_counts = _generated_data(ctx, index, embedder, settings, tokenizer, out)
    if not conversations and not generated:
        log.warning("pack '%s' has no instruction data and no question generated from its documents found its "
                    "evidence: nothing to tune; later stages use the base model", ctx.pack.name)
        return {"skipped": "no instruction data, and no usable generated question", **generated_counts}
    rng = random.Random(settings.seed)
    rng.shuffle(conversations)
    holdout_n = min(settings.eval_holdout, len(conversations) // 5)
    held_out = [c for _, c in conversations[:holdout_n]]
    chosen = share_evenly(conversations[holdout_n:], settings.max_examples)
    train = [c for _, c in chosen]
    counts = Counter(file for file, _ in chosen)
    by_file = {ctx.pack.config.data.instructions[file]: counts[file] for file in sorted(counts)}

    train_examples = build_examples(train, system_prompt, index, embedder, settings, settings.seed, tokenizer)
    train_examples += generated
    if not ctx.pack.config.data.instructions:  # the worked examples stand in for hand-written ones
        train_examples += reading_core_examples(system_prompt)
    eval_examples = build_examples(held_out, system_prompt, index, embedder, settings, settings.seed + 1, tokenizer)
    train_features, truncated, dropped = _features(tokenizer, train_examples, settings.max_length)
    eval_features, _, _ = _features(tokenizer, eval_examples, settings.max_length)
    if truncated or dropped:
        log.warning("tune: %d of %d examples longer than max_length=%d were truncated; %d had no answer tokens left "
                    "and were dropped", truncated, len(train_examples), settings.max_length, dropped)
    if not train_features:
        raise VerticalError("tune: no training example left after truncation; raise stages.tune.max_length")
    if len(train_features) < settings.batch_size:
        files = ", ".join(ctx.pack.config.data.instructions)
        log.warning("tune: only %d training examples (%s), fewer than one batch of %d; add examples or lower "
                    "stages.tune.batch_size", len(train_features), files, settings.batch_size)
    kinds = dict(Counter(e.kind for e in train_examples))
    clock.lap("examples")

    qa_items = stage_questions(ctx.pack, settings.eval_questions, ctx.pack.qa_eval() or held_out_items)
    answer_tokens = ctx.pack.config.stages.eval.answer_tokens
    # as many sources as the training prompts carry, so base and tuned are scored on that format
    retriever = lambda question: retrieve(index, embedder.encode, question, settings.rag_sources)[0]  # noqa: E731

    # Under torchrun / accelerate launch every rank trains; only rank 0 measures and saves.
    main = int(os.environ.get("RANK", "0")) == 0
    model = load_causal_lm(base_dir)
    hp = hyperparameters(settings, count_parameters(base_dir))
    metrics: dict[str, Any] = {"examples": len(train_features), "examples_by_kind": kinds,
                               "conversations_by_file": by_file, "examples_truncated": truncated,
                               "examples_dropped": dropped, "eval_examples": len(eval_features),
                               **generated_counts, **hp}
    metrics["eval_loss_base"] = round(mean_loss(model, eval_features), 4) if eval_features and main else None
    if qa_items and main:
        base_qa = score_qa(TorchLM(model, tokenizer), qa_items, system_prompt, retriever, ctx.reporter.track,
                           answer_tokens, known_predictions(ctx.build_dir, base_dir))
        metrics["accuracy_base"] = base_qa["accuracy"]
    clock.lap("base_loss_and_qa")

    model.train()
    from transformers import set_seed

    set_seed(settings.seed)  # LoRA's A matrices start random: the same seed, the same adapter every run
    with warnings.catch_warnings():  # peft asks the model a question transformers 5 renamed; nothing to act on
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        model = get_peft_model(model, lora_config(model, settings, hp))
    work = ctx.work_dir("tune")
    trainer = make_trainer(model, tokenizer, train_features, settings, hp, work / "checkpoints")
    checkpoint = last_complete_checkpoint(work / "checkpoints")
    resume = checkpoint is not None
    if resume:
        log.info("tune: resuming from %s", checkpoint)
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=str(checkpoint) if resume else None)
    seconds = time.perf_counter() - started
    tokens_seen = int(getattr(trainer.state, "num_input_tokens_seen", 0) or 0)
    curve = [round(float(entry["loss"]), 4) for entry in trainer.state.log_history if "loss" in entry]
    metrics["train_loss_curve"] = curve  # every `logging_steps` optimizer steps
    metrics.update(train_loss=round(result.training_loss, 4), train_seconds=round(seconds, 1),
                   train_tokens=tokens_seen, resumed=resume, world_size=trainer.args.world_size,
                   deepspeed_zero_stage=trainer.accelerator.deepspeed_plugin.zero_stage
                   if getattr(trainer, "is_deepspeed_enabled", False) else None,
                   train_tokens_per_s=round(tokens_seen / seconds, 1) if seconds and not resume else None)
    clock.lap("training")
    if not main:
        return metrics

    model.eval()
    # the adapter names its base relative to the build, not by this machine's absolute path:
    # a build folder stays valid when moved, and two builds of one pack are byte-identical
    model.peft_config["default"].base_model_name_or_path = "../../base/model"
    model.save_pretrained(out / "adapter", save_embedding_layers=False)  # the vocabulary is never changed
    save_tokenizer(base_dir, out / "adapter", out / "merged")
    _make_reproducible(out / "adapter")
    merged = model.merge_and_unload().to("cpu")  # scored on the CPU, as every other stage's models
    merged.config.use_cache = True  # turned off for gradient checkpointing; models are saved for inference
    merged.save_pretrained(out / "merged", safe_serialization=True)
    clock.lap("merge_and_save")
    metrics["eval_loss_tuned"] = round(mean_loss(merged, eval_features), 4) if eval_features else None
    if qa_items:
        tuned_qa = score_qa(TorchLM(merged, tokenizer), qa_items, system_prompt, retriever, ctx.reporter.track,
                            answer_tokens)
        metrics["accuracy_tuned"] = tuned_qa["accuracy"]
        metrics["qa_questions"] = len(qa_items)
        pairs = [(b["correct"], t["correct"]) for b, t in zip(base_qa["items"], tuned_qa["items"])]
        metrics["qa_lost"] = sum(b and not t for b, t in pairs)  # right before tuning, wrong after
        metrics["qa_gained"] = sum(t and not b for b, t in pairs)
        write_predictions(out / "qa_predictions.json", [("base + retrieval", base_dir, base_qa),
                                                        ("tuned + retrieval", out / "merged", tuned_qa)])
    metrics["verdict"] = _verdict(metrics)
    clock.lap("tuned_loss_and_qa")
    metrics["phase_seconds"] = clock.seconds
    return metrics


def _verdict(metrics: dict[str, Any]) -> str:
    """One line that says whether tuning helped; a regression is logged as an error, not hidden.
    Fewer right answers count as a regression when the questions the tuned model lost outnumber
    those it gained beyond chance (a one-sided sign test on the same questions, p < 0.05); on a
    handful of questions a loss of one or two is noise, and is said to be."""
    from scipy.stats import binomtest

    worse, notes = [], []
    if metrics.get("eval_loss_base") is not None and metrics["eval_loss_tuned"] > metrics["eval_loss_base"]:
        worse.append(f"held-out loss rose {metrics['eval_loss_base']} -> {metrics['eval_loss_tuned']}")
    if metrics.get("accuracy_base") is not None and metrics["accuracy_tuned"] < metrics["accuracy_base"]:
        lost, gained = metrics.get("qa_lost", 0), metrics.get("qa_gained", 0)
        p_value = binomtest(lost, lost + gained, 0.5, alternative="greater").pvalue if lost + gained else 1.0
        fell = (f"QA accuracy fell {metrics['accuracy_base']} -> {metrics['accuracy_tuned']} on "
                f"{metrics.get('qa_questions')} questions ({lost} lost, {gained} gained; sign test p = {p_value:.2f})")
        (worse if p_value < 0.05 else notes).append(fell)
    if worse:
        message = "TUNED MODEL IS WORSE THAN THE BASE: " + "; ".join(worse + notes)
        log.error(message)
        return message
    if notes:
        message = (f"tuned model: {notes[0]}, within chance; the eval stage's report measures it on the whole "
                   "sample")
        log.warning(message)
        return message
    return "tuned model is at least as good as the base on held-out loss and QA accuracy"
