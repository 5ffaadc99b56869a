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


class _Seen(Exception):
    """Ends a forward early: the hooks have seen everything it was run for."""


def forward_until(model, module, **inputs) -> None:
    """Run the model on `inputs` only up to `module`'s output: what edits read lies in the lower
    layers (layer 8 of 30 is under a third of the model's work)."""
    def stop(_module, _args, _output):
        raise _Seen

    handle = module.register_forward_hook(stop)
    try:
        model(**inputs, use_cache=False)
    except _Seen:
        pass
    finally:
        handle.remove()


# rows per forward: enough for the matrix products to run at full speed on a CPU
ROWS_PER_FORWARD = 128


def subject_states(model, tokenizer, layout: FFNLayout, requests: list[EditRequest], templates: list[str],
                   key_layers: list[int], residual_layer: int | None = None,
                   ) -> tuple[dict[int, torch.Tensor], torch.Tensor | None]:
    """At the subject's last token of every request in every context (rows request by request,
    contexts in template order): the FFN keys of `key_layers` ({layer: [n*c, m]}) and, when
    asked, the residual output of `residual_layer` ([n*c, d]). All requests share each forward,
    which stops at the highest layer needed."""
    texts, subjects, starts = [], [], []
    for request in requests:
        in_context, at = in_contexts(templates, request.prompt)
        texts += in_context
        starts += at
        subjects += [request.subject] * len(in_context)
    top = max([*key_layers, *([] if residual_layer is None else [residual_layer])])
    keys: dict[int, list[torch.Tensor]] = {layer: [] for layer in key_layers}
    residuals: list[torch.Tensor] = []
    seen_residual = {}

    def record(_module, _args, output):
        seen_residual["h"] = _output_tensor(output).detach()

    # registered before forward_until's stop hook on the same layer, so it runs first
    handle = layout.layers[residual_layer].register_forward_hook(record) if residual_layer is not None else None
    try:
        with torch.inference_mode(), capture_keys(layout, key_layers) as seen:
            for first in range(0, len(texts), ROWS_PER_FORWARD):
                part = slice(first, first + ROWS_PER_FORWARD)
                batch = batch_prompts(tokenizer, texts[part], subjects[part], starts[part])
                forward_until(model, layout.layers[top], input_ids=batch.input_ids, attention_mask=batch.attention_mask)
                rows = torch.arange(len(batch.lookup))
                for layer in key_layers:
                    keys[layer].append(seen[layer][rows, batch.lookup].float())
                if residual_layer is not None:
                    residuals.append(seen_residual["h"][rows, batch.lookup].float())
    finally:
        if handle is not None:
            handle.remove()
    return {layer: torch.cat(parts) for layer, parts in keys.items()}, torch.cat(residuals) if residuals else None


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


@dataclass
class SearchRows:
    """One request's rows for the target search: its prompt in every context followed by the new
    target, then "<subject> is a" for the KL term; each cut at the subject's last token."""

    rows: list[list[int]]  # the KL row last
    cuts: list[int]
    labels: list[list[tuple[int, int]]]  # per context row: (suffix column, target token)

    @classmethod
    def of(cls, tokenizer, request: EditRequest, templates: list[str]) -> "SearchRows":
        new_ids = target_ids(tokenizer, request.target_new)
        rewrite, starts = in_contexts(templates, request.prompt)
        rows, cuts, labels = [], [], []
        for text, start in zip(rewrite, starts):
            prompt_ids = encode(tokenizer, text)
            cut = subject_span(tokenizer, text, request.subject, start)[1] - 1
            # columns count from the row's suffix (column 0: the subject's last token)
            labels.append([(len(prompt_ids) - 1 - cut + j, token) for j, token in enumerate(new_ids)])
            rows.append(prompt_ids + new_ids[:-1])
            cuts.append(cut)
        kl_prompt = f"{request.subject} is a"
        rows.append(encode(tokenizer, kl_prompt))
        cuts.append(subject_span(tokenizer, kl_prompt, request.subject)[1] - 1)
        return cls(rows, cuts, labels)

    @property
    def suffix_width(self) -> int:
        return max(len(row) - cut for row, cut in zip(self.rows, self.cuts))


