"""The student: the teacher with fewer layers, initialised from the teacher's own weights.

Embeddings, norms, head and the kept blocks are copied, so the student starts close to the
teacher and distillation repairs the gaps instead of learning from scratch. Which layers to keep
matters; three layouts are tried and the one whose untrained output is closest to the teacher's
(KL on the pack's own text) wins:

- `even`: evenly spaced, first and last included;
- `influence`: the layers that change the hidden state most (1 - cosine between a layer's input
  and output, Men et al. 2024, "ShortGPT"), first and last included;
- `block`: drop one contiguous run of layers whose input and output are most alike (Gromov et
  al. 2024, "The Unreasonable Ineffectiveness of the Deeper Layers").
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


def layer_count(num_layers: int, keep: float) -> int:
    count = max(1, min(num_layers, round(num_layers * keep)))
    if count == num_layers:
        raise VerticalError(f"stages.distill.keep_layers={keep} keeps all {count} layers: "
                            "choose a fraction below 1 so the student is smaller")
    return count


def candidate_layouts(hidden_states: list, count: int) -> dict[str, list[int]]:
    """Layouts of `count` layers from the teacher's hidden states on probe text.

    `hidden_states[i]` is the input of layer i (a [tokens, width] tensor), the last entry the
    output of the final layer."""
    import torch

    num_layers = len(hidden_states) - 1

    def distance(a: int, b: int) -> float:  # angular distance between the inputs of layers a and b
        cos = torch.nn.functional.cosine_similarity(hidden_states[a].float(), hidden_states[b].float(), dim=-1)
        return float(torch.arccos(cos.clamp(-1, 1)).mean())

    layouts = {"even": kept_layers(num_layers, count / num_layers)}
    if count >= 2:
        influence = {i: distance(i, i + 1) for i in range(1, num_layers - 1)}
        middle = sorted(sorted(influence, key=influence.get, reverse=True)[: count - 2])
        layouts["influence"] = [0, *middle, num_layers - 1]
    drop = num_layers - count
    # the last layer is kept: it maps into the head's space and is never redundant
    start = min(range(0, num_layers - drop), key=lambda a: distance(a, a + drop))
    layouts["block"] = [i for i in range(num_layers) if not start <= i < start + drop]
    return layouts


def choose_layers(teacher, keep: float, probe: list[list[int]], temperature: float) -> tuple[list[int], dict[str, float]]:
    """The candidate layout whose untrained student is closest to the teacher on `probe`
    (token-id sequences), with each candidate's KL."""
    import torch

    count = layer_count(teacher.config.num_hidden_layers, keep)
    if not probe:
        return kept_layers(teacher.config.num_hidden_layers, keep), {}
    teacher.eval()
    with torch.inference_mode():
        runs = [teacher(input_ids=torch.tensor([ids]), output_hidden_states=True) for ids in probe]
    hidden = [torch.cat([run.hidden_states[i][0] for run in runs]) for i in range(len(runs[0].hidden_states))]
    kl: dict[str, float] = {}
    layouts = candidate_layouts(hidden, count)
    for name, kept in layouts.items():
        student = make_student(teacher, kept)
        total = 0.0
        with torch.inference_mode():
            for ids, run in zip(probe, runs):
                logits = student(input_ids=torch.tensor([ids])).logits
                t = temperature
                teacher_logp = torch.log_softmax(run.logits.float() / t, -1)
                total += float((teacher_logp.exp() * (teacher_logp - torch.log_softmax(logits.float() / t, -1))).sum(-1).mean())
        kl[name] = round(total / len(probe), 4)
        del student
    best = min(kl, key=kl.get)
    return layouts[best], kl


def make_student(teacher, kept: list[int]):
    """A new model of the teacher's class with only the `kept` teacher layers (in order)."""
    import torch
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(teacher.config)
    if len(kept) >= config.num_hidden_layers or not kept:
        raise VerticalError(f"the student would keep {len(kept)} of {config.num_hidden_layers} layers: "
                            "choose stages.distill.keep_layers below 1 so the student is smaller")
    config.num_hidden_layers = len(kept)
    config.use_cache = True  # the teacher's may be off from training; the student is saved for inference
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
    return student
