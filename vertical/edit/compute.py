"""What ROME and MEMIT share: the FFN keys of a subject and the target vector of an edit.

key  k*: the input of layer l's down projection at the subject's last token, averaged over the
          prompt preceded by several short random contexts (so the edit holds in other contexts).
value v*: found by gradient descent on a vector `delta` added to a module's output at that token,
          until the model completes the prompt with the new target; a KL term on "<subject> is a"
          keeps what else the model says about the subject, and a norm clamp keeps it small.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch

from vertical.edit.layout import FFNLayout
from vertical.edit.tokens import encode, subject_span, target_ids
from vertical.generation import generate_batch, left_padded
from vertical.errors import VerticalError
from vertical.pack.schema import EditRequest

log = logging.getLogger(__name__)


class EditFailed(VerticalError):
    """An edit could not be computed (for example a NaN during optimisation); nothing was written."""


def context_templates(model, tokenizer, count: int, length: int, seed: int) -> list[str]:
    """"{}" plus `count` short prefixes sampled from the model itself (top-5 sampling), as ROME does."""
    if count == 0:
        return ["{}"]
    starts = ["The", "Therefore", "Because", "I", "You", "It", "In", "However", "When", "This"]
    prompts = [starts[i % len(starts)] for i in range(count)]
    rows = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
    pad = tokenizer.pad_token_id or 0
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        new = generate_batch(model, rows, pad, length, do_sample=True, top_k=5, renormalize_logits=True,
                             remove_invalid_values=False)
    templates = ["{}"]
    for prompt, row in zip(rows, new):
        text = tokenizer.decode(prompt + row, skip_special_tokens=True).replace("{", " ").replace("}", " ")
        templates.append(" ".join(text.split()) + ". {}")
    return templates


@dataclass
class Batch:
    """Tokenised prompts, right-padded, with the positions the methods read and write."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    lookup: list[int]  # last subject token of each row


def in_contexts(templates: list[str], prompt: str) -> tuple[list[str], list[int]]:
    """The prompt behind each context prefix, and where in each text the prompt begins."""
    return [t.format(prompt) for t in templates], [t.index("{}") for t in templates]


def batch_prompts(tokenizer, texts: list[str], subjects: list[str], starts: list[int] | None = None) -> Batch:
    rows = [encode(tokenizer, text) for text in texts]
    starts = starts or [0] * len(texts)
    lookup = [subject_span(tokenizer, text, subject, start)[1] - 1 for text, subject, start in zip(texts, subjects, starts)]
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id or 0
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return Batch(ids, mask, lookup)


@contextlib.contextmanager
def capture_keys(layout: FFNLayout, layers: list[int]):
    """Record the input of each listed layer's down projection (the FFN keys) during a forward."""
    seen: dict[int, torch.Tensor] = {}
    handles = []
    for layer in layers:
        def hook(module, args, layer=layer):
            seen[layer] = args[0].detach()
        handles.append(layout.down_proj(layer).register_forward_pre_hook(hook))
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def keys_at(model, tokenizer, layout: FFNLayout, layers: list[int], request: EditRequest, templates: list[str],
            per_context: bool = False) -> dict[int, torch.Tensor]:
    """k* for each layer: [m] averaged over contexts, or [contexts, m] with per_context."""
    texts, starts = in_contexts(templates, request.prompt)
    batch = batch_prompts(tokenizer, texts, [request.subject] * len(texts), starts)
    with torch.inference_mode(), capture_keys(layout, layers) as seen:
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    rows = torch.arange(len(texts))
    keys = {layer: seen[layer][rows, batch.lookup].float() for layer in layers}
    return keys if per_context else {layer: k.mean(0) for layer, k in keys.items()}


def _output_tensor(output):
    return output[0] if isinstance(output, tuple) else output


