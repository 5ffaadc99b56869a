"""Editing benchmark: counterfactual edits built from ROME's known facts, on the default model.

    python benchmarks/edit.py [--rome 40] [--memit 100] [--layer L] [--skip-memit]
    python benchmarks/edit.py --sequential 200 --methods alphaedit,memit,rome [--step 20]
    python benchmarks/edit.py --throughput 1,20,200

--throughput times AlphaEdit and MEMIT writing 1, 20 and 200 edits in one call each, beside ROME's
edit-by-edit loop over the same 1 and 20 requests, all on fresh copies of the model in one run,
and prints seconds per edit and edits per minute (benchmarks/results/edit-throughput.{txt,json}).
The key statistics and context templates are one-time costs per model and are not counted.

--sequential N applies N edits in rounds of --step (MEMIT and AlphaEdit one batch per round, ROME
one edit at a time, every round on top of the previous ones) and scores all edits so far after
each round: the curve of efficacy, generalization, locality, fluency (ROME's sampled measure) and
the greedy variant (vertical.edit.metrics), and the seconds per edit,
written to benchmarks/results/edit-sequential-<method>.{txt,json}.

Requests are built CounterFact-style from benchmarks/data/known_1000.json (ROME, MIT):
  target_true  the fact's attribute;  target_new  the attribute of another fact of the same relation
  rephrase     the same subject in up to two other templates of the same relation from the file
  locality     two other subjects of the same relation with their own attributes (must not change)
Only facts the model knows (P(true) > P(new) before editing) are used, so efficacy starts at 0.
ROME runs sequentially (each edit on top of the previous ones) and is scored right after each
edit and again after the whole run; MEMIT writes one batch. Key statistics come from the generic
text shipped with vertical plus the medical pack's documents.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

FACTS = Path(__file__).with_name("data") / "known_1000.json"


def build_requests(seed: int = 0):
    from vertical.pack.schema import EditRequest

    facts = json.loads(FACTS.read_text())
    by_relation = defaultdict(list)
    for fact in facts:
        by_relation[fact["relation_id"]].append(fact)
    rng = random.Random(seed)
    requests = []
    for fact in facts:
        peers = by_relation[fact["relation_id"]]
        others = sorted({p["attribute"] for p in peers} - {fact["attribute"]})
        templates = sorted({p["template"] for p in peers} - {fact["template"]})
        neighbours = [p for p in peers if p["subject"] != fact["subject"] and p["attribute"] != fact["attribute"]]
        if not others or len(neighbours) < 2 or fact["subject"] not in fact["prompt"]:
            continue
        rephrases = [t.format(fact["subject"]) for t in rng.sample(templates, min(2, len(templates)))]
        requests.append(EditRequest(
            id=str(fact["known_id"]), prompt=fact["prompt"], subject=fact["subject"], target_new=rng.choice(others),
            target_true=fact["attribute"], rephrase=rephrases,
            locality=[{"prompt": n["prompt"], "target": n["attribute"]} for n in rng.sample(neighbours, 2)]))
    rng.shuffle(requests)
    return requests


def known(editor, requests, limit):
    """Requests whose fact the model knows, with locality prompts it also knows (so locality
    starts at 1.0 and measures only what the edit breaks)."""
    from vertical.edit.metrics import target_logprobs

    def prefers(prompt: str, good: str, bad: str) -> bool:
        p_good, p_bad = target_logprobs(editor.model, editor.tokenizer, [(prompt, good), (prompt, bad)])
        return p_good > p_bad

    chosen = []
    for request in requests:
        if not prefers(request.prompt, request.target_true, request.target_new):
            continue
        kept = [item for item in request.locality if prefers(item.prompt, item.target, request.target_new)]
        if kept:
            chosen.append(request.model_copy(update={"locality": kept}))
        if len(chosen) == limit:
            break
    return chosen


def main() -> None:
    from vertical.index.documents import load_documents
    from vertical.models import ensure_local, resolve_base_model
    from vertical.pack import load_pack

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rome", type=int, default=40, help="ROME edits (0: skip)")
    parser.add_argument("--memit", type=int, default=100)
    parser.add_argument("--layer", type=int, default=None, help="ROME layer (default: the model's hparams YAML)")
    parser.add_argument("--skip-memit", action="store_true")
    parser.add_argument("--v-steps", type=int, default=None)
    parser.add_argument("--sequential", type=int, default=0, help="edits of the sequential curve (0: skip)")
    parser.add_argument("--methods", default="alphaedit,memit,rome", help="methods of the sequential curve")
    parser.add_argument("--step", type=int, default=20, help="edits per round of the sequential curve")
    parser.add_argument("--throughput", default="", help="comma-separated edit counts to time (e.g. 1,20,200)")
    args = parser.parse_args()

    model_dir = ensure_local(resolve_base_model("smollm2-135m-instruct"))
    pack = load_pack("medical")
    documents = [d.text for d in load_documents(pack.document_files(), pack.root)[0]][:400]
    overrides = {"layer": args.layer} if args.layer is not None else {}
    if args.v_steps:
        overrides["v_steps"] = args.v_steps
    requests = build_requests()
    if args.throughput:
        run_throughput(model_dir, overrides, documents, requests, [int(n) for n in args.throughput.split(",")])
        return
    if args.sequential:
        for method in args.methods.split(","):
            run_sequential(model_dir, overrides, documents, requests, method, args.sequential, args.step)
        return

    if args.rome:
        run_rome(model_dir, overrides, documents, requests, args.rome)
    if not args.skip_memit:
        run_memit(model_dir, overrides, documents, requests, args.memit)


def run_rome(model_dir, overrides, documents, requests, count) -> None:
    from vertical.edit import Editor
    from vertical.edit.metrics import score

    editor = Editor.load(model_dir, "smollm2-135m-instruct", overrides, documents)
    rome_set = known(editor, requests, count)
    print(f"{len(requests)} counterfactual requests; {len(rome_set)} known facts used for ROME", flush=True)
    editor.templates(), editor.moments([editor.edit_layer(rome_set)])  # one-time costs, not per edit
    immediate, seconds = [], []
    for i, request in enumerate(rome_set, 1):
        started = time.perf_counter()
        editor.apply([request], "rome")
        seconds.append(time.perf_counter() - started)
        immediate.append(score(editor.model, editor.tokenizer, [request], [request.target_true]))
        if i % 10 == 0:
            print(f"  {i} edits, {sum(seconds) / len(seconds):.2f} s/edit", flush=True)
    final = score(editor.model, editor.tokenizer, rome_set, [r.target_true for r in rome_set])
    mean = lambda key: sum(m[key] for m in immediate if m[key] is not None) / len(immediate)  # noqa: E731
    print(f"ROME, {len(rome_set)} sequential edits at layer {editor.edit_layer(rome_set)}:")
    print(f"  right after each edit: efficacy {mean('efficacy'):.3f}  generalization {mean('generalization'):.3f}  "
          f"locality {mean('locality'):.3f}   (targets 0.95 / 0.80 / 0.90; ROME on GPT-2 XL: 1.00 / 0.964 / 0.754)")
    print(f"  after all {len(rome_set)} edits:   efficacy {final['efficacy']:.3f}  generalization {final['generalization']:.3f}  "
          f"locality {final['locality']:.3f}")
    print(f"  seconds per edit: {sum(seconds) / len(seconds):.2f} (target < 10)")


def run_sequential(model_dir, overrides, documents, requests, method: str, count: int, step: int) -> None:
    from vertical.edit import Editor
    from vertical.edit.metrics import fluency, greedy_fluency, score

    editor = Editor.load(model_dir, "smollm2-135m-instruct", overrides, documents)
    chosen = known(editor, requests, count)
    layers = [editor.edit_layer(chosen)] if method == "rome" else editor.memit_layers(chosen)
    editor.templates(), editor.moments(layers)  # one-time costs, not per edit
    prompts = [f"{r.subject} is" for r in chosen[:10]]
    start = score(editor.model, editor.tokenizer, chosen, [r.target_true for r in chosen])
    rows = [{"edits": 0, **{k: start[k] for k in ("efficacy", "generalization", "locality")},
             "fluency": fluency(editor.model, editor.tokenizer, prompts),
             "fluency_greedy": greedy_fluency(editor.model, editor.tokenizer, prompts), "seconds_per_edit": None}]
    lines = [f"{method}, {len(chosen)} sequential edits of known facts in rounds of {step}, layers {layers}",
             f"{'edits':>6}{'efficacy':>10}{'general.':>10}{'locality':>10}{'fluency':>9}{'greedy':>8}{'s/edit':>8}"]
    print(lines[0], flush=True)
    seconds = 0.0
    for first in range(0, len(chosen), step):
        batch = chosen[first:first + step]
        started = time.perf_counter()
        if method == "rome":
            for request in batch:
                editor.apply([request], "rome")
        else:
            editor.apply(batch, method)  # the editor keeps the edits made, which AlphaEdit preserves
        seconds += time.perf_counter() - started
        done = chosen[:first + len(batch)]
        now = score(editor.model, editor.tokenizer, done, [r.target_true for r in done])
        print(f"  {len(done)} edits: efficacy {now['efficacy']:.3f}, generalization {now['generalization']:.3f}, "
              f"locality {now['locality']:.3f}, {seconds / len(done):.2f} s/edit", flush=True)
        rows.append({"edits": len(done), **{k: now[k] for k in ("efficacy", "generalization", "locality")},
                     "fluency": fluency(editor.model, editor.tokenizer, prompts),
                     "fluency_greedy": greedy_fluency(editor.model, editor.tokenizer, prompts),
                     "seconds_per_edit": round(seconds / len(done), 2)})
    for row in rows:
        lines.append(f"{row['edits']:>6}{row['efficacy']:>10.3f}{row['generalization']:>10.3f}{row['locality']:>10.3f}"
                     f"{row['fluency']:>9.3f}{row['fluency_greedy']:>8.3f}{row['seconds_per_edit'] or 0:>8.2f}")
    print("\n".join(lines[1:]), flush=True)
    out = Path(__file__).with_name("results") / f"edit-sequential-{method}"
    out.with_suffix(".txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    out.with_suffix(".json").write_text(json.dumps({"method": method, "layers": layers, "step": step, "curve": rows},
                                                   indent=2) + "\n", encoding="utf-8")


def run_throughput(model_dir, overrides, documents, requests, counts: list[int]) -> None:
    from vertical.edit import Editor
    from vertical.edit.metrics import score

    probe = Editor.load(model_dir, "smollm2-135m-instruct", overrides, documents)
    chosen = known(probe, requests, max(counts))
    rows = []
    for method in ("rome", "alphaedit", "memit"):
        for count in counts:
            if method == "rome" and count > 20:
                continue  # one edit at a time: 200 of them say nothing that 20 do not
            editor = Editor.load(model_dir, "smollm2-135m-instruct", overrides, documents)
            batch = chosen[:count]
            layers = [editor.edit_layer(batch)] if method == "rome" else editor.memit_layers(batch)
            editor.templates(), editor.moments(layers)  # one-time costs, not per edit
            started = time.perf_counter()
            if method == "rome":
                for request in batch:
                    editor.apply([request], "rome")
            else:
                editor.apply(batch, method)
            seconds = time.perf_counter() - started
            after = score(editor.model, editor.tokenizer, batch, [r.target_true for r in batch])
            rows.append({"method": method, "edits": len(batch), "seconds": round(seconds, 1),
                         "seconds_per_edit": round(seconds / len(batch), 2),
                         "edits_per_minute": round(60 * len(batch) / seconds, 1),
                         **{k: after[k] for k in ("efficacy", "generalization", "locality")}})
            print(f"  {method} {len(batch)} edits: {seconds:.1f} s, {seconds / len(batch):.2f} s/edit", flush=True)
    rome_20 = next((r for r in rows if r["method"] == "rome" and r["edits"] == 20), None)
    lines = [f"Edit throughput on {torch_threads()} threads (key statistics and templates precomputed)",
             f"{'method':<10}{'edits':>6}{'seconds':>9}{'s/edit':>8}{'edits/min':>10}{'vs ROME':>8}"
             f"{'efficacy':>10}{'general.':>10}{'locality':>10}"]
    for row in rows:
        ratio = rome_20["seconds_per_edit"] / row["seconds_per_edit"] if rome_20 else float("nan")
        lines.append(f"{row['method']:<10}{row['edits']:>6}{row['seconds']:>9.1f}{row['seconds_per_edit']:>8.2f}"
                     f"{row['edits_per_minute']:>10.1f}{ratio:>7.2f}x{row['efficacy']:>10.3f}"
                     f"{row['generalization']:>10.3f}{row['locality']:>10.3f}")
    lines.append("vs ROME: ROME's seconds per edit over 20 sequential edits divided by the row's.")
    print("\n".join(lines), flush=True)
    out = Path(__file__).with_name("results") / "edit-throughput"
    out.with_suffix(".txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    out.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def run_memit(model_dir, overrides, documents, requests, count) -> None:
    from vertical.edit import Editor
    from vertical.edit.metrics import score

    editor = Editor.load(model_dir, "smollm2-135m-instruct", overrides, documents)
    memit_set = known(editor, requests, count)
    layers = editor.memit_layers(memit_set)
    editor.templates(), editor.moments(layers)
    before = score(editor.model, editor.tokenizer, memit_set, [r.target_true for r in memit_set])
    started = time.perf_counter()
    editor.apply(memit_set, "memit")
    elapsed = time.perf_counter() - started
    after = score(editor.model, editor.tokenizer, memit_set, [r.target_true for r in memit_set])
    print(f"MEMIT, one batch of {len(memit_set)} edits over layers {layers}:")
    print(f"  before: efficacy {before['efficacy']:.3f}  generalization {before['generalization']:.3f}  locality {before['locality']:.3f}")
    print(f"  after:  efficacy {after['efficacy']:.3f}  generalization {after['generalization']:.3f}  locality {after['locality']:.3f}")
    print(f"  {elapsed:.1f} s for the batch, {elapsed / len(memit_set):.2f} s per edit")


if __name__ == "__main__":
    main()