@contextlib.contextmanager
def eager_attention(model):
    """Plain matrix-product attention while the target is searched: for rows this short, its
    backward on a CPU takes a third of the time of the fused (flash) kernel's."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


# suffix tokens (padding included) per search batch: enough for the matrix products to run at
# full speed on a CPU, few enough that the logits and activations kept for the backward fit
SEARCH_TOKENS = 1024


def target_deltas(model, tokenizer, layout: FFNLayout, requests: list[EditRequest], layer: int, where: str,
                  templates: list[str], hp) -> tuple[torch.Tensor, torch.Tensor]:
    """Optimise, for each request, the vector added at its subject's last token to `where`
    ("mlp": layer l's FFN output, for ROME; "block": layer l's residual output, for MEMIT).
    Returns (delta [n, d], init [n, d]), init being the module's original output there averaged
    over contexts. Requests are searched together: each has its own delta, loss and stopping
    point, and one forward and backward serves a batch of them. Batches hold requests of similar
    suffix length (the text after the subject plus the target), so little of them is padding."""
    prepared = [SearchRows.of(tokenizer, request, templates) for request in requests]
    order = sorted(range(len(requests)), key=lambda i: prepared[i].suffix_width)
    batches: list[list[int]] = [[]]
    for i in order:
        batch = [*batches[-1], i]
        padded = sum(len(prepared[j].rows) for j in batch) * prepared[i].suffix_width
        if batches[-1] and padded > SEARCH_TOKENS:
            batches.append([i])
        else:
            batches[-1] = batch
    delta = torch.zeros(len(requests), model.config.hidden_size)
    init = torch.zeros(len(requests), model.config.hidden_size)
    with eager_attention(model):
        for batch in batches:
            delta[batch], init[batch] = _search(model, layout, [requests[i] for i in batch], [prepared[i] for i in batch],
                                                tokenizer.pad_token_id or 0, layer, where, hp)
    return delta, init


def _search(model, layout: FFNLayout, requests: list[EditRequest], prepared: list[SearchRows], pad: int,
            layer: int, where: str, hp) -> tuple[torch.Tensor, torch.Tensor]:
    from vertical.models.registry import autocast

    rows, cuts, owners, kl_rows, label_cells = [], [], [], [], []
    for n, request_rows in enumerate(prepared):
        rows += request_rows.rows
        cuts += request_rows.cuts
        owners += [n] * len(request_rows.rows)
        label_cells += request_rows.labels
        kl_rows.append(len(rows) - 1)
    split = SplitRows.cut(rows, cuts, pad)
    # logits only where the loss reads them (the targets' positions, the KL token): the vocabulary
    # projection over every position would be a fifth of each step's work for nothing
    keep = sorted({column for cells in label_cells for column, _ in cells} | {0})
    kl_column = keep.index(0)
    rewrite_rows = sorted(set(range(len(rows))) - set(kl_rows))
    labels = torch.full((len(rewrite_rows), len(keep)), -100)
    for i, cells in enumerate(label_cells):
        for column, token in cells:
            labels[i, keep.index(column)] = token
    keep = torch.tensor(keep)
    mask = labels != -100
    owner = torch.tensor(owners)
    rewrite_owner = owner[rewrite_rows]
    contexts = torch.bincount(rewrite_owner, minlength=len(requests)).float()
    with autocast():  # the prefix as the steps see it (same arithmetic)
        cache = split.prefix_cache(model)

    module = layout.mlp(layer) if where == "mlp" else layout.layers[layer]
    delta = torch.zeros(len(requests), model.config.hidden_size, requires_grad=True)
    state = {"init": None}

    def add_delta(_module, _args, output):
        tensor = _output_tensor(output)
        if state["init"] is None:
            at_subject = tensor[rewrite_rows, 0].detach().float()
            sums = torch.zeros(len(requests), at_subject.shape[1]).index_add_(0, rewrite_owner, at_subject)
            state["init"] = sums / contexts[:, None]
        tensor = tensor.clone()
        tensor[:, 0] = tensor[:, 0] + delta[owner].to(tensor.dtype)
        return (tensor, *output[1:]) if isinstance(output, tuple) else tensor

    for parameter in model.parameters():
        parameter.requires_grad_(False)
    optimizer = torch.optim.Adam([delta], lr=hp.v_lr)
    handle = module.register_forward_hook(add_delta)
    done = torch.zeros(len(requests), dtype=torch.bool)
    kl_start = None
    try:
        for step in range(hp.v_steps):
            optimizer.zero_grad()
            with autocast():  # the search for delta tolerates bf16; keys and the update stay fp32
                logits = split.suffix_logits(model, cache, keep).float()
            kl_logp = logits[kl_rows, kl_column].log_softmax(-1)  # [n, vocab]
            if kl_start is None:
                kl_start = kl_logp.detach()
            logp = logits[rewrite_rows].log_softmax(-1)
            token_logp = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
            row_nll = -token_logp.sum(1) / mask.sum(1)
            nll = torch.zeros(len(requests)).index_add(0, rewrite_owner, row_nll) / contexts
            kl = (kl_start.exp() * (kl_start - kl_logp)).sum(-1)
            decay = hp.v_weight_decay * delta.norm(dim=1) ** 2 / state["init"].norm(dim=1) ** 2
            loss = nll + hp.kl_factor * kl + decay
            bad = (~torch.isfinite(loss)).nonzero().flatten().tolist()
            if bad:
                request = requests[bad[0]]
                raise EditFailed(f"edit {request.prompt!r} -> {request.target_new!r}: the optimisation diverged "
                                 "(loss is not finite); nothing was changed. Try a smaller stages.edit v_lr")
            done |= nll.detach() < 0.05  # the new target is near certain in every context
            log.debug('step %d done %d/%d', step, int(done.sum()), len(done))
            if done.all():
                break
            (loss * ~done).sum().backward()
            before = delta.detach().clone()
            optimizer.step()
            with torch.no_grad():
                delta[done] = before[done]  # a finished search keeps the delta that reached its target
                # keep each change in proportion to what the module normally writes
                limit = hp.clamp_norm_factor * state["init"].norm(dim=1)
                norm = delta.norm(dim=1)
                delta.mul_(torch.where(norm > limit, limit / norm, torch.ones_like(norm))[:, None])
    finally:
        handle.remove()
    log.debug("targets at layer %d: nll %s after %d steps", layer, [round(v, 3) for v in nll.tolist()], step + 1)
    return delta.detach(), state["init"]
