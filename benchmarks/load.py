"""Load and abuse test of a served bundle: `vertical serve` in its own process, on loopback only,
for a fixed number of rounds. Each round runs, at the same time:

- `clients` well-behaved clients, each sending `requests` chat requests (streaming and not);
- slow clients that trickle their request body a few bytes at a time and read the answer slowly;
- clients that disconnect: mid-stream after the first token, or before their body is complete.

It reports errors among the valid requests (any non-200 or a broken answer), latency p50/p99 of
the valid requests, and the server's resident memory after each round (flat memory: the last
round's RSS against the first's).

    python benchmarks/load.py BUNDLE [--rounds 5 --clients 8 --requests 4 --answer-tokens 32]

The test suite runs it on a tiny bundle with small counts (tests/test_reliability.py).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

QUESTIONS = [
    "What colour is the Zorblat fruit?",
    "Summarise the main points of the guideline.",
    "What should be checked before giving a blood transfusion?",
    "Explain what the documents say about the river.",
]


DRAIN_SECONDS = 10.0  # how long the server may take to finish what disconnected clients left


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(bundle: Path, port: int, concurrency: int, log_path: Path, env: dict | None = None) -> subprocess.Popen:
    """`vertical serve BUNDLE` as its own process; returns once /health answers."""
    import httpx

    log_file = open(log_path, "w")  # noqa: SIM115 - closed with the process by the caller
    proc = subprocess.Popen([sys.executable, "-m", "vertical", "serve", str(bundle), "--port", str(port),
                             "--concurrency", str(concurrency)], stdout=log_file, stderr=subprocess.STDOUT,
                            env={**os.environ, **(env or {})})
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {log_path.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not answer /health within 180 s")


def _body(i: int, answer_tokens: int, stream: bool) -> dict:
    return {"max_tokens": answer_tokens, "stream": stream,
            "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]}


def _valid_client(url: str, first: int, count: int, answer_tokens: int, latencies: list, errors: list) -> None:
    import httpx

    with httpx.Client(timeout=300) as http:
        for i in range(first, first + count):
            stream = i % 2 == 1
            started = time.perf_counter()
            try:
                if stream:
                    text, done = "", False
                    with http.stream("POST", f"{url}/v1/chat/completions", json=_body(i, answer_tokens, True)) as r:
                        if r.status_code != 200:
                            errors.append(f"stream status {r.status_code}")
                            continue
                        for line in r.iter_lines():
                            if line == "data: [DONE]":
                                done = True
                            elif line.startswith("data: "):
                                event = json.loads(line[6:])
                                if "error" in event:
                                    errors.append(f"stream error {event['error']}")
                                else:
                                    text += event["choices"][0]["delta"].get("content", "")
                    if not done:
                        errors.append("stream ended without [DONE]")
                else:
                    r = http.post(f"{url}/v1/chat/completions", json=_body(i, answer_tokens, False))
                    if r.status_code != 200 or r.json()["choices"][0]["message"]["role"] != "assistant":
                        errors.append(f"status {r.status_code}: {r.text[:200]}")
                latencies.append(time.perf_counter() - started)
            except httpx.HTTPError as exc:
                errors.append(f"{type(exc).__name__}: {exc}")


def _slow_client(port: int, answer_tokens: int, outcomes: list) -> None:
    """Trickles its body 16 bytes at a time, then reads the answer 64 bytes at a time, slowly."""
    body = json.dumps(_body(0, answer_tokens, False)).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", port), timeout=300) as s:
        s.sendall(head)
        for start in range(0, len(body), 16):
            s.sendall(body[start:start + 16])
            time.sleep(0.02)
        reply = b""
        while chunk := s.recv(64):
            reply += chunk
            time.sleep(0.005)
    outcomes.append(reply.split(b"\r\n", 1)[0].decode(errors="replace"))


def _disconnecting_client(url: str, port: int, answer_tokens: int) -> None:
    import httpx

    with httpx.Client(timeout=300) as http:  # leaves after the first token of a long answer
        with http.stream("POST", f"{url}/v1/chat/completions", json=_body(1, answer_tokens * 4, True)) as r:
            for line in r.iter_lines():
                if '"content"' in line:
                    break
    body = json.dumps(_body(2, answer_tokens, False)).encode()  # leaves before its body is complete
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n\r\n"
                  .encode() + body[: len(body) // 2])


def rss_mb(pid: int) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / 2**20


def run_load(bundle: Path, rounds: int = 5, clients: int = 8, requests: int = 4, slow: int = 2, disconnects: int = 2,
             answer_tokens: int = 32, concurrency: int = 4, log_path: Path | None = None) -> dict:
    """Start a server on `bundle`, hold the load for `rounds` rounds, stop it; return the measurements."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = log_path or Path(f"/tmp/vertical-load-{port}.log")
    proc = start_server(bundle, port, concurrency, log_path)
    latencies: list[float] = []
    errors: list[str] = []
    slow_outcomes: list[str] = []
    memory: list[float] = []
    started = time.perf_counter()
    try:
        for round_no in range(rounds):
            threads = [threading.Thread(target=_valid_client,
                                        args=(url, (round_no * clients + c) * requests, requests, answer_tokens,
                                              latencies, errors)) for c in range(clients)]
            threads += [threading.Thread(target=_slow_client, args=(port, answer_tokens, slow_outcomes))
                        for _ in range(slow)]
            threads += [threading.Thread(target=_disconnecting_client, args=(url, port, answer_tokens))
                        for _ in range(disconnects)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            memory.append(round(rss_mb(proc.pid), 1))
        seconds = time.perf_counter() - started
        # A disconnected client's request ends when the server next writes to it, so the server may
        # still hold one just after the clients are done: wait for it to drain, and say how long
        # that took. A request that never ends leaves `running` above zero after DRAIN_SECONDS.
        drained = time.perf_counter()
        health = json_get(f"{url}/health")
        while (health.get("running") or health.get("waiting")) and time.perf_counter() - drained < DRAIN_SECONDS:
            time.sleep(0.2)
            health = json_get(f"{url}/health")
        drain_seconds = time.perf_counter() - drained
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    latencies.sort()
    valid = rounds * clients * requests
    return {
        "valid_requests": valid, "errors": len(errors), "error_samples": errors[:5],
        "slow_clients": len(slow_outcomes), "slow_ok": sum(o.endswith("200 OK") for o in slow_outcomes),
        "disconnecting_clients": rounds * disconnects, "seconds": round(seconds, 1),
        "requests_per_s": round(valid / seconds, 2),
        "p50_ms": round(1000 * latencies[len(latencies) // 2]) if latencies else None,
        "p99_ms": round(1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]) if latencies else None,
        "rss_mb_by_round": memory, "rss_growth_mb": round(memory[-1] - memory[0], 1) if memory else None,
        "server_after": health, "drain_seconds": round(drain_seconds, 2), "server_exit_code": proc.returncode,
    }


def json_get(url: str) -> dict:
    import httpx

    return httpx.get(url, timeout=30).json()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--clients", type=int, default=8, help="well-behaved concurrent clients per round")
    parser.add_argument("--requests", type=int, default=4, help="requests per well-behaved client per round")
    parser.add_argument("--slow", type=int, default=2, help="slow clients per round")
    parser.add_argument("--disconnects", type=int, default=2, help="disconnecting clients per round")
    parser.add_argument("--answer-tokens", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=4, help="the server's generation slots")
    args = parser.parse_args()
    result = run_load(args.bundle, args.rounds, args.clients, args.requests, args.slow, args.disconnects,
                      args.answer_tokens, args.concurrency)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
