"""Second moment of FFN keys, C = E[k k^T], which ROME and MEMIT use so an edit disturbs the
keys of other knowledge as little as possible. Computed from the pack's documents plus generic
text shipped with vertical, and cached per model weights, layer and text."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import torch

from vertical.edit.compute import capture_keys, forward_until
from vertical.edit.layout import FFNLayout
from vertical.io import atomic_write_bytes
from vertical.paths import cache_dir

log = logging.getLogger(__name__)

GENERIC_TEXT = Path(__file__).with_name("generic_text.txt")


def stats_texts(documents: list[str]) -> list[str]:
    generic = GENERIC_TEXT.read_text(encoding="utf-8").split("\n\n")
    return [t for t in generic + documents if t.strip()]


def _fingerprint(model, layer: int, texts: list[str], tokens: int, layout: FFNLayout) -> str:
    digest = hashlib.sha256()
    weight = layout.down_proj(layer).weight
    digest.update(str((layer, tokens, tuple(weight.shape))).encode())
    # the keys depend on every layer up to this one; a sample of their weights identifies the model
    for module in layout.layers[: layer + 1]:
        for parameter in module.parameters():
            digest.update(parameter.detach().flatten()[:64].float().numpy().tobytes())
    for text in texts:
        digest.update(text.encode())
    return digest.hexdigest()[:24]


def second_moment(model, tokenizer, layout: FFNLayout, layers: list[int], texts: list[str], tokens: int,
                  block: int = 256) -> dict[int, torch.Tensor]:
    """C for each layer ([m, m], float32), from up to `tokens` tokens of `texts`; cached on disk."""
    result: dict[int, torch.Tensor] = {}
    missing = []
    for layer in layers:
        path = cache_dir() / "stats" / f"mom2-{_fingerprint(model, layer, texts, tokens, layout)}-l{layer}.npy"
        if path.is_file():
            result[layer] = torch.from_numpy(np.load(path))
        else:
            missing.append((layer, path))
    if not missing:
        return result
    ids = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if len(ids) >= tokens:
            break
    ids = ids[:tokens]
    if len(ids) < 2 * layout.down_proj(0).in_features:
        log.warning("only %d tokens of text for the key statistics (fewer than 2x the FFN width); "
                    "the covariance may be poorly conditioned", len(ids))
    width = layout.down_proj(0).in_features
    sums = {layer: torch.zeros(width, width, dtype=torch.float64) for layer, _ in missing}
    count = 0
    # the keys of layer l depend on layers 0..l only: the forward stops there (layer 6 of 30 is a
    # fifth of the model's work), once the capture hooks have seen the last layer's keys
    last = max(layer for layer, _ in missing)
    with torch.inference_mode(), capture_keys(layout, [layer for layer, _ in missing]) as seen:
        for start in range(0, len(ids), block):
            chunk = torch.tensor([ids[start:start + block]])
            forward_until(model, layout.down_proj(last), input_ids=chunk)
            for layer, _ in missing:
                keys = seen[layer][0].double()
                sums[layer] += keys.T @ keys
            count += chunk.shape[1]
    for layer, path in missing:
        moment = (sums[layer] / max(count, 1)).float()
        path.parent.mkdir(parents=True, exist_ok=True)
        import io

        buffer = io.BytesIO()
        np.save(buffer, moment.numpy())
        atomic_write_bytes(path, buffer.getvalue())
        result[layer] = moment
    log.info("key statistics for layers %s from %d tokens", [layer for layer, _ in missing], count)
    return result