@dataclass
class SplitRows:
    """Rows cut at the subject's last token. The delta is added there, so nothing before it
    changes while the target is searched: the prefix runs once into a KV cache and each
    optimisation step runs only the suffix (about half of each row's tokens)."""

    prefix_ids: torch.Tensor  # [rows, P], left-padded
    prefix_mask: torch.Tensor
    suffix_ids: torch.Tensor  # [rows, S], right-padded; column 0 is the subject's last token
    suffix_mask: torch.Tensor
    prefix_lengths: torch.Tensor  # [rows]

    @classmethod
    def cut(cls, rows: list[list[int]], cuts: list[int], pad: int) -> "SplitRows":
        prefixes = [row[:cut] for row, cut in zip(rows, cuts)]
        prefix_ids, prefix_mask = left_padded(prefixes, pad) if max(map(len, prefixes)) else (
            torch.zeros((len(rows), 0), dtype=torch.long), torch.zeros((len(rows), 0), dtype=torch.long))
        suffixes = [row[cut:] for row, cut in zip(rows, cuts)]
        width = max(map(len, suffixes))
        suffix_ids = torch.tensor([r + [pad] * (width - len(r)) for r in suffixes])
        suffix_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in suffixes])
        return cls(prefix_ids, prefix_mask, suffix_ids, suffix_mask, torch.tensor([len(p) for p in prefixes]))

    def prefix_cache(self, model):
        """The prefix's KV cache (None when every prefix is empty)."""
        if self.prefix_ids.shape[1] == 0:
            return None
        positions = (self.prefix_mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            return model(input_ids=self.prefix_ids, attention_mask=self.prefix_mask, position_ids=positions,
                         use_cache=True).cache

    def suffix_logits(self, model, cache, keep: torch.Tensor) -> torch.Tensor:
        """Logits at the suffix columns `keep`, continuing from a copy of the prefix's cache."""
        import copy

        positions = self.prefix_lengths[:, None] + torch.arange(self.suffix_ids.shape[1])[None, :]
        return model(input_ids=self.suffix_ids, attention_mask=torch.cat([self.prefix_mask, self.suffix_mask], 1),
                     position_ids=positions, cache=copy.deepcopy(cache) if cache is not None else None,
                     use_cache=cache is not None, logits_to_keep=keep).logits


def target_delta(model, tokenizer, layout: FFNLayout, request: EditRequest, layer: int, where: str,
                 templates: list[str], hp) -> tuple[torch.Tensor, torch.Tensor]:
    """Optimise the vector added at the subject's last token to `where` ("mlp": layer l's FFN
    output, for ROME; "block": layer l's residual output, for MEMIT). Returns (delta, init), with
    init the module's original output there (averaged over contexts)."""
    from vertical.models.registry import autocast

    new_ids = target_ids(tokenizer, request.target_new)
    rewrite, starts = in_contexts(templates, request.prompt)
    kl_prompt = f"{request.subject} is a"
    rows = [encode(tokenizer, text) + new_ids[:-1] for text in rewrite] + [encode(tokenizer, kl_prompt)]
    prompt_lengths = [len(encode(tokenizer, text)) for text in rewrite]
    lookup = [subject_span(tokenizer, text, request.subject, start)[1] - 1 for text, start in zip(rewrite, starts)]
    lookup.append(subject_span(tokenizer, kl_prompt, request.subject)[1] - 1)
    split = SplitRows.cut(rows, lookup, tokenizer.pad_token_id or 0)
    # positions from here on count from each row's subject token (suffix column 0)
    label_columns = [[start - 1 - cut + j for j in range(len(new_ids))] for start, cut in zip(prompt_lengths, lookup)]
    # logits only where the loss reads them (the target's positions, the KL token): the vocabulary
    # projection over every position would be a fifth of each step's work for nothing
    keep = sorted({c for columns in label_columns for c in columns} | {0})
    kl_column = keep.index(0)
    labels = torch.full((len(rows), len(keep)), -100)
    for i, columns in enumerate(label_columns):
        for j, column in enumerate(columns):
            labels[i, keep.index(column)] = new_ids[j]
    keep = torch.tensor(keep)
    with autocast():  # the prefix as the steps see it (same arithmetic)
        cache = split.prefix_cache(model)

    module = layout.mlp(layer) if where == "mlp" else layout.layers[layer]
    hidden = model.config.hidden_size
    delta = torch.zeros(hidden, requires_grad=True)
    state = {"init": None}

    def add_delta(_module, _args, output):
        tensor = _output_tensor(output)
        if state["init"] is None:
            state["init"] = tensor[:-1, 0].detach().float().mean(0)
        tensor = tensor.clone()
        tensor[:, 0] = tensor[:, 0] + delta.to(tensor.dtype)
        return (tensor, *output[1:]) if isinstance(output, tuple) else tensor

    for parameter in model.parameters():
        parameter.requires_grad_(False)
    optimizer = torch.optim.Adam([delta], lr=hp.v_lr)
    handle = module.register_forward_hook(add_delta)
    kl_start = None
    try:
        for step in range(hp.v_steps):
            optimizer.zero_grad()
            with autocast():  # the search for delta tolerates bf16; keys and the update stay fp32
                logits = split.suffix_logits(model, cache, keep).float()
            kl_logp = logits[-1, kl_column].log_softmax(-1)
            if kl_start is None:
                kl_start = kl_logp.detach()
            logp = logits[:-1].log_softmax(-1)
            mask = labels[:-1] != -100
            token_logp = logp.gather(-1, labels[:-1].clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
            nll = -(token_logp.sum(1) / mask.sum(1)).mean()
            kl = torch.nn.functional.kl_div(kl_logp, kl_start, log_target=True, reduction="sum")
            decay = hp.v_weight_decay * delta.norm() ** 2 / state["init"].norm() ** 2
            loss = nll + hp.kl_factor * kl + decay
            if not torch.isfinite(loss):
                raise EditFailed(f"edit {request.prompt!r} -> {request.target_new!r}: the optimisation diverged "
                                 "(loss is not finite); nothing was changed. Try a smaller stages.edit v_lr")
            if nll.item() < 0.05:  # the new target is near certain in every context
                break
            loss.backward()
            optimizer.step()
            with torch.no_grad():  # keep the change in proportion to what the module normally writes
                limit = hp.clamp_norm_factor * state["init"].norm()
                if delta.norm() > limit:
                    delta.mul_(limit / delta.norm())
    finally:
        handle.remove()
    log.debug("target for %r at layer %d: nll %.3f after %d steps", request.target_new, layer, nll.item(), step + 1)
    return delta.detach(), state["init"]
