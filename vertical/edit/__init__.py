"""Stage `edit`: write the pack's knowledge edits directly into the FFN weights, and undo them.

    source model (tune/merged, else base/model) -> trace -> ROME | MEMIT | FT -> edit/
        model/          the edited model (plain Hugging Face folder)
        log.jsonl       every applied edit: requests, method, layers, time, its weights file
        deltas/<id>.safetensors   per changed weight: `before.<name>` and `delta.<name>`
        metrics.json    efficacy, generalization, locality, fluency before and after; s/edit

Every edit is reversible bit-for-bit (`rollback` writes back the stored `before` tensors), and
the deltas can be added to another copy of the same model (`apply_deltas`). The model on disk
is only ever replaced whole, after all edits of a run succeeded.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import zip_longest
from pathlib import Path
from typing import Any

from vertical.errors import VerticalError
from vertical.io import sha256_text

log = logging.getLogger(__name__)

LOG_FILE = "log.jsonl"


def inputs(ctx) -> dict[str, Any]:
    settings = ctx.pack.config.stages.edit
    return {"edits": ctx.pack.fingerprint("edits"), "settings": settings.model_dump(),
            "documents": ctx.pack.fingerprint("documents") if settings.hparams.mom2 == "stats" else None,
            "conversations": [ctx.pack.fingerprint("instructions"), ctx.pack.config.system_prompt]
            if settings.hparams.mom2 == "stats" else None,
            "hparams_files": sha256_text("".join(p.read_text() for p in sorted(Path(__file__).with_name("hparams").glob("*.yaml"))))}


def source_model_dir(build_dir: Path) -> Path:
    """What the edit stage starts from: the tuned model if the build has one, else the base."""
    for rel in ("tune/merged", "base/model"):
        if (Path(build_dir) / rel / "config.json").is_file():
            return Path(build_dir) / rel
    raise VerticalError(f"{build_dir} has no model to edit; run `vertical build PACK --steps base` first")


@dataclass
class Editor:
    """A loaded model ready to be edited: its layout, hyperparameters and statistics."""

    model: Any
    tokenizer: Any
    layout: Any
    hp: Any
    model_name: str
    documents: list[str]
    previous: list = field(default_factory=list)  # requests already in the weights, which AlphaEdit keeps
    _kept: dict = field(default_factory=dict)  # AlphaEdit: per layer, the Gram matrix of `previous`'s keys
    _null_spaces: dict = field(default_factory=dict)  # AlphaEdit: per layer, the projection P of the key statistics

    @classmethod
    def load(cls, model_dir: Path, model_name: str, overrides: dict | None, documents: list[str]) -> "Editor":
        from vertical.edit.hparams import load_hparams
        from vertical.edit.layout import ffn_layout
        from vertical.models import load_causal_lm, load_tokenizer

        model = load_causal_lm(model_dir)
        return cls(model, load_tokenizer(model_dir), ffn_layout(model), load_hparams(model_name, overrides),
                   model_name, documents)

    @classmethod
    def of_pack(cls, model_dir: Path, model_name: str, pack) -> "Editor":
        """An editor with the pack's hyperparameters, its key statistics taken from the pack's
        text (`key_texts`) unless the pack sets `mom2: identity`."""
        settings = pack.config.stages.edit
        editor = cls.load(model_dir, model_name, settings.hparams.model_dump(exclude_unset=True), [])
        if settings.hparams.mom2 == "stats":
            editor.documents = key_texts(pack, editor.tokenizer)
        return editor

    def moments(self, layers: list[int]):
        """Key statistics of the model as loaded, computed once per layer (later edits in the same
        run must not shift the statistics that protect other knowledge)."""
        from vertical.edit.stats import second_moment, stats_texts

        if not hasattr(self, "_moments"):
            self._moments = {}
        missing = [layer for layer in layers if layer not in self._moments]
        if missing:
            self._moments.update(second_moment(self.model, self.tokenizer, self.layout, missing,
                                               stats_texts(self.documents), self.hp.mom2_tokens))
        return {layer: self._moments[layer] for layer in layers}

    def templates(self) -> list[str]:
        from vertical.edit.compute import context_templates

        if not hasattr(self, "_templates"):
            self._templates = context_templates(self.model, self.tokenizer, self.hp.context_templates,
                                                self.hp.context_tokens, self.hp.seed)
        return self._templates

    def edit_layer(self, requests) -> int:
        """The configured layer, or the one a causal trace of these edits points to."""
        if self.hp.layer != "auto":
            return self._valid(self.hp.layer)
        from vertical.edit.trace import best_layer, causal_trace

        traces = [causal_trace(self.model, self.tokenizer, r.prompt, r.subject, kind="mlp", samples=3)
                  for r in requests[:4]]
        layer = best_layer(traces)
        log.info("edit layer %d chosen by causal tracing of %d prompts", layer, len(traces))
        return layer

    def memit_layers(self, requests) -> list[int]:
        if self.hp.layers != "auto":
            return [self._valid(layer) for layer in self.hp.layers]
        centre = self.edit_layer(requests)
        span = self.hp.memit_span
        start = max(0, min(centre - span // 2, self.layout.num_layers - span))
        return list(range(start, min(start + span, self.layout.num_layers)))

    def _valid(self, layer: int) -> int:
        if not 0 <= layer < self.layout.num_layers:
            raise VerticalError(f"edit layer {layer} does not exist: the model has layers 0..{self.layout.num_layers - 1}")
        return layer

    def apply(self, requests, method: str, track=None) -> list[tuple[dict, dict]]:
        """Apply the requests in memory. Returns (log entry, tensors) per applied edit; on any
        failure every weight touched so far is restored before the error propagates. `track`
        (the build's progress reporter) shows one step per ROME / FT edit."""
        import torch

        from vertical.edit.methods import alphaedit, constrained_ft, memit, rome

        applied: list[tuple[dict, dict]] = []
        originals: dict[str, torch.Tensor] = {}
        added: dict[int, torch.Tensor] = {}  # AlphaEdit: this batch's key Gram matrices, kept once it succeeds

        def run(batch, layers, call):
            names = {layer: self.layout.weight_name(self.model, layer) for layer in layers}
            before = {layer: self.layout.down_proj(layer).weight.detach().clone() for layer in layers}
            for layer, name in names.items():
                originals.setdefault(name, before[layer])
            started = time.perf_counter()
            call()
            seconds = time.perf_counter() - started
            tensors = {}
            for layer, name in names.items():
                after = self.layout.down_proj(layer).weight.detach()
                tensors[f"before.{name}"] = before[layer]
                tensors[f"delta.{name}"] = after - before[layer]
            entry = {"method": method, "layers": layers, "weights": list(names.values()),
                     "requests": [r.model_dump(exclude_none=True) for r in batch], "seconds": round(seconds, 3)}
            applied.append((entry, tensors))

        try:
            if method == "memit":
                layers = self.memit_layers(requests)
                run(requests, layers, lambda: memit(self.model, self.tokenizer, self.layout, requests, layers, self.hp,
                                                    self.templates(), self.moments))
            elif method == "alphaedit":
                layers = self.memit_layers(requests)
                run(requests, layers, lambda: alphaedit(self.model, self.tokenizer, self.layout, requests, layers,
                                                        self.hp, self.templates(), self.moments, self.previous,
                                                        self._kept, added, self._null_spaces))
            else:
                layer = self.edit_layer(requests)
                for request in track(requests, len(requests), f"{method} edits") if track else requests:
                    if method == "rome":
                        call = lambda r=request: rome(self.model, self.tokenizer, self.layout, r, layer, self.hp,  # noqa: E731
                                                      self.templates(), self.moments)
                    elif method == "ft":
                        call = lambda r=request: constrained_ft(self.model, self.tokenizer, self.layout, r, layer, self.hp)  # noqa: E731
                    else:
                        raise VerticalError(f"unknown edit method '{method}': use rome, memit, alphaedit or ft")
                    run([request], [layer], call)
        except BaseException:
            params = dict(self.model.named_parameters())
            with torch.no_grad():
                for name, tensor in originals.items():
                    params[name].copy_(tensor)
            raise
        self.previous = [*self.previous, *requests]  # in the weights now: later AlphaEdit batches keep them
        if method == "alphaedit":
            for layer, gram in added.items():
                self._kept[layer] = self._kept[layer] + gram
        else:  # keys of edits made otherwise are not in the Gram matrices: compute them again when needed
            self._kept.clear()
        return applied


def measure(editor: Editor, requests, true_targets: list[str]) -> dict[str, Any]:
    from vertical.edit.metrics import fluency, greedy_fluency, score

    result = score(editor.model, editor.tokenizer, requests, true_targets)
    # text about each edited subject, up to 20: five were too few to tell a loop from noise
    prompts = [f"{subject} is" for subject in list(dict.fromkeys(r.subject for r in requests))[:20]]
    result["fluency"] = fluency(editor.model, editor.tokenizer, prompts)
    result["fluency_greedy"] = greedy_fluency(editor.model, editor.tokenizer, prompts)
    return result


def _true_targets(editor: Editor, requests) -> list[str]:
    from vertical.edit.metrics import greedy_target

    return [r.target_true or greedy_target(editor.model, editor.tokenizer, r.prompt) for r in requests]


def _write(out: Path, editor: Editor, previous: list[dict], applied: list[tuple[dict, dict]], previous_dir: Path | None,
           rolled_back: list[str] = ()) -> list[dict]:
    """Write model/, log.jsonl and deltas/ into `out` (a temporary folder the caller renames)."""
    import shutil

    from safetensors.torch import save_file

    editor.model.save_pretrained(out / "model", safe_serialization=True)
    editor.tokenizer.save_pretrained(out / "model")
    (out / "deltas").mkdir(parents=True, exist_ok=True)
    if previous_dir is not None:
        for entry in previous:
            shutil.copy2(previous_dir / entry["file"], out / entry["file"])
    entries = list(previous)
    # numbers are never reused: an id rolled back earlier names a different edit in metrics.json
    issued = [int(i.split("-")[-1]) for i in [e["id"] for e in entries] + list(rolled_back) if i.split("-")[-1].isdigit()]
    number = max(issued, default=0)
    for entry, tensors in applied:
        number += 1
        entry = {**entry, "id": f"edit-{number:04d}", "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        entry["file"] = f"deltas/{entry['id']}.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / entry["file"]))
        entries.append(entry)
    with open(out / LOG_FILE, "w", encoding="utf-8") as handle:
        for entry in entries:
            handle.write(json.dumps(entry, ensure_ascii=False) + "\n")
    return entries


