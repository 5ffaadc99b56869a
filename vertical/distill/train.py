"""The distillation loss and the student's training on transformers' Trainer: checkpoints and the
resume after a kill, bf16 where native, and data-parallel runs under `torchrun` or `accelerate
launch`, the same as the tune stage's."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CHECKPOINT_EVERY = 20  # optimizer steps


def distillation_loss(student_logits, teacher_logits, targets, temperature: float, weights=None):
    """KL(teacher || student) on softened distributions, scaled by T^2 so its gradients keep the
    size of a hard-label loss (Hinton et al.), plus cross-entropy where `targets` has a token.
    Logits are [positions, vocab]: only the positions the loss reads; `weights` (summing to 1)
    weigh the positions' KL, uniform by default."""
    import torch.nn.functional as F

    t = temperature
    student_logp = F.log_softmax(student_logits.float() / t, dim=-1)
    teacher_logp = F.log_softmax(teacher_logits.float() / t, dim=-1)
    kl = (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1)
    kd = (kl.mean() if weights is None else (kl * weights).sum()) * t * t
    if (targets != -100).any():
        ce = F.cross_entropy(student_logits.float(), targets, ignore_index=-100)
    else:
        ce = kd.new_zeros(())
    return kd + ce, kd.detach(), ce.detach()


def collate(sequences: list[dict], pad_id: int) -> dict:
    """Right-padded ids and mask, the (row, position) pairs the loss reads with their targets, and
    their weights: each sequence weighs the same, so a 300-token document chunk does not outweigh
    the 40-token answer beside it."""
    import torch

    width = max(len(s["input_ids"]) for s in sequences)
    return {
        "input_ids": torch.tensor([s["input_ids"] + [pad_id] * (width - len(s["input_ids"])) for s in sequences]),
        "attention_mask": torch.tensor([[1] * len(s["input_ids"]) + [0] * (width - len(s["input_ids"]))
                                        for s in sequences]),
        "rows": torch.tensor([row for row, s in enumerate(sequences) for _ in s["positions"]]),
        "columns": torch.tensor([p for s in sequences for p in s["positions"]]),
        "targets": torch.tensor([t for s in sequences for t in s["targets"]]),
        "weights": torch.tensor([1 / (len(s["positions"]) * len(sequences)) for s in sequences for _ in s["positions"]]),
    }


