"""The four ways to write a fact into the weights.

ROME  one edit, one layer: a rank-one update of the down projection W of layer l such that the
      subject's key k* now maps to v* = W k* + delta, while keys of other text (second moment C)
      are disturbed as little as possible:   W += delta (C^-1 k*)^T / ((C^-1 k*)^T k*)
MEMIT many edits at once, spread over layers L: the residual target z of each edit at the top of
      L is reached in steps; at each layer, with keys K and the remaining residual R divided over
      the layers left,                      W += R K^T (lambda C + K K^T)^-1
AlphaEdit  MEMIT's schedule, each layer's update projected onto the null space P of the preserved
      keys (the directions that carry almost none of C) and kept off earlier edits' keys K_p
      (Fang et al., ICLR 2025):   W += R K^T P (P (K K^T + K_p K_p^T) + ridge I)^-1
FT    baseline: gradient descent on the same layer's down projection only, each entry kept within
      a small L-infinity distance of its original value (Zhu et al., constrained fine-tuning).

Each returns the weights it changed, before and after, so edits can be logged and rolled back.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from vertical.edit.compute import EditFailed, subject_states, target_deltas
from vertical.edit.layout import FFNLayout
from vertical.edit.tokens import encode, target_ids
from vertical.pack.schema import EditRequest

log = logging.getLogger(__name__)

Moments = Callable[[list[int]], dict[int, torch.Tensor]]  # layer -> C, [m, m]


def _solve(moment: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """C^-1 rhs, with a tiny ridge so a rank-deficient C from little text still solves."""
    ridge = 1e-6 * moment.diagonal().mean().clamp(min=1e-12)
    eye = torch.eye(moment.shape[0], dtype=moment.dtype)
    return torch.linalg.solve(moment.double() + ridge * eye, rhs.double()).float()


def _check(update: torch.Tensor, what: str) -> None:
    if not torch.isfinite(update).all():
        raise EditFailed(f"{what}: the weight update is not finite; nothing was changed")


def rome(model, tokenizer, layout: FFNLayout, request: EditRequest, layer: int, hp, templates: list[str],
         moments: Moments) -> dict[int, torch.Tensor]:
    """Apply one ROME edit in place; returns {layer: delta W}."""
    key = subject_states(model, tokenizer, layout, [request], templates, [layer])[0][layer].mean(0)
    delta = target_deltas(model, tokenizer, layout, [request], layer, "mlp", templates, hp)[0][0]
    if hp.mom2 == "identity":
        left = key.clone()
    else:
        left = _solve(moments([layer])[layer], key)
    update = torch.outer(delta, left) / torch.dot(left, key)
    _check(update, f"ROME edit {request.prompt!r}")
    weight = layout.down_proj(layer).weight
    with torch.no_grad():
        weight += update.to(weight.dtype)
    return {layer: update}


def memit(model, tokenizer, layout: FFNLayout, requests: list[EditRequest], layers: list[int], hp,
          templates: list[str], moments: Moments) -> dict[int, torch.Tensor]:
    """Apply a batch of edits over `layers` in place; returns {layer: delta W}."""
    cov = moments(layers) if hp.mom2 == "stats" else {}

    def solve(layer: int, K: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
        C = cov[layer].double() if layer in cov else torch.eye(K.shape[0], dtype=torch.float64)
        A = hp.mom2_update_weight * C + K @ K.T
        # the same tiny ridge as ROME's solve: C from fewer tokens than the FFN is wide is singular
        A += 1e-6 * A.diagonal().mean().clamp(min=1e-12) * torch.eye(A.shape[0], dtype=A.dtype)
        return torch.linalg.solve(A, (R @ K.T).T).T  # R K^T A^-1 (A symmetric)

    return _spread(model, tokenizer, layout, requests, layers, hp, templates, solve, "MEMIT")


def null_space(moment: torch.Tensor, energy: float) -> torch.Tensor:
    """P [m, m]: the projection onto the key directions that carry the smallest `energy` share of
    the preserved keys' second moment. An update W += X P leaves W k almost unchanged for every
    key k of the preserved text, since P k is almost zero."""
    values, vectors = torch.linalg.eigh(moment.double())  # ascending
    values = values.clamp(min=0)
    share = values.cumsum(0) / values.sum().clamp(min=1e-12)
    basis = vectors[:, share <= energy]
    return basis @ basis.T


def alphaedit(model, tokenizer, layout: FFNLayout, requests: list[EditRequest], layers: list[int], hp,
              templates: list[str], moments: Moments, previous: list[EditRequest] = (),
              kept: dict[int, torch.Tensor] | None = None, added: dict[int, torch.Tensor] | None = None,
              projections: dict[int, torch.Tensor] | None = None) -> dict[int, torch.Tensor]:
    """Apply a batch of edits over `layers` in place, each layer's update projected onto the null
    space of the preserved keys (AlphaEdit); the keys of `previous` edits are kept in place too.

    `kept[layer]`, when given, is the Gram matrix K_p K_p^T of the previous edits' keys at that
    layer, so a long sequence of edits does not recompute every earlier edit's keys at every batch
    (a missing layer is computed from `previous` once and stored); `added[layer]` receives this
    batch's K K^T, for the caller to add to `kept` once the whole batch has succeeded.
    `projections[layer]`, when given, caches P (an eigendecomposition of C per layer, which does not
    change while the key statistics do not). Returns {layer: delta W}."""
    cov = moments(layers) if hp.mom2 == "stats" else {}
    kept = {} if kept is None else kept
    projections = {} if projections is None else projections

    def solve(layer: int, K: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
        m = K.shape[0]
        if layer not in projections:
            projections[layer] = (null_space(cov[layer], hp.null_space_energy) if layer in cov
                                  else torch.eye(m, dtype=torch.float64))
        P = projections[layer]
        if layer not in kept:
            kept[layer] = torch.zeros(m, m, dtype=torch.float64)
            if previous:
                Kp = subject_states(model, tokenizer, layout, list(previous), templates, [layer])[0][layer].T.double()
                kept[layer] = Kp @ Kp.T
        if added is not None:
            added[layer] = K @ K.T
        M = K @ K.T + kept[layer]
        A = P @ M
        A += hp.alphaedit_ridge * A.diagonal().mean().clamp(min=1e-12) * torch.eye(m, dtype=A.dtype)
        # X = A^-1 P K R^T lies in P's range (X = (P K R^T - P M X) / ridge), so W + X^T moves
        # only null-space directions of the preserved keys
        return torch.linalg.solve(A, P @ K @ R.T).T

    return _spread(model, tokenizer, layout, requests, layers, hp, templates, solve, "AlphaEdit")


def _spread(model, tokenizer, layout: FFNLayout, requests: list[EditRequest], layers: list[int], hp,
            templates: list[str], solve: Callable, name: str) -> dict[int, torch.Tensor]:
    """MEMIT's schedule, shared by AlphaEdit: the residual target z of each edit at the top of
    `layers`, reached in steps; each layer takes the remaining residual divided over the layers
    left, through `solve(layer, K [m, n*c], R [d, n*c]) -> delta W [d, m]`."""
    top = layers[-1]
    # the residual at the top layer that each edit's target delta asks for, in every context
    deltas, _ = target_deltas(model, tokenizer, layout, requests, top, "block", templates, hp)
    contexts = len(templates)
    goal = None
    updates: dict[int, torch.Tensor] = {}
    for i, layer in enumerate(layers):
        keys, now = subject_states(model, tokenizer, layout, requests, templates, [layer], top)
        if goal is None:  # nothing written yet: `now` is where every edit starts
            goal = now + deltas.repeat_interleave(contexts, 0)
        K = keys[layer].T.double()  # [m, n*c]
        R = ((goal - now) / (len(layers) - i)).T.double()  # [d, n*c]
        update = solve(layer, K, R).float()
        _check(update, f"{name} batch at layer {layer}")
        weight = layout.down_proj(layer).weight
        with torch.no_grad():
            weight += update.to(weight.dtype)
        updates[layer] = update
    return updates


def constrained_ft(model, tokenizer, layout: FFNLayout, request: EditRequest, layer: int, hp) -> dict[int, torch.Tensor]:
    """Fine-tune layer `layer`'s down projection on the new fact, within an L-inf ball."""
    weight = layout.down_proj(layer).weight
    original = weight.detach().clone()
    new_ids = target_ids(tokenizer, request.target_new)
    prompt_ids = encode(tokenizer, request.prompt)
    ids = torch.tensor([prompt_ids + new_ids])
    labels = torch.full_like(ids, -100)
    labels[0, len(prompt_ids):] = torch.tensor(new_ids)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    weight.requires_grad_(True)
    optimizer = torch.optim.Adam([weight], lr=hp.ft_lr)
    try:
        for _ in range(hp.ft_steps):
            optimizer.zero_grad()
            loss = model(input_ids=ids, labels=labels).loss
            if not torch.isfinite(loss):
                with torch.no_grad():
                    weight.copy_(original)
                raise EditFailed(f"FT edit {request.prompt!r}: loss is not finite; the layer was restored")
            if loss.item() < 0.05:
                break
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                eps = hp.ft_norm_constraint
                weight.copy_(torch.clamp(weight, original - eps, original + eps))
    finally:
        weight.requires_grad_(False)
    return {layer: (weight.detach() - original)}