def read_log(edit_dir: Path) -> list[dict]:
    path = Path(edit_dir) / LOG_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _run_edits(editor: Editor, requests, method: str, track=None) -> tuple[dict[str, Any], list[tuple[dict, dict]]]:
    true_targets = _true_targets(editor, requests)
    before = measure(editor, requests, true_targets)
    started = time.perf_counter()
    applied = editor.apply(requests, method, track)
    seconds = time.perf_counter() - started
    after = measure(editor, requests, true_targets)
    metrics = {"method": method, "edits": len(requests), "layers": sorted({l for e, _ in applied for l in e["layers"]}),
               "seconds_per_edit": round(seconds / max(len(requests), 1), 3), "before": before, "after": after,
               **{k: after[k] for k in ("efficacy", "generalization", "locality", "fluency")}}
    return metrics, applied


def run(ctx, out: Path) -> dict[str, Any]:
    requests = ctx.pack.edits()
    source = source_model_dir(ctx.build_dir)
    if not requests:
        log.info("pack '%s' has no knowledge edits; the edit stage copies the model unchanged", ctx.pack.name)
    settings = ctx.pack.config.stages.edit
    editor = Editor.of_pack(source, _model_name(ctx.build_dir), ctx.pack)
    if not requests:
        _write(out, editor, [], [], None)
        return {"method": settings.method, "edits": 0, "source": str(source.relative_to(ctx.build_dir))}
    metrics, applied = _run_edits(editor, requests, settings.method, ctx.reporter.track)
    _write(out, editor, [], applied, None)
    metrics["source"] = str(source.relative_to(ctx.build_dir))
    metrics["documents_changed"] = sorted({c.doc_id for r in requests for c in r.document})
    metrics["contradicting_sources"] = warn_contradictions(ctx.build_dir, requests)
    return metrics


