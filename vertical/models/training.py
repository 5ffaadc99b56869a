"""What the stages that train (tune, distill) share: a loss's forward pass, and Trainer's checkpoints."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

log = logging.getLogger(__name__)


def forward_with_head_at(model, rows, columns, unwrapped=None, **inputs):
    """`model(**inputs)` with the vocabulary projection run only at the (row, position) pairs that
    `rows`, `columns` name: its logits are [pairs, vocabulary]. With retrieved sources most of an
    example's tokens are prompt, and SmolLM2's 49k-word head costs per position about what eight of
    its 30 layers do. The forward itself stays the model's own (not its inner modules), so DDP and
    accelerate stay in charge; `unwrapped` is the bare model they wrap (default: `model`)."""
    head = (unwrapped or model).get_output_embeddings()
    handle = head.register_forward_pre_hook(lambda _module, args: (args[0][rows, columns],))
    try:
        return model(**inputs)
    finally:
        handle.remove()


def last_complete_checkpoint(folder: Path) -> Path | None:
    """The newest checkpoint a kill did not interrupt and this code could have written. Trainer
    writes trainer_state.json last, so a checkpoint folder without it is half-written; one whose
    pickled state (optimizer, scheduler, random generators) holds more than tensors and plain values
    was planted. Either is removed, never resumed from."""
    if not folder.is_dir():
        return None
    found = sorted(folder.glob("checkpoint-*"),
                   key=lambda p: int(p.name.split("-")[-1]) if p.name.split("-")[-1].isdigit() else -1)
    for checkpoint in reversed(found):
        if not (checkpoint / "trainer_state.json").is_file():
            log.warning("%s was interrupted while being written; removing it", checkpoint)
        elif (unsafe := _unsafe_state(checkpoint)) is not None:
            log.warning("%s is not a checkpoint this code wrote (%s holds more than tensors and plain values); "
                        "removing it and starting over", checkpoint, unsafe.name)
        else:
            return checkpoint
        shutil.rmtree(checkpoint, ignore_errors=True)
    return None


def _unsafe_state(checkpoint: Path) -> Path | None:
    """The first pickle in `checkpoint` that torch's restricted loader refuses, loaded the way Trainer
    loads them (`weights_only=True`, numpy's random state allowed), so that a refused file is dealt
    with before training starts."""
    import pickle

    import torch
    from transformers.trainer_pt_utils import safe_globals

    for path in sorted([*checkpoint.glob("*.pt"), *checkpoint.glob("*.pth")]):
        try:
            with safe_globals():
                torch.load(path, weights_only=True, map_location="cpu")
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError):
            return path
    return None
