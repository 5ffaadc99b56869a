"""Causal tracing: where in the network does the model keep a fact? (Meng et al. 2022, ROME, sec. 2)

Three kinds of runs on one prompt that names a subject:

    clean       the prompt as is; its top next token is "the answer", with probability p_clean
    corrupted   Gaussian noise added to the subject tokens' input embeddings, so the model loses
                track of the subject; the answer's probability drops to p_corrupt
    restored    a corrupted run in which one state (token t, layer l) is set back to its clean
                value; if P(answer) climbs back toward p_clean, that state carries the fact

The map of restored probabilities over tokens x layers is the trace. For "mlp" traces the peak
at the last subject token marks the layer whose FFN an edit (ROME/MEMIT) should write to, which
is what `best_layer` picks.

Cost: a trace needs one restored run per (token, layer). Runs are batched per layer (all token
positions x all noise samples in one forward), token positions before the subject are skipped
(noise cannot reach them under causal attention, so their score is exactly p_corrupt), the
layers below the first restored one are replayed from the corrupted run instead of recomputed,
and only the last position's logits are computed.
"""

from __future__ import annotations

import io
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vertical.edit.layout import ffn_layout
from vertical.edit.tokens import encode, subject_span
from vertical.errors import VerticalError
from vertical.io import atomic_write_bytes, atomic_write_json

log = logging.getLogger(__name__)

KINDS = ("hidden", "mlp", "attn")
NOISE_FACTOR = 3.0  # default noise std, in units of the input embedding values' std (as in ROME)
MAX_BATCH_ROWS = 128  # restored runs per forward pass; bounds memory on long prompts


@dataclass
class TraceResult:
    """One causal trace: P(answer) with the state at (token, layer) restored, per token and layer."""

    prompt: str
    subject: str
    kind: str
    tokens: list[str]
    subject_range: tuple[int, int]  # [start, end) token positions of the subject
    answer: str
    p_clean: float
    p_corrupt: float
    scores: np.ndarray  # [num_tokens, num_layers]
    answer_id: int = -1
    noise: float = 0.0
    samples: int = 0
    window: int = 1
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return int(self.scores.shape[1])

    def to_json(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt, "subject": self.subject, "kind": self.kind, "tokens": list(self.tokens),
            "subject_range": list(self.subject_range), "answer": self.answer, "answer_id": self.answer_id,
            "p_clean": self.p_clean, "p_corrupt": self.p_corrupt, "noise": self.noise, "samples": self.samples,
            "window": self.window, "seconds": round(self.seconds, 3), "num_layers": self.num_layers,
            "scores": [[float(v) for v in row] for row in self.scores], **self.extra,
        }