def warn_contradictions(build_dir: Path, requests) -> list[dict[str, str]]:
    """Requests without a document change whose old value (`target_true`) the evidence retrieved for
    their prompt states while no evidence sentence states the new one: the answer with retrieval
    would then read the old value beside the edited weights. The evidence is what the answer path
    reads (`vertical.answer.retrieve`), not the whole chunks, because a chunk often names an old
    value in another context ("the former 4 g ceiling still applies to adults of 50 kg or more")
    or tells of the change a few sentences away. Each is logged as a warning naming the source;
    returns them."""
    from vertical.answer import retrieve
    from vertical.index import open_index

    found = []
    asked = [r for r in requests if not r.document and r.target_true]
    if not asked or not (Path(build_dir) / "index" / "index.json").is_file():
        return found
    index, embedder = open_index(build_dir)
    for request in asked:
        sources, _ = retrieve(index, embedder.encode_query, request.prompt)
        if any(states(source.text, request.target_new) for source in sources):
            continue
        stale = next((source for source in sources if states(source.text, request.target_true)), None)
        if stale is not None:
            found.append({"prompt": request.prompt, "old": request.target_true, "source": stale.source,
                          "doc_id": stale.doc_id})
            log.warning("edit %r: the source %s still says %r; give the request a `document` change "
                        "(doc_id %r, old, new) so that answers with retrieval say %r too",
                        request.prompt, stale.source, request.target_true, stale.doc_id, request.target_new)
    return found


