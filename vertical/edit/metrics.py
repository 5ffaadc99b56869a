"""Editing metrics as CounterFact defines them, on the raw prompts (no chat template).

efficacy        P(target_new) > P(target_true) on the edit's prompt
generalization  the same on its rephrases
locality        P(locality target) > P(target_new) on the locality prompts (facts that must stay)
portability     the greedy continuation of a portability prompt (a consequence of the new fact)
                starts with its target, token for token
rewrite_acc, rephrase_acc: EasyEdit's names for efficacy and generalization, reported beside them
fluency         n-gram entropy of fixed-length greedy text about the subjects (lower = repetitive)
P(text) is the mean per-token probability of the target tokens after the prompt (log space).
"""

from __future__ import annotations

import math
from collections import Counter


from vertical.edit.tokens import encode, target_ids
from vertical.generation import generate_batch, mean_logprobs
from vertical.pack.schema import EditRequest


def target_logprobs(model, tokenizer, pairs: list[tuple[str, str]]) -> list[float]:
    """P(target | prompt) as mean token log-probability, for (prompt, target) pairs in batches."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return mean_logprobs(model, [(encode(tokenizer, p), target_ids(tokenizer, t)) for p, t in pairs], pad)


def greedy_target(model, tokenizer, prompt: str, tokens: int = 3) -> str:
    """The model's own continuation: the "true" target when a request gives none."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    row = generate_batch(model, [encode(tokenizer, prompt)], pad, tokens)[0]
    return tokenizer.decode(row, skip_special_tokens=True).strip() or "the"


def compared_pairs(requests: list[EditRequest], true_targets: list[str]) -> list[tuple[str, str, str, str]]:
    """Each CounterFact comparison as (metric, prompt, target that should win, target it must beat)."""
    pairs = []
    for request, true in zip(requests, true_targets):
        pairs.append(("efficacy", request.prompt, request.target_new, true))
        pairs += [("generalization", rephrase, request.target_new, true) for rephrase in request.rephrase]
        pairs += [("locality", item.prompt, item.target, request.target_new) for item in request.locality]
    return pairs


def tally(pairs: list[tuple[str, str, str, str]], wins: list[bool]) -> dict[str, float | None]:
    """The share of won comparisons per metric."""
    mean = lambda xs: round(sum(xs) / len(xs), 4) if xs else None  # noqa: E731
    return {metric: mean([won for (kind, *_), won in zip(pairs, wins) if kind == metric])
            for metric in ("efficacy", "generalization", "locality")}


def portability(model, tokenizer, requests: list[EditRequest]) -> float | None:
    """The share of portability prompts whose greedy continuation is their target's tokens."""
    items = [item for request in requests for item in request.portability]
    if not items:
        return None
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    targets = [target_ids(tokenizer, item.target) for item in items]
    rows = generate_batch(model, [encode(tokenizer, item.prompt) for item in items], pad, max(len(t) for t in targets))
    return round(sum(list(row[:len(t)]) == list(t) for row, t in zip(rows, targets)) / len(items), 4)


def score(model, tokenizer, requests: list[EditRequest], true_targets: list[str]) -> dict[str, float | int]:
    pairs = compared_pairs(requests, true_targets)
    logp = target_logprobs(model, tokenizer, [(p, t) for _, p, winner, loser in pairs for t in (winner, loser)])
    result = tally(pairs, [logp[2 * i] > logp[2 * i + 1] for i in range(len(pairs))])
    counts = {kind: sum(pair[0] == kind for pair in pairs) for kind in ("efficacy", "generalization", "locality")}
    return {**result, "rewrite_acc": result["efficacy"], "rephrase_acc": result["generalization"],
            "portability": portability(model, tokenizer, requests), "n_edits": counts["efficacy"],
            "n_rephrases": counts["generalization"], "n_locality": counts["locality"],
            "n_portability": sum(len(r.portability) for r in requests)}


def ngram_entropy(text_tokens: list[int]) -> float:
    """ROME's fluency measure: weighted bi- and tri-gram entropy (weights 2/3 and 4/3, halved)."""
    entropies = []
    for n, weight in ((2, 2 / 3), (3, 4 / 3)):
        grams = Counter(tuple(text_tokens[i:i + n]) for i in range(len(text_tokens) - n + 1))
        total = sum(grams.values())
        entropy = -sum(c / total * math.log2(c / total) for c in grams.values()) if total else 0.0
        entropies.append(weight * entropy)
    return sum(entropies) / 2


def fluency(model, tokenizer, prompts: list[str], tokens: int = 40) -> float | None:
    """Mean n-gram entropy of greedy continuations of `prompts`, generated together in one
    left-padded batch (a CPU decodes twenty rows for about the price of a few). Every continuation
    is `tokens` long, the end token suppressed, as in ROME's fixed-length measure: a short answer
    that ends well is not a repetitive one, and cut at its end it would score as one."""
    if not prompts:
        return None
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    # every id that would end generation: the tokenizer's and the generation config's (one or a list)
    ends = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ends = {tokenizer.eos_token_id, *(ends if isinstance(ends, list) else [ends])} - {None}
    suppressed = sorted(ends) or None
    rows = generate_batch(model, [encode(tokenizer, prompt) for prompt in prompts], pad, tokens,
                          repetition_penalty=1.0, suppress_tokens=suppressed)
    return round(sum(ngram_entropy(row) for row in rows) / len(rows), 4)
