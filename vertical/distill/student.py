"""The student: the teacher with fewer layers, initialised from the teacher's own weights.

Keeping evenly spaced layers (always the first and the last) gives a student of the same family
that starts close to the teacher: embeddings, norms, head and the kept blocks are copied, so
distillation repairs the gaps instead of learning from scratch.
"""

from __future__ import annotations

import copy
import re

from vertical.errors import VerticalError

_LAYER_KEY = re.compile(r"(^|\.)layers\.(\d+)\.")


def kept_layers(num_layers: int, keep: float) -> list[int]:
    """Evenly spaced layer indices, first and last included, `keep` of them as a fraction."""
    count = max(1, min(num_layers, round(num_layers * keep)))
    if count == 1:
        return [num_layers - 1]
    return sorted({round(i * (num_layers - 1) / (count - 1)) for i in range(count)})


def student_layer(teacher_layer: int, kept: list[int]) -> int:
    """The student layer closest to a teacher layer (where an edit made in the teacher belongs)."""
    return min(range(len(kept)), key=lambda i: (abs(kept[i] - teacher_layer), kept[i]))


def make_student(teacher, keep: float):
    """A new model of the teacher's class with only the kept layers, and the teacher indices kept."""
    import torch
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(teacher.config)
    kept = kept_layers(config.num_hidden_layers, keep)
    if len(kept) == config.num_hidden_layers:
        raise VerticalError(f"stages.distill.keep_layers={keep} keeps all {len(kept)} layers: "
                            "choose a fraction below 1 so the student is smaller")
    config.num_hidden_layers = len(kept)
    if isinstance(getattr(config, "layer_types", None), list):  # per-layer attention kinds (sliding/full)
        config.layer_types = [config.layer_types[i] for i in kept]
    student = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    position = {teacher_index: student_index for student_index, teacher_index in enumerate(kept)}
    state = {}
    for key, value in teacher.state_dict().items():
        match = _LAYER_KEY.search(key)
        if match is None:
            state[key] = value
        elif int(match.group(2)) in position:
            new = f"{match.group(1)}layers.{position[int(match.group(2))]}."
            state[key[:match.start()] + new + key[match.end():]] = value
    missing, unexpected = student.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("lm_head.weight")]  # tied to the embeddings
    if missing or unexpected:
        raise VerticalError(f"cannot initialise the student from the teacher: missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]}")
    if getattr(config, "tie_word_embeddings", False):
        student.tie_weights()
    return student, kept