def states(text: str, value: str) -> bool:
    """Whether `text` names `value` as a whole word or number (case aside): "3.0" is not in "13.0"."""
    return re.search(rf"(?<![\w.]){re.escape(value.casefold())}(?!\w|\.\d)", text.casefold()) is not None


def documents_as_edited(pack, entries: list[dict], doc_ids: set[str]) -> list:
    """The documents `doc_ids` as the pack has them, with the document changes of the logged edits
    `entries` (the pack's own edits first, as the edit stage logs them) applied in order."""
    from vertical.index import change_documents, load_documents
    from vertical.pack.schema import EditRequest

    documents, _ = load_documents(pack.document_files(), pack.root)
    present = {d.id for d in documents}
    missing = sorted(doc_ids - present)
    if missing:
        raise VerticalError(f"document change: no document with id {missing[0]!r} in pack {pack.name} (ids are file "
                            "names without their extension, or a JSONL record's id)")
    changes = [change for entry in entries for request in entry["requests"]
               for change in EditRequest.model_validate(request).document]
    return change_documents([d for d in documents if d.id in doc_ids], [c for c in changes if c.doc_id in doc_ids])


def _model_name(build_dir: Path) -> str:
    info = Path(build_dir) / "base" / "model.json"
    return json.loads(info.read_text())["spec"] if info.is_file() else ""


def key_texts(pack, tokenizer, limit_chars: int = 400_000) -> list[str]:
    """The text the key statistics are taken from, in turn: a document of the pack, then one of its
    instruction conversations in the model's chat template with the pack's system prompt. The
    statistics then hold the keys of the model reading the documents and of it answering in the
    product's format: AlphaEdit's null space keeps both, and ROME's and MEMIT's covariance weighs
    both. With documents alone, AlphaEdit's updates land in the directions the chat answers use,
    and answers with retrieval on the edited subjects fall apart ("PIP-4.5 [1]. Answer: yes.")."""
    from vertical.index.documents import load_documents

    documents, _ = load_documents(pack.document_files(), pack.root)
    system = [{"role": "system", "content": pack.config.system_prompt}] if pack.config.system_prompt else []
    conversations = [tokenizer.apply_chat_template(system + [{"role": m.role, "content": m.content} for m in turns],
                                                   tokenize=False)
                     for turns in (pack.instructions() if tokenizer.chat_template else [])]
    texts, total = [], 0
    for pair in zip_longest([d.text for d in documents], conversations):
        texts += [text for text in pair if text is not None]
        total += sum(len(text) for text in pair if text is not None)
        if total > limit_chars:
            break
    return texts


# ---------------------------------------------------------------- commands on a built model


