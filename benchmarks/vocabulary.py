"""What cutting the vocabulary to the pack's tokens alone gives: size, decode speed, QA retention.

    python benchmarks/vocabulary.py builds/medical [--rounds 3]

Takes the model a build ships (the one its export stage read: `export/manifest.json`'s source, else
the best model of the build), cuts it to the pack's tokens exactly as the export stage does
(`vocabulary: pack`, vertical.models.vocabulary), and exports both to ONNX int8 with the export
stage's converter. Then, in this one run:

1. the size of each ONNX model folder;
2. decode tokens/s and time to first token, the two models taking turns on the same prompts
   (every model once per round; each model's best round counts, since noise only slows a run);
3. the eval stage's QA sample (its 40 items, retrieval from the build's index) answered by each,
   and the trimmed model's accuracy as a share of the whole vocabulary's (retention), with the
   number of items whose answer changed.

Results go to benchmarks/results/vocabulary-<pack>.txt and .json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

HERE = Path(__file__).resolve().parent
PROMPTS = [
    "Summarise the main points of the guideline in detail.",
    "What should be checked before the procedure starts?",
    "Explain the steps of the process and who is responsible for each.",
    "List the most important limits and what happens when one is exceeded.",
]


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("build", type=Path)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=96, help="decoded tokens per prompt and round")
    args = parser.parse_args()

    from vertical.answer import retrieve
    from vertical.export import agreement_prompts, pack_texts
    from vertical.export.convert import export_language_model
    from vertical.export.runtime import OnnxChatModel
    from vertical.generation import median_speeds
    from vertical.index import open_index
    from vertical.models.vocabulary import trim_vocabulary
    from vertical.pack import load_pack
    from vertical.paths import best_model_dir
    from vertical.pipeline import load_manifest
    from vertical.scoring import OnnxLM, eval_sample, score_qa

    build = args.build
    manifest = load_manifest(build)
    pack = load_pack(manifest.get("pack_dir") or manifest["pack"])
    bundle_manifest = build / "export" / "manifest.json"
    source = json.loads(bundle_manifest.read_text())["model"]["source"] if bundle_manifest.is_file() else None
    model_dir = build / source if source else best_model_dir(build)
    if (model_dir / "vocabulary.json").is_file():
        raise SystemExit(f"{model_dir} is already cut to a vocabulary: give a build whose model has the whole one")
    index, embedder = open_index(build)
    scratch = Path(tempfile.mkdtemp(prefix="vocabulary-"))
    started = time.perf_counter()
    prompts = agreement_prompts(pack, index, embedder, pack.config.stages.export.agreement_prompts)
    trimmed = trim_vocabulary(model_dir, pack_texts(pack, build, index, prompts), scratch / "trimmed")
    trim_seconds = time.perf_counter() - started
    folders = {"whole": export_language_model(model_dir, scratch / "onnx-whole", "int8", scratch),
               "pack": export_language_model(scratch / "trimmed", scratch / "onnx-pack", "int8", scratch)}
    models = {name: OnnxChatModel(folder) for name, folder in folders.items()}
    sizes = {name: folder_bytes(folder) for name, folder in folders.items()}

    # each model reads the prompt in its own token ids, so each decoder takes its own from the dict
    def ids_of(question: str) -> dict[str, list[int]]:
        messages = [{"role": "system", "content": pack.config.system_prompt}, {"role": "user", "content": question}]
        return {name: model.prompt_ids(messages) for name, model in models.items()}

    measured = median_speeds({name: (lambda ids, name=name, m=model: m.stream_ids(ids[name], args.tokens))
                              for name, model in models.items()}, PROMPTS, ids_of, args.rounds)
    speed = {name: tokens_per_s for name, (tokens_per_s, _) in measured.items()}
    first = {name: first_ms for name, (_, first_ms) in measured.items()}

    # QA on the eval stage's sample, with retrieval from the build's index
    items = eval_sample(pack, build)
    k = pack.config.stages.tune.rag_sources
    retriever = lambda question: retrieve(index, embedder.encode, question, k)[0]  # noqa: E731
    scored = {name: score_qa(OnnxLM(model), items, pack.config.system_prompt, retriever,
                             max_new_tokens=pack.config.stages.eval.answer_tokens)
              for name, model in models.items()}
    accuracy = {name: result["accuracy"] for name, result in scored.items()}
    changed = sum(a["prediction"] != b["prediction"] for a, b in zip(scored["whole"]["items"], scored["pack"]["items"]))

    result = {
        "build": str(build), "model": str(model_dir.relative_to(build)), "quant": "int8",
        "vocabulary": {"whole": trimmed.full_size, "pack": trimmed.size}, "trim_seconds": round(trim_seconds, 1),
        "onnx_mb": {name: round(size / 1e6, 1) for name, size in sizes.items()},
        "decode_tokens_per_s": {name: round(v, 1) for name, v in speed.items()},
        "first_token_ms": {name: round(v, 1) for name, v in first.items()},
        "speedup": round(speed["pack"] / speed["whole"], 3),
        "qa_items": len(items), "accuracy": accuracy, "answers_changed": changed,
        "retention": round(accuracy["pack"] / accuracy["whole"], 3) if accuracy["whole"] else None,
        "rounds": args.rounds, "tokens": args.tokens,
    }
    rows = [f"python benchmarks/vocabulary.py {build}", "",
            "| model | vocabulary | ONNX int8 MB | decode tok/s | first token ms | QA accuracy |",
            "| --- | --- | --- | --- | --- | --- |"]
    for name in ("whole", "pack"):
        rows.append(f"| {name} | {result['vocabulary'][name]} | {result['onnx_mb'][name]} | "
                    f"{result['decode_tokens_per_s'][name]} | {result['first_token_ms'][name]} | {accuracy[name]:.3f} |")
    rows += ["", f"pack / whole: size {sizes['pack'] / sizes['whole']:.3f}, decode {result['speedup']:.3f}x, "
                 f"QA retention {result['retention']}, answers changed {changed} of {len(items)}; "
                 f"cutting took {result['trim_seconds']} s"]
    text = "\n".join(rows) + "\n"
    print(text)
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / f"vocabulary-{pack.name}.txt").write_text(text, encoding="utf-8")
    (HERE / "results" / f"vocabulary-{pack.name}.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
