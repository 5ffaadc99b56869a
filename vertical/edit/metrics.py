"""Editing metrics as CounterFact defines them, on the raw prompts (no chat template).

efficacy        P(target_new) > P(target_true) on the edit's prompt
generalization  the same on its rephrases
locality        P(locality target) > P(target_new) on the locality prompts (facts that must stay)
portability     the greedy continuation of a portability prompt (a consequence of the new fact)
                starts with its target, token for token
rewrite_acc, rephrase_acc: EasyEdit's names for efficacy and generalization, reported beside them
fluency         ROME's measure: n-gram entropy of the words of text sampled about the subjects
                (lower = repetitive); fluency_greedy: the same of fixed-length greedy text
P(text) is the mean per-token probability of the target tokens after the prompt (log space).
"""

from __future__ import annotations

import math
import re
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


def ngram_entropy(text_tokens: list) -> float:
    """ROME's fluency measure: weighted bi- and tri-gram entropy (weights 2/3 and 4/3, halved)."""
    entropies = []
    for n, weight in ((2, 2 / 3), (3, 4 / 3)):
        grams = Counter(tuple(text_tokens[i:i + n]) for i in range(len(text_tokens) - n + 1))
        total = sum(grams.values())
        entropy = -sum(c / total * math.log2(c / total) for c in grams.values()) if total else 0.0
        entropies.append(weight * entropy)
    return sum(entropies) / 2


WORD = re.compile(r"\w+|[^\w\s]")  # words and punctuation marks, close to nltk's word_tokenize on English


def _end_tokens(model, tokenizer) -> list[int] | None:
    """Every id that would end generation: the tokenizer's and the generation config's."""
    ends = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ends = {tokenizer.eos_token_id, *(ends if isinstance(ends, list) else [ends])} - {None}
    return sorted(ends) or None


def fluency(model, tokenizer, prompts: list[str], tokens: int = 80, samples: int = 2, seed: int = 0) -> float | None:
    """ROME's fluency (Meng et al. 2022, as its evaluation computes it): the mean n-gram entropy of
    the words of each prompt's text, sampled from the 5 likeliest tokens at each step, `samples`
    texts per prompt, every continuation `tokens` long (the end token suppressed). The seed is
    fixed, so the same model draws the same text and a model before and after an edit draws the
    same random numbers: their difference is the edit's, not the sampler's."""
    import torch

    if not prompts:
        return None
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    asked = [prompt for prompt in prompts for _ in range(samples)]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        rows = generate_batch(model, [encode(tokenizer, prompt) for prompt in asked], pad, tokens,
                              do_sample=True, top_k=5, top_p=1.0, temperature=1.0, repetition_penalty=1.0,
                              suppress_tokens=_end_tokens(model, tokenizer),
                              # a broken model's NaN logits would stop the sampler; the edit's own
                              # finiteness check is the one that names the problem
                              remove_invalid_values=True)
    texts = [prompt + tokenizer.decode(row, skip_special_tokens=True) for prompt, row in zip(asked, rows)]
    return round(sum(ngram_entropy(WORD.findall(text)) for text in texts) / len(texts), 4)


def greedy_fluency(model, tokenizer, prompts: list[str], tokens: int = 40) -> float | None:
    """Mean n-gram entropy of greedy continuations of `prompts` (token ids), generated together in
    one left-padded batch. Every continuation is `tokens` long, the end token suppressed: a short
    answer that ends well is not a repetitive one, and cut at its end it would score as one. A
    small model's greedy text falls into loops that the smallest change of weights starts or
    stops, so this moves far more, either way, than `fluency`."""
    if not prompts:
        return None
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows = generate_batch(model, [encode(tokenizer, prompt) for prompt in prompts], pad, tokens,
                          repetition_penalty=1.0, suppress_tokens=_end_tokens(model, tokenizer))
    return round(sum(ngram_entropy(row) for row in rows) / len(rows), 4)
