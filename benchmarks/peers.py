"""Peer benchmark: the bundle's runtime (onnxruntime-genai, its int8 model) beside llama.cpp
(llama-cpp-python, a GGUF of the same weights from `vertical export --format gguf --quant QUANT`), on the
same prompt token ids, in one run, taking turns.

    bash benchmarks/peers_setup.sh          # once: llama-cpp-python in benchmarks/.venv-peers (~5-10 min)
    python benchmarks/peers.py [--build builds/medical] [--quant q8_0|f16] [--tokens 64] [--rounds 3] [--threads 2]

llama.cpp runs in its own process and environment (it is not a project dependency) and streams
each token id back over a pipe the moment it has it; the bundle's model runs in this process. Each
prompt is decoded by both in turns, every round, and each side's best round counts
(vertical.generation.decode_speeds). Prompts: the pack's example questions with their retrieved
sources, as the server asks them, plus one long-answer prompt; both engines get the same ids.

It also checks that llama.cpp reads the exported file as the model: its tokenisation of 20 pack
prompts and its greedy answers (cut as the server cuts them) against the source PyTorch model's.
Target (issue 37): bundle decode >= 1.2x llama.cpp Q8_0 on this machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
PEER_PYTHON = ROOT / ".venv-peers" / "bin" / "python"


class LlamaCpp:
    """The llama.cpp worker process (benchmarks/peers_worker.py)."""

    def __init__(self, gguf: Path, threads: int):
        if not PEER_PYTHON.is_file():
            sys.exit(f"{PEER_PYTHON} is missing: run `bash benchmarks/peers_setup.sh` first")
        self.process = subprocess.Popen([str(PEER_PYTHON), str(ROOT / "peers_worker.py"), str(gguf), str(threads)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        if self.process.stdout.readline().strip() != "ready":
            sys.exit("the llama.cpp worker did not start; run it by hand to see why")

    def _send(self, request: dict) -> None:
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()

    def generate(self, ids: list[int], tokens: int):
        self._send({"generate": ids, "tokens": tokens})
        while (line := self.process.stdout.readline().strip()) != "end":
            yield int(line)

    def tokenize(self, text: str) -> list[int]:
        self._send({"tokenize": text})
        return json.loads(self.process.stdout.readline())

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=30)


def main() -> None:
    from vertical.answer import open_bundle
    from vertical.export import pack_questions
    from vertical.export.formats import GGUF_FILE, export_format, served_answer
    from vertical.generation import SPEED_PROMPT, decode_speeds, greedy_ids
    from vertical.models import load_causal_lm, load_tokenizer
    from vertical.pack import load_pack
    from vertical.pipeline import load_manifest

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--build", type=Path, default=Path("builds/medical"))
    parser.add_argument("--tokens", type=int, default=64, help="tokens decoded per prompt and engine")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp threads (the bundle uses every usable CPU)")
    parser.add_argument("--prompts", type=int, default=4, help="pack questions timed, besides the long-answer prompt")
    parser.add_argument("--check-prompts", type=int, default=20, help="pack questions whose answers are compared")
    parser.add_argument("--quant", choices=("q8_0", "f16"), default="q8_0", help="the GGUF llama.cpp runs (written to "
                        "BUILD/export-gguf-QUANT unless it is there)")
    args = parser.parse_args()

    build = args.build.resolve()
    gguf_dir = build / f"export-gguf-{args.quant}"
    if not (gguf_dir / GGUF_FILE).is_file():
        print(f"writing {gguf_dir} (vertical export {args.build} --format gguf --quant {args.quant})")
        export_format(build, "gguf", gguf_dir, quant=args.quant)
    export_metrics = json.loads((gguf_dir / "metrics.json").read_text())
    assistant = open_bundle(build / "export")
    bundle_manifest = json.loads((build / "export" / "manifest.json").read_text())
    if bundle_manifest["model"]["source"] != export_metrics["source"]:
        sys.exit(f"the bundle holds {bundle_manifest['model']['source']} but the GGUF {export_metrics['source']}: "
                 "export both from the same build")
    pack = load_pack(load_manifest(build).get("pack_dir") or load_manifest(build)["pack"])
    asked = [assistant.prepare(q)[1] for q in pack_questions(pack)]
    asked = [m for m in asked if m is not None]
    prompts = asked[:args.prompts] + [SPEED_PROMPT]  # timed
    ids_list = [[int(t) for t in assistant.model.prompt_ids(m)] for m in prompts]
    checked = asked[:args.check_prompts]  # llama.cpp's answers against PyTorch's

    llama = LlamaCpp(gguf_dir / GGUF_FILE, args.threads)
    try:
        # llama.cpp reads the file as the model: tokens and greedy answers against the source in PyTorch
        source_dir = build / export_metrics["source"]
        source, tokenizer = load_causal_lm(source_dir), load_tokenizer(source_dir)
        same_ids = same_answers = 0
        for messages in checked:
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            same_ids += llama.tokenize(text) == ids
            same_answers += (served_answer(tokenizer, list(llama.generate(ids, 48)))
                             == served_answer(tokenizer, list(greedy_ids(source, ids, 48))))
        del source

        per_prompt = []
        for ids in ids_list:
            per_prompt.append(decode_speeds({"bundle": lambda ids=ids: assistant.model.stream_ids(ids, args.tokens),
                                             "llama.cpp": lambda ids=ids: llama.generate(ids, args.tokens)},
                                            runs=args.rounds))
    finally:
        llama.close()

    def median(name: str, field: str) -> float:
        return statistics.median(getattr(p[name], field) for p in per_prompt)
    result = {
        "build": str(args.build), "model": export_metrics["source"], "bundle_quant": bundle_manifest["model"]["quant"],
        "gguf_quant": export_metrics.get("gguf_quant"), "threads": args.threads, "tokens": args.tokens,
        "rounds": args.rounds, "prompts": len(ids_list), "prompt_tokens": [len(i) for i in ids_list],
        "bundle_tokens_per_s": round(median("bundle", "tokens_per_s"), 1),
        "llama_cpp_tokens_per_s": round(median("llama.cpp", "tokens_per_s"), 1),
        "bundle_first_token_ms": round(median("bundle", "first_token_ms"), 1),
        "llama_cpp_first_token_ms": round(median("llama.cpp", "first_token_ms"), 1),
        "checked_prompts": len(checked), "llama_cpp_tokenizer_agreement": round(same_ids / len(checked), 3),
        "llama_cpp_answer_agreement_with_source": round(same_answers / len(checked), 3),
        "measured": time.strftime("%Y-%m-%d %H:%M"),
    }
    result["decode_ratio"] = round(result["bundle_tokens_per_s"] / result["llama_cpp_tokens_per_s"], 2)
    result["first_token_ratio"] = round(result["llama_cpp_first_token_ms"] / result["bundle_first_token_ms"], 2)
    lines = [f"peers on {args.build} ({result['model']}), {len(ids_list)} prompts of {min(result['prompt_tokens'])}-"
             f"{max(result['prompt_tokens'])} tokens, {args.tokens} tokens each, best of {args.rounds} rounds, taking turns",
             f"{'engine':<28}{'decode tok/s':>14}{'first token ms':>16}",
             f"{'bundle (onnxruntime-genai ' + result['bundle_quant'] + ')':<28}{result['bundle_tokens_per_s']:>14}"
             f"{result['bundle_first_token_ms']:>16}",
             f"{'llama.cpp (' + str(result['gguf_quant']) + ', ' + str(args.threads) + ' threads)':<28}"
             f"{result['llama_cpp_tokens_per_s']:>14}{result['llama_cpp_first_token_ms']:>16}",
             f"bundle / llama.cpp decode: {result['decode_ratio']}x (target >= 1.2x); "
             f"time to first token: llama.cpp takes {result['first_token_ratio']}x the bundle's",
             f"llama.cpp reads the GGUF as the model, on {len(checked)} pack prompts: tokenisation the same on "
             f"{result['llama_cpp_tokenizer_agreement']:.0%}, greedy answers (cut as the server cuts them) the same as "
             f"PyTorch's on {result['llama_cpp_answer_agreement_with_source']:.0%} (target >= 90%)"]
    print("\n".join(lines))
    out = ROOT / "results" / f"peers-{pack.config.name}{'' if args.quant == 'q8_0' else '-' + args.quant}"
    out.with_suffix(".txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