def _window(layer: int, window: int, num_layers: int) -> range:
    """The `window` layers centred on `layer`, clipped to the model (ROME's convention)."""
    low = max(0, layer - window // 2)
    return range(low, min(num_layers, layer - window // 2 + window))


def _first(output):
    return output[0] if isinstance(output, tuple) else output


def _with_first(output, first):
    return (first,) + tuple(output[1:]) if isinstance(output, tuple) else first


def _targets(layout, kind: str) -> list:
    """The module whose output is the traced state, per layer."""
    if kind == "hidden":
        return list(layout.layers)
    if kind == "mlp":
        return [layout.mlp(i) for i in range(layout.num_layers)]
    modules = [getattr(layer, "self_attn", None) for layer in layout.layers]
    if any(m is None for m in modules):
        raise VerticalError(f"model family '{layout.model_type}' has no self_attn module per layer; trace kind 'attn' "
                            "is not supported for it (use 'mlp' or 'hidden')")
    return modules


def _default_noise(model) -> float:
    weight = model.get_input_embeddings().weight
    return NOISE_FACTOR * float(weight.detach().float().std())


def causal_trace(model, tokenizer, prompt: str, subject: str, kind: str = "mlp", samples: int = 5,
                 noise: float | None = None, window: int = 5, seed: int = 0) -> TraceResult:
    """Trace which states (token x layer) carry the model's answer to `prompt` about `subject`.

    Scores are the mean P(answer) over `samples` noise draws with the state restored; for "mlp"
    and "attn" a window of `window` layers centred on each layer is restored together, since a
    single FFN's effect is small and spread over neighbours (ROME, sec. 2.1)."""
    import torch

    if kind not in KINDS:
        raise VerticalError(f"unknown trace kind {kind!r}: use one of {', '.join(KINDS)}")
    if samples < 1 or window < 1:
        raise VerticalError(f"samples and window must be at least 1 (got samples={samples}, window={window})")
    if not prompt.strip():
        raise VerticalError("the prompt to trace is empty")
    start, end = subject_span(tokenizer, prompt, subject)
    ids = encode(tokenizer, prompt)
    num_tokens = len(ids)
    layout = ffn_layout(model)
    num_layers = layout.num_layers
    targets = _targets(layout, kind)
    layers = list(layout.layers)
    embeddings = model.get_input_embeddings()
    device = embeddings.weight.device
    dtype = embeddings.weight.dtype
    noise_std = _default_noise(model) if noise is None else float(noise)
    began = time.perf_counter()

    handles: list = []
    replaced: list = []  # layers whose forward is temporarily a replay of the corrupted run

    def hook(module, fn) -> None:
        handles.append(module.register_forward_hook(fn))

    def cleanup() -> None:
        while handles:
            handles.pop().remove()
        while replaced:
            layer = replaced.pop()
            layer.__dict__.pop("forward", None)

    generator = torch.Generator().manual_seed(seed)
    draws = (torch.randn(samples, end - start, embeddings.weight.shape[1], generator=generator) * noise_std).to(device, dtype)

    def corrupt(module, args, output):
        out = output.clone()
        out[:, start:end] += draws.repeat(out.shape[0] // samples, 1, 1)
        return out

    def forward(rows: int):
        batch = torch.tensor([ids] * rows, device=device)
        logits = model(input_ids=batch, use_cache=False, logits_to_keep=1).logits[:, -1].float()
        return torch.softmax(logits, dim=-1)

    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            # Clean run: the answer, and every layer's clean state.
            clean_states: list = [None] * num_layers

            def keep_clean(i):
                def fn(module, args, output):
                    clean_states[i] = _first(output)[0].clone()
                return fn

            for i, module in enumerate(targets):
                hook(module, keep_clean(i))
            probs = forward(1)[0]
            cleanup()
            answer_id = int(probs.argmax())
            p_clean = float(probs[answer_id])

            # Corrupted run: P(answer) without the subject, and each layer's output for replay.
            corrupted: list = [None] * num_layers

            def keep_corrupted(i):
                def fn(module, args, output):
                    corrupted[i] = output
                return fn

            hook(embeddings, corrupt)
            for i, layer in enumerate(layers):
                hook(layer, keep_corrupted(i))
            p_corrupt = float(forward(samples)[:, answer_id].mean())
            cleanup()

            # Restored runs, one batch per centre layer: row j*samples + k restores position
            # positions[j] under noise draw k.
            scores = np.full((num_tokens, num_layers), p_corrupt, dtype=np.float64)
            per_chunk = max(1, MAX_BATCH_ROWS // samples)
            all_positions = list(range(start, num_tokens))
            for centre in range(num_layers):
                restored = [centre] if kind == "hidden" else list(_window(centre, window, num_layers))
                # Layers below the first restored one compute exactly what they did in the corrupted
                # run; for "hidden" the restored layer's own output is the corrupted one, patched.
                replay_below = restored[0] + 1 if kind == "hidden" else restored[0]
                for chunk in range(0, len(all_positions), per_chunk):
                    positions = all_positions[chunk:chunk + per_chunk]
                    rows = len(positions) * samples
                    row_index = torch.arange(rows, device=device)
                    pos_index = torch.tensor(positions, device=device).repeat_interleave(samples)
                    try:
                        hook(embeddings, corrupt)
                        for i in range(replay_below):
                            replay = _with_first(corrupted[i], _first(corrupted[i]).repeat(len(positions), 1, 1))
                            layers[i].forward = (lambda value: lambda *a, **k: value)(replay)
                            replaced.append(layers[i])
                        for i in restored:
                            def restore(module, args, output, state=clean_states[i]):
                                patched = _first(output).clone()
                                patched[row_index, pos_index] = state[pos_index]
                                return _with_first(output, patched)
                            hook(targets[i], restore)
                        p = forward(rows)[:, answer_id].reshape(len(positions), samples).mean(dim=1)
                    finally:
                        cleanup()
                    scores[positions, centre] = p.cpu().double().numpy()
    finally:
        cleanup()
        model.train(was_training)

    seconds = time.perf_counter() - began
    tokens = [tokenizer.decode([token]) for token in ids]
    answer = tokenizer.decode([answer_id])
    log.info("traced %s over %d tokens x %d layers in %.1fs: answer %r p_clean %.3f p_corrupt %.3f",
             kind, num_tokens, num_layers, seconds, answer, p_clean, p_corrupt)
    return TraceResult(prompt=prompt, subject=subject, kind=kind, tokens=tokens, subject_range=(start, end),
                       answer=answer, p_clean=p_clean, p_corrupt=p_corrupt, scores=scores, answer_id=answer_id,
                       noise=noise_std, samples=samples, window=1 if kind == "hidden" else window, seconds=seconds)


def _label(token: str) -> str:
    return token.replace("\n", "\\n").replace("\t", "\\t") or "''"


def plot_trace(result: TraceResult, path: Path) -> Path:
    """Write the trace as a heatmap PNG (tokens x layers), so a person can see where the fact sits."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    start, end = result.subject_range
    labels = [_label(tok) + ("*" if start <= i < end else "") for i, tok in enumerate(result.tokens)]
    num_tokens, num_layers = result.scores.shape
    figure = Figure(figsize=(max(4.0, 1.5 + 0.22 * num_layers), max(2.5, 1.2 + 0.3 * num_tokens)), dpi=110)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    cmap = {"hidden": "Purples", "mlp": "Greens", "attn": "Reds"}.get(result.kind, "viridis")
    image = axes.imshow(result.scores, cmap=cmap, aspect="auto", interpolation="nearest",
                        vmin=min(float(result.scores.min()), result.p_corrupt))
    axes.set_yticks(range(num_tokens))
    axes.set_yticklabels(labels, fontsize=8)
    step = max(1, num_layers // 15)
    axes.set_xticks(range(0, num_layers, step))
    axes.set_xlabel("layer" if result.kind == "hidden" else f"centre of {result.window}-layer window")
    what = {"hidden": "hidden state", "mlp": "MLP output", "attn": "attention output"}.get(result.kind, result.kind)
    axes.set_title(f"Restoring {what} ({result.kind}) — answer {result.answer!r}\n"
                   f"p_clean {result.p_clean:.3f}, p_corrupt {result.p_corrupt:.3f}", fontsize=9)
    colorbar = figure.colorbar(image, ax=axes)
    colorbar.set_label(f"p({result.answer.strip() or result.answer!r})")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    path = Path(path)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def best_layer(results: list[TraceResult]) -> int:
    """The layer whose MLP restores the answer most at the last subject token, averaged over
    traces: where ROME/MEMIT should write an edit by default."""
    if not results:
        raise VerticalError("best_layer needs at least one trace")
    kinds = {r.kind for r in results}
    if kinds != {"mlp"}:
        raise VerticalError(f"best_layer needs 'mlp' traces (got {', '.join(sorted(kinds))})")
    layer_counts = {r.num_layers for r in results}
    if len(layer_counts) != 1:
        raise VerticalError("best_layer needs traces of one model (their layer counts differ)")
    effects = np.mean([r.scores[r.subject_range[1] - 1] - r.p_corrupt for r in results], axis=0)
    return int(np.argmax(effects))


def _slug(text: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60].strip("-")
    return slug or "subject"


def trace_build(build_dir: Path, prompt: str, subject: str, kind: str = "mlp", out: Path | None = None,
                samples: int = 5, window: int = 5) -> tuple[Path, TraceResult]:
    """Trace a build's most refined model (`vertical trace`) and write the heatmap PNG and a JSON of
    the scores next to it; returns the PNG path and the result."""
    from vertical.paths import best_model_dir
    from vertical.models.registry import load_causal_lm, load_tokenizer

    build_dir = Path(build_dir)
    model_dir = best_model_dir(build_dir)
    if out is None:
        png = build_dir / "trace" / f"{_slug(subject)}-{kind}.png"
    else:
        out = Path(out)
        png = out / f"{_slug(subject)}-{kind}.png" if out.is_dir() or not out.suffix else out.with_suffix(".png")
    log.info("tracing %s with the model in %s", kind, model_dir)
    tokenizer = load_tokenizer(model_dir)
    model = load_causal_lm(model_dir)
    result = causal_trace(model, tokenizer, prompt, subject, kind=kind, samples=samples, window=window)
    result.extra["model_dir"] = str(model_dir)
    plot_trace(result, png)
    atomic_write_json(png.with_suffix(".json"), result.to_json())
    return png, result