def edit_build(build_dir: Path, requests_file: Path, method: str | None = None) -> dict[str, Any]:
    """`vertical edit BUILD --requests FILE`: apply and measure more edits on the build's model."""
    from vertical.errors import PackInvalid
    from vertical.io import atomic_dir, atomic_write_json, exclusive_lock
    from vertical.pack import load_pack, read_jsonl
    from vertical.pack.schema import EditRequest
    from vertical.pipeline import load_manifest, record_outputs

    build_dir = Path(build_dir)
    if not requests_file.is_file():
        raise VerticalError(f"--requests {requests_file} does not exist")
    requests, problems = read_jsonl(requests_file, EditRequest.model_validate)
    if problems:
        raise PackInvalid(str(requests_file), problems)
    manifest = load_manifest(build_dir)
    pack = load_pack(manifest.get("pack_dir") or manifest["pack"])
    settings = pack.config.stages.edit
    method = method or settings.method
    edit_dir = build_dir / "edit"
    touched = {c.doc_id for r in requests for c in r.document}
    if touched and not (build_dir / "index" / "index.json").is_file():
        raise VerticalError(f"{build_dir} has no document index to change; run `vertical build {pack.name} --steps index` "
                            "first, or leave `document` out of the requests")
    if touched:  # a change that cannot apply stops here, before any weight is edited
        documents_as_edited(pack, read_log(edit_dir) + [{"requests": [r.model_dump(exclude_none=True) for r in requests]}],
                            touched)
    with exclusive_lock(build_dir / ".lock", f"build folder {build_dir}"):
        source = edit_dir / "model" if (edit_dir / "model" / "config.json").is_file() else source_model_dir(build_dir)
        previous = read_log(edit_dir) if source.parent == edit_dir else []
        editor = Editor.of_pack(source, _model_name(build_dir), pack)
        editor.previous = [EditRequest.model_validate(r) for entry in previous for r in entry["requests"]]
        metrics, applied = _run_edits(editor, requests, method)
        metrics["requests_file"] = str(requests_file)
        history = json.loads((edit_dir / "metrics.json").read_text()) if (edit_dir / "metrics.json").is_file() else {}
        with atomic_dir(edit_dir) as tmp:
            _write(tmp, editor, previous, applied, edit_dir if previous else None, history.get("rolled_back", []))
            atomic_write_json(tmp / "metrics.json", {**history, "last_command": metrics})
        record_outputs(build_dir, "edit", json.loads((edit_dir / "metrics.json").read_text()))
    if touched:  # the documents as the edited weights now know them, re-indexed (only these are embedded)
        from vertical.index import replace_documents

        replace_documents(build_dir, documents_as_edited(pack, read_log(edit_dir), touched))
    metrics["documents_changed"] = sorted(touched)
    metrics["contradicting_sources"] = warn_contradictions(build_dir, requests)
    return metrics


def rollback(build_dir: Path, edit_id: str | None = None) -> list[str]:
    """Undo the last edit, or `edit_id` and every edit after it, restoring the weights bit-for-bit."""
    import shutil

    from safetensors.torch import load_file, save_file

    from vertical.io import atomic_dir, atomic_write_json, exclusive_lock
    from vertical.pack.schema import EditRequest
    from vertical.pipeline import record_outputs

    build_dir = Path(build_dir)
    edit_dir = build_dir / "edit"
    with exclusive_lock(build_dir / ".lock", f"build folder {build_dir}"):
        entries = read_log(edit_dir)
        if not entries:
            raise VerticalError(f"{build_dir} has no applied edits to roll back")
        ids = [e["id"] for e in entries]
        if edit_id is not None and edit_id not in ids:
            raise VerticalError(f"no edit {edit_id!r} in {edit_dir / LOG_FILE}; applied edits: {', '.join(ids)}")
        cut = ids.index(edit_id) if edit_id else len(ids) - 1
        undone = entries[cut:]
        weights_files = sorted((edit_dir / "model").glob("*.safetensors"))
        with atomic_dir(edit_dir) as tmp:
            shutil.copytree(edit_dir / "model", tmp / "model")
            restored: set[str] = set()
            for weights in weights_files:
                state = load_file(str(weights))
                touched = False
                for entry in reversed(undone):
                    saved = load_file(str(edit_dir / entry["file"]))
                    for name in entry["weights"]:
                        if name in state:
                            state[name] = saved[f"before.{name}"]
                            touched = True
                            restored.add(name)
                if touched:
                    (tmp / "model" / weights.name).unlink()
                    save_file(state, str(tmp / "model" / weights.name), metadata={"format": "pt"})
            lost = sorted({name for entry in undone for name in entry["weights"]} - restored)
            if lost:  # raised inside atomic_dir: the edit folder stays as it was
                raise VerticalError(f"cannot roll back: {lost[0]} is in no weights file of {edit_dir / 'model'}; "
                                    "the edit log and the model do not belong together (build again with --force edit)")
            (tmp / "deltas").mkdir()
            for entry in entries[:cut]:
                shutil.copy2(edit_dir / entry["file"], tmp / entry["file"])
            with open(tmp / LOG_FILE, "w", encoding="utf-8") as handle:
                for entry in entries[:cut]:
                    handle.write(json.dumps(entry, ensure_ascii=False) + "\n")
            metrics = json.loads((edit_dir / "metrics.json").read_text()) if (edit_dir / "metrics.json").is_file() else {}
            metrics["rolled_back"] = metrics.get("rolled_back", []) + [e["id"] for e in undone]
            atomic_write_json(tmp / "metrics.json", metrics)
        record_outputs(build_dir, "edit", metrics)
    touched = {c.doc_id for e in undone for r in e["requests"] for c in EditRequest.model_validate(r).document}
    if touched:  # the documents go back to what the remaining edits say
        from vertical.index import replace_documents
        from vertical.pack import load_pack
        from vertical.pipeline import load_manifest

        manifest = load_manifest(build_dir)
        pack = load_pack(manifest.get("pack_dir") or manifest["pack"])
        replace_documents(build_dir, documents_as_edited(pack, entries[:cut], touched))
    return [e["id"] for e in undone]


