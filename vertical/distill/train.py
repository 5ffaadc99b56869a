"""The distillation loss and the loop that trains the student, with checkpoints for a resume."""

from __future__ import annotations

import logging
import math
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


def collate(sequences: list[dict], pad_id: int):
    """Right-padded ids and mask, the (row, position) pairs the loss reads with their targets, and
    their weights: each sequence weighs the same, so a 300-token document chunk does not outweigh
    the 40-token answer beside it."""
    import torch

    width = max(len(s["input_ids"]) for s in sequences)
    ids = torch.tensor([s["input_ids"] + [pad_id] * (width - len(s["input_ids"])) for s in sequences])
    mask = torch.tensor([[1] * len(s["input_ids"]) + [0] * (width - len(s["input_ids"])) for s in sequences])
    rows = torch.tensor([row for row, s in enumerate(sequences) for _ in s["positions"]])
    columns = torch.tensor([p for s in sequences for p in s["positions"]])
    targets = torch.tensor([t for s in sequences for t in s["targets"]])
    weights = torch.tensor([1 / (len(s["positions"]) * len(sequences)) for s in sequences for _ in s["positions"]])
    return ids, mask, rows, columns, targets, weights


def load_checkpoint(path: Path) -> dict | None:
    """A resumable training state, or None to start over. Loaded with `weights_only=True`:
    tensors and plain values only, so a checkpoint planted in a copied build folder cannot run
    code (torch's full unpickler would call whatever the file names)."""
    import pickle

    import torch

    if not path.is_file():
        return None
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as exc:
        log.warning("distill: %s is not a checkpoint this stage wrote (%s); starting over", path,
                    str(exc).splitlines()[0][:200])
        return None


def train_student(student, teacher, sequences: list[dict], settings, pad_id: int, work: Path, track,
                  check: Callable[[], bool] | None = None) -> dict[str, Any]:
    """The distillation loop: AdamW, warmup then cosine decay, bf16 autocast where native,
    a checkpoint every CHECKPOINT_EVERY steps (resumed after a kill). `check`, called once halfway
    (the student in eval mode), may end the training there by returning False."""
    import torch

    from vertical.models import selected_logits
    from vertical.models.registry import autocast

    torch.manual_seed(settings.seed)
    for param in student.get_input_embeddings().parameters():  # shared with the head; the teacher's are kept
        param.requires_grad_(False)
    trainable = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings.learning_rate, weight_decay=0.0)
    warmup = max(1, settings.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(step, settings.steps) / max(settings.steps, 1))))
    order = list(range(len(sequences)))
    random.Random(settings.seed).shuffle(order)
    order.sort(key=lambda i: len(sequences[i]["input_ids"]))  # similar lengths batch together: less padding
    batches = [order[i:i + settings.batch_size] for i in range(0, len(order), settings.batch_size)]
    random.Random(settings.seed + 1).shuffle(batches)

    checkpoint = work / "checkpoint.pt"
    step, curve = 0, []
    state = load_checkpoint(checkpoint)
    if state is not None:
        student.load_state_dict(state["student"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        step, curve = state["step"], state["curve"]
        log.info("distill: resuming at step %d of %d", step, settings.steps)
    resumed_at = step

    student.train()
    teacher.eval()
    tokens, started = 0, time.perf_counter()
    check_at, stopped_at = settings.steps // 2, None
    for step in track(range(step, settings.steps), settings.steps - step, "distilling the student"):
        if check is not None and 0 < check_at == step:
            student.eval()
            checked = time.perf_counter()
            go_on = check()
            started += time.perf_counter() - checked  # the check's QA is not training time
            if not go_on:
                stopped_at = step
                break
            student.train()
        ids, mask, rows, columns, targets, weights = collate([sequences[i] for i in batches[step % len(batches)]],
                                                             pad_id)
        with torch.no_grad(), autocast():
            teacher_logits = selected_logits(teacher, ids, mask, rows, columns)
        with autocast():
            student_logits = selected_logits(student, ids, mask, rows, columns)
        loss, kd, ce = distillation_loss(student_logits, teacher_logits, targets, settings.temperature, weights)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += int(mask.sum())
        curve.append([round(float(kd), 4), round(float(ce), 4)])
        if (step + 1) % CHECKPOINT_EVERY == 0 and step + 1 < settings.steps:
            tmp = checkpoint.with_suffix(".tmp")
            torch.save({"student": student.state_dict(), "optimizer": optimizer.state_dict(),
                        "schedule": schedule.state_dict(), "step": step + 1, "curve": curve}, tmp)
            tmp.replace(checkpoint)  # a kill never leaves a half-written checkpoint behind
    student.eval()
    seconds = time.perf_counter() - started
    window = max(1, len(curve) // 5)
    return {"steps": stopped_at or settings.steps, "stopped_at_step": stopped_at, "resumed_at_step": resumed_at,
            "train_seconds": round(seconds, 1),
            "train_tokens_per_s": round(tokens / seconds, 1) if seconds > 0 and tokens else None,
            "kd_loss_start": _mean(c[0] for c in curve[:window]), "kd_loss_end": _mean(c[0] for c in curve[-window:]),
            "loss_curve": curve[:: max(1, len(curve) // 50)]}


def _mean(values) -> float | None:
    values = list(values)
    return round(sum(values) / len(values), 4) if values else None