def _distill_trainer():
    """Trainer whose loss is the distillation loss: the teacher's logits at the positions the loss
    reads, under the same autocast as the student's."""
    import torch
    from transformers import Trainer

    from vertical.models.training import forward_with_head_at

    class DistillTrainer(Trainer):
        def __init__(self, *args, teacher, temperature: float, **kwargs):
            super().__init__(*args, **kwargs)
            self.teacher = teacher.to(self.args.device).eval()
            self.temperature = temperature
            self.parts: list[tuple[float, float]] = []  # (kd, ce) of each step since the last log

        def _logits_at(self, model, inputs):  # the vocabulary projection only where the loss reads
            return forward_with_head_at(model, inputs["rows"], inputs["columns"], self.accelerator.unwrap_model(model),
                                        input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            with torch.no_grad():
                teacher_logits = self._logits_at(self.teacher, inputs)
            loss, kd, ce = distillation_loss(self._logits_at(model, inputs), teacher_logits, inputs["targets"],
                                             self.temperature, inputs["weights"])
            self.parts.append((float(kd), float(ce)))
            return loss

        def log(self, logs: dict, *args, **kwargs) -> None:
            if self.parts and "loss" in logs:  # the parts of the loss go into trainer_state.json too
                logs = {**logs, "kd": sum(p[0] for p in self.parts) / len(self.parts),
                        "ce": sum(p[1] for p in self.parts) / len(self.parts)}
                self.parts.clear()
            super().log(logs, *args, **kwargs)

    return DistillTrainer


def train_student(student, teacher, sequences: list[dict], settings, pad_id: int, work: Path,
                  check: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Distil `teacher` into `student` for settings.steps optimizer steps: AdamW, warmup then cosine
    decay, a checkpoint every CHECKPOINT_EVERY steps in `work` (resumed after a kill). `check`,
    called once halfway (the student in eval mode), may end the training there by returning False."""
    import torch
    from transformers import TrainerCallback, TrainingArguments

    from vertical.models.registry import bf16_supported
    from vertical.models.training import last_complete_checkpoint

    for param in student.get_input_embeddings().parameters():  # shared with the head; the teacher's are kept
        param.requires_grad_(False)
    # the order is laid out here, not by a sampler: batches of like length (less padding), shuffled
    # once, the same after a resume
    order = list(range(len(sequences)))
    random.Random(settings.seed).shuffle(order)
    order.sort(key=lambda i: len(sequences[i]["input_ids"]))
    batches = [order[i:i + settings.batch_size] for i in range(0, len(order), settings.batch_size)]
    random.Random(settings.seed + 1).shuffle(batches)
    dataset = [sequences[i] for batch in batches for i in batch]

    class Halfway(TrainerCallback):
        """Runs `check` once after half the steps; its time is not training time."""

        paused, stopped_at, tokens_before = 0.0, None, 0

        def on_train_begin(self, args, state, control, **kwargs):
            self.tokens_before = state.num_input_tokens_seen  # a resumed run counts only its own tokens

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step != settings.steps // 2 or state.global_step == 0:
                return
            distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
            if check is None and not distributed:
                return
            go_on = True
            if check is not None:  # rank 0 (the only rank given the check under torchrun) decides
                student.eval()
                started = time.perf_counter()
                go_on = check()
                self.paused += time.perf_counter() - started
                student.train()
            if distributed:  # every rank stops at the same step, or the others wait for it forever
                decision = [go_on]
                torch.distributed.broadcast_object_list(decision, src=0)
                go_on = decision[0]
            if not go_on:
                self.stopped_at = state.global_step
                control.should_training_stop = True

    use_gpu = torch.cuda.is_available()
    args = TrainingArguments(
        output_dir=str(work / "checkpoints"), max_steps=settings.steps, per_device_train_batch_size=settings.batch_size,
        learning_rate=settings.learning_rate, weight_decay=0.0, lr_scheduler_type="cosine",
        warmup_steps=max(1, settings.steps // 20), max_grad_norm=1.0, logging_steps=1, save_strategy="steps",
        save_steps=CHECKPOINT_EVERY, save_total_limit=1, report_to=[], seed=settings.seed,
        train_sampling_strategy="sequential", dataloader_num_workers=0, remove_unused_columns=False,
        bf16=bf16_supported("cuda" if use_gpu else "cpu"), use_cpu=not use_gpu,
        include_num_input_tokens_seen="non_padding")
    halfway = Halfway()
    trainer = _distill_trainer()(model=student, args=args, train_dataset=dataset, teacher=teacher,
                                 temperature=settings.temperature, callbacks=[halfway],
                                 data_collator=lambda features: collate(features, pad_id))
    checkpoint = last_complete_checkpoint(work / "checkpoints")
    resumed_at = 0
    if checkpoint is not None:
        import json

        resumed_at = json.loads((checkpoint / "trainer_state.json").read_text()).get("global_step", 0)
        log.info("distill: resuming at step %d of %d", resumed_at, settings.steps)
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    seconds = time.perf_counter() - started - halfway.paused
    student.eval()
    history = trainer.state.log_history
    curve = [[round(h["kd"], 4), round(h["ce"], 4)] for h in history if "kd" in h]
    tokens = trainer.state.num_input_tokens_seen - halfway.tokens_before
    window = max(1, len(curve) // 5)
    return {"steps": halfway.stopped_at or settings.steps, "stopped_at_step": halfway.stopped_at,
            "resumed_at_step": resumed_at, "train_seconds": round(seconds, 1), "world_size": args.world_size,
            "deepspeed_zero_stage": trainer.accelerator.deepspeed_plugin.zero_stage
            if getattr(trainer, "is_deepspeed_enabled", False) else None,
            "train_tokens_per_s": round(tokens / seconds, 1) if seconds > 0 and tokens else None,
            "kd_loss_start": _mean(c[0] for c in curve[:window]), "kd_loss_end": _mean(c[0] for c in curve[-window:]),
            "loss_curve": curve[:: max(1, len(curve) // 50)]}


def _mean(values) -> float | None:
    values = list(values)
    return round(sum(values) / len(values), 4) if values else None