def apply_deltas(model, entries: list[dict], edit_dir: Path) -> None:
    """Add logged deltas to another copy of the same model (same parameter names and shapes)."""
    import torch
    from safetensors.torch import load_file

    params = dict(model.named_parameters())
    with torch.no_grad():
        for entry in entries:
            saved = load_file(str(Path(edit_dir) / entry["file"]))
            for name in entry["weights"]:
                if name not in params or params[name].shape != saved[f"delta.{name}"].shape:
                    raise VerticalError(f"{entry['id']}: the model has no weight {name} of the edited shape; "
                                        "re-run the edit requests on it instead")
                params[name] += saved[f"delta.{name}"].to(params[name].dtype)


def replay_edits(build_dir: Path, pack, model_dir: Path, to_layer: Callable[[int], int], layer_count: int,
                 track=None) -> dict[str, Any] | None:
    """Run the build's logged edits again on another model of the family (the distilled student in
    `model_dir`, `layer_count` layers), at the layers `to_layer` maps the edited layers to, measure
    them and save the model (deltas cannot be copied: the shapes match
    but the student's keys and values differ). Consecutive edits of one method are replayed
    together, in the log's order (a build's ROME edits, then a later `vertical edit --method memit`)."""
    from vertical.edit.hparams import load_hparams
    from vertical.pack.schema import EditRequest

    entries = read_log(build_dir / "edit")
    if not entries:
        return None
    groups: list[tuple[str, list[dict]]] = []
    for entry in entries:
        if groups and groups[-1][0] == entry["method"]:
            groups[-1][1].append(entry)
        else:
            groups.append((entry["method"], [entry]))
    settings = pack.config.stages.edit
    model_name = _model_name(build_dir)
    overrides = settings.hparams.model_dump(exclude_unset=True)
    default_layers = load_hparams(model_name, overrides).layers
    editor = Editor.of_pack(model_dir, model_name, pack)
    everything = [EditRequest.model_validate(r) for entry in entries for r in entry["requests"]]
    true_targets = _true_targets(editor, everything) if len(groups) > 1 else None
    runs = []
    for method, group in groups:
        requests = [EditRequest.model_validate(r) for entry in group for r in entry["requests"]]
        teacher_layers = sorted({layer for entry in group for layer in entry["layers"]})
        layers = sorted({to_layer(layer) for layer in teacher_layers})
        span = len(default_layers) if isinstance(default_layers, list) else len(layers)
        if method in ("memit", "alphaedit") and len(layers) < span:  # spread over a span; keep its width in the student
            start = max(0, min(layers[0], layer_count - span))
            layers = list(range(start, start + span))
        editor.hp = load_hparams(model_name, {**overrides, "layer": layers[0], "layers": layers})
        metrics, _ = _run_edits(editor, requests, method, track)
        runs.append({**metrics, "teacher_layers": teacher_layers, "student_layers": layers})
    editor.model.save_pretrained(model_dir, safe_serialization=True)
    if len(runs) == 1:
        return runs[0]
    after = measure(editor, everything, true_targets)  # every edit, once all are in
    return {"method": "+".join(method for method, _ in groups), "edits": len(everything), "runs": runs,
            "after": after, **{k: after[k] for k in ("efficacy", "generalization", "locality", "fluency")},
            "teacher_layers": sorted({l for r in runs for l in r["teacher_layers"]}),
            "student_layers": sorted({l for r in runs for l in r["student_layers"]})}
