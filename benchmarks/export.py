"""Export benchmark: the bundle's speed beside PyTorch eager, the student beside the teacher, and the
server under 1, 4 and 16 concurrent clients. Everything runs in this one process on the same
prompts; the speed measurements take turns (every model once per round, --rounds rounds) and each
model's best round counts, because noise on a shared machine only ever slows a run down.

    python benchmarks/export.py [--build builds/medical] [--tokens 128] [--rounds 5] [--requests 16]

Needs a build taken through `export` (`vertical build medical`), and through `distill` with
`stages.distill.steps` set for the student's rows (a CPU build makes no student by default). It measures:

1. decode tokens/s (tokens after the first, per second) and time to first token of the bundle's
   model (ONNX, its quantisation; on every CPU as the runtime runs it, and on one thread as
   onnxruntime-genai would by default) and of the same model in PyTorch eager (fp32, as trained);
2. the student vs the teacher, both exported the same way (whichever of the two the bundle does
   not hold is exported here into a temporary folder with the bundle's quantisation);
3. requests/s and latency p50/p99 of the served bundle (uvicorn on loopback, in this process)
   with 1, 4 and 16 concurrent clients, each request with retrieval and up to --answer-tokens.

Targets (issue 6): bundle decode >= 5x PyTorch eager; student >= 1.8x the teacher's decode.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PROMPTS = [
    "Summarise the main points of the guideline in detail.",
    "What should be checked before giving a blood transfusion?",
    "Explain how sepsis is recognised and what the first steps are.",
    "List the warning signs of a stroke and what to do.",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_test(assistant, clients_levels: list[int], requests: int, answer_tokens: int) -> list[dict]:
    """Requests/s and latency of the served bundle at each concurrency level."""
    import httpx
    import uvicorn

    from vertical.export.server import Limits, create_app

    port = free_port()
    app = create_app(assistant, None, Limits(max_concurrent=max(clients_levels), max_waiting=4 * max(clients_levels)))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)

    async def level(clients: int) -> dict:
        latencies: list[float] = []
        errors = 0
        queue = list(range(requests))

        async def client(http: httpx.AsyncClient) -> None:
            nonlocal errors
            while queue:
                i = queue.pop()
                body = {"model": assistant.name, "max_tokens": answer_tokens,
                        "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]}
                started = time.perf_counter()
                response = await http.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body)
                latencies.append(time.perf_counter() - started)
                errors += response.status_code != 200

        async with httpx.AsyncClient(timeout=600) as http:
            started = time.perf_counter()
            await asyncio.gather(*(client(http) for _ in range(clients)))
            seconds = time.perf_counter() - started
        latencies.sort()
        return {"clients": clients, "requests": requests, "errors": errors, "requests_per_s": requests / seconds,
                "p50_ms": 1000 * latencies[len(latencies) // 2],
                "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]}

    try:
        return [asyncio.run(level(clients)) for clients in clients_levels]
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def main() -> None:
    from vertical.export.convert import export_language_model
    from vertical.answer import open_bundle
    from vertical.export.runtime import OnnxChatModel
    from vertical.generation import greedy_ids, median_speeds
    from vertical.paths import best_model_dir
    from vertical.models import load_causal_lm

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--build", type=Path, default=Path("builds/medical"))
    parser.add_argument("--tokens", type=int, default=128, help="new tokens per speed measurement")
    parser.add_argument("--rounds", type=int, default=5, help="speed measurements per model, taking turns")
    parser.add_argument("--requests", type=int, default=16, help="requests per concurrency level")
    parser.add_argument("--answer-tokens", type=int, default=48, help="max_tokens of each load-test request")
    args = parser.parse_args()

    bundle = args.build / "export"
    manifest = json.loads((bundle / "manifest.json").read_text())
    quant, role = manifest["model"]["quant"], manifest["model"]["role"]
    exported_dir = args.build / manifest["model"]["source"]
    print(f"bundle {bundle}: {role} ({exported_dir}), {quant}; "
          f"{sum(f['bytes'] for f in manifest['files'].values()) / 1e6:.1f} MB")

    teacher_dir, student_dir = best_model_dir(args.build), args.build / "distill" / "model"
    has_student = (student_dir / "config.json").is_file()
    tokens, prompts = args.tokens, PROMPTS
    bundled = OnnxChatModel(bundle / "model")
    one_thread = OnnxChatModel(bundle / "model", threads=1)
    torch_model = load_causal_lm(exported_dir)
    # a bundle cut to its pack's vocabulary numbers tokens its own way; the models exported here have the whole one
    kept_file = bundle / "model" / "vocabulary.json"
    kept = json.loads(kept_file.read_text())["kept"] if kept_file.is_file() else None
    whole = (lambda ids: [kept[i] for i in ids]) if kept else (lambda ids: ids)
    measures = {"bundle": lambda ids: bundled.stream_ids(ids, tokens),
                "bundle, 1 thread": lambda ids: one_thread.stream_ids(ids, tokens),
                "pytorch": lambda ids: greedy_ids(torch_model, whole(ids), tokens)}
    with tempfile.TemporaryDirectory() as scratch:
        if has_student:  # whichever of teacher and student the bundle does not hold, exported the same way
            other_dir = teacher_dir if role == "student" else student_dir
            other = OnnxChatModel(export_language_model(other_dir, Path(scratch) / "other", quant, Path(scratch)))
            measures["other"] = lambda ids: other.stream_ids(whole(ids), tokens)
        speed = median_speeds(measures, prompts, lambda prompt: bundled.prompt_ids([{"role": "user", "content": prompt}]),
                       args.rounds)
    (onnx_rate, onnx_first), (single_rate, single_first) = speed["bundle"], speed["bundle, 1 thread"]
    torch_rate, torch_first = speed["pytorch"]
    print(f"\n1. exported bundle vs the same model in PyTorch eager (fp32); {tokens} new tokens, "
          f"{len(prompts)} prompts, median over the prompts of the best of {args.rounds} runs taking turns")
    print(f"{'':24} {'decode tok/s':>12} {'TTFT ms':>9}")
    print(f"{'PyTorch eager':24} {torch_rate:12.1f} {torch_first:9.1f}")
    print(f"{'ONNX ' + quant + ', 1 thread':24} {single_rate:12.1f} {single_first:9.1f}")
    print(f"{'ONNX ' + quant:24} {onnx_rate:12.1f} {onnx_first:9.1f}")
    print(f"ratio (target >= 5x): {onnx_rate / torch_rate:.2f}x decode, {torch_first / onnx_first:.2f}x TTFT")

    print(f"\n2. student vs teacher ({teacher_dir.relative_to(args.build)}), both exported as ONNX {quant}, "
          "measured in the same rounds")
    if not has_student:
        print("the build has no student: run its distill stage to compare one")
    else:
        (teacher_rate, teacher_first), (student_rate, student_first) = (
            (speed["other"], speed["bundle"]) if role == "student" else (speed["bundle"], speed["other"]))
        print(f"{'':24} {'decode tok/s':>12} {'TTFT ms':>9}")
        print(f"{'teacher':24} {teacher_rate:12.1f} {teacher_first:9.1f}")
        print(f"{'student':24} {student_rate:12.1f} {student_first:9.1f}")
        distill = json.loads((args.build / "distill" / "metrics.json").read_text())
        print(f"ratio (target >= 1.8x): {student_rate / teacher_rate:.2f}x decode; QA retention "
              f"{distill.get('retention')} (student {distill.get('student_score')} / teacher "
              f"{distill.get('teacher_score')}, target >= 0.90)")
    del bundled, one_thread, torch_model

    print(f"\n3. served bundle, {args.requests} requests per level, max_tokens {args.answer_tokens}, loopback")
    assistant = open_bundle(bundle)
    print(f"{'clients':>7} {'req/s':>7} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6}")
    for row in load_test(assistant, [1, 4, 16], args.requests, args.answer_tokens):
        print(f"{row['clients']:7d} {row['requests_per_s']:7.2f} {row['p50_ms']:8.0f} {row['p99_ms']:8.0f} "
              f"{row['errors']:6d}")


if __name__ == "__main__":
    main()
