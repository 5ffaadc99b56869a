"""Copy PubMedQA (PQA-L, MIT) into domains/medical in the pack formats. Run once by maintainers:

    python scripts/import_pubmedqa.py ../shared/data/pubmedqa domains/medical

Documents are the abstracts' CONTEXTS only (background, methods, results), not the conclusion,
so retrieval-augmented accuracy stays comparable to PubMedQA's reasoning-required setting.
The 500 official test ids become the evaluation sets; the other 500 become instruction data.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path


def _abstract(entry: dict) -> str:
    return "\n\n".join(f"{label.title()}: {text}" for label, text in zip(entry["LABELS"], entry["CONTEXTS"]))


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(source: Path, pack: Path) -> None:
    data = json.loads((source / "ori_pqal.json").read_text(encoding="utf-8"))
    test_ids = set(json.loads((source / "test_ground_truth.json").read_text(encoding="utf-8")))
    commit = (source / "SOURCE_COMMIT").read_text().strip()

    documents, train, test_qa, test_retrieval = [], [], [], []
    for pmid, entry in sorted(data.items()):
        documents.append({
            "id": f"pubmed-{pmid}",
            "title": f"PubMed {pmid} ({entry.get('YEAR', 'n.d.')}): {', '.join(entry['MESHES'][:4])}",
            "text": _abstract(entry),
            "source": f"https://pubmed.ncbi.nlm.nih.gov/{pmid}/",
            "metadata": {"pmid": pmid, "year": entry.get("YEAR"), "mesh": entry["MESHES"]},
        })
        label = entry["final_decision"]
        if pmid in test_ids:
            test_qa.append({"id": pmid, "question": entry["QUESTION"], "choices": ["yes", "no", "maybe"],
                            "label": label, "doc_id": f"pubmed-{pmid}"})
            test_retrieval.append({"id": pmid, "question": entry["QUESTION"], "doc_id": f"pubmed-{pmid}"})
        else:
            train.append({"instruction": entry["QUESTION"], "input": "",
                          "output": f"Answer: {label}. {entry['LONG_ANSWER']}"})
    assert len(test_qa) == 500 and len(train) == 500, (len(test_qa), len(train))

    _write_jsonl(pack / "documents" / "pubmedqa" / "abstracts.jsonl", documents)
    _write_jsonl(pack / "instructions" / "pubmedqa_train.jsonl", train)
    _write_jsonl(pack / "eval" / "pubmedqa_test.jsonl", test_qa)
    _write_jsonl(pack / "eval" / "pubmedqa_retrieval.jsonl", test_retrieval)
    licenses = pack / "licenses"
    licenses.mkdir(parents=True, exist_ok=True)
    shutil.copy(source / "LICENSE", licenses / "PUBMEDQA-LICENSE")
    (licenses / "PUBMEDQA-SOURCE").write_text(
        f"PubMedQA (Jin et al., 2019), https://github.com/pubmedqa/pubmedqa, commit {commit}, MIT licence.\n",
        encoding="utf-8")
    print(f"{len(documents)} documents, {len(train)} instruction examples, {len(test_qa)} test questions")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
