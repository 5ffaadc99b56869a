"""What the stages that train (tune, distill) share about transformers' Trainer checkpoints."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

log = logging.getLogger(__name__)


def last_complete_checkpoint(folder: Path) -> Path | None:
    """The newest checkpoint a kill did not interrupt. Trainer writes trainer_state.json last, so a
    checkpoint folder without it is half-written: it is removed, never resumed from."""
    if not folder.is_dir():
        return None
    found = sorted(folder.glob("checkpoint-*"),
                   key=lambda p: int(p.name.split("-")[-1]) if p.name.split("-")[-1].isdigit() else -1)
    for checkpoint in reversed(found):
        if (checkpoint / "trainer_state.json").is_file():
            return checkpoint
        log.warning("%s was interrupted while being written; removing it", checkpoint)
        shutil.rmtree(checkpoint, ignore_errors=True)
    return None
