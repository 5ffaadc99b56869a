"""llama.cpp's side of benchmarks/peers.py, run by the peer environment's Python (benchmarks/.venv-peers,
made by benchmarks/peers_setup.sh): loads a GGUF file and answers one JSON request per stdin line.

    {"generate": [ids], "tokens": N}   -> one line per greedy token ("<id>"), then "end"
    {"tokenize": "text"}               -> one line: the JSON list of ids (no BOS added)
"""

from __future__ import annotations

import json
import sys

from llama_cpp import Llama


def main() -> None:
    path, threads = sys.argv[1], int(sys.argv[2])
    model = Llama(model_path=path, n_ctx=4096, n_batch=512, n_threads=threads, n_threads_batch=threads, verbose=False)
    print("ready", flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        if "tokenize" in request:
            ids = model.tokenize(request["tokenize"].encode("utf-8"), add_bos=False, special=True)
            print(json.dumps(ids), flush=True)
            continue
        model.reset()  # no prompt prefix is reused from the previous request: every prefill is timed whole
        count = 0
        for token in model.generate(request["generate"], top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
            print(token, flush=True)
            count += 1
            if count >= request["tokens"]:
                break
        print("end", flush=True)


if __name__ == "__main__":
    main()
