"""Which tensors' Q8_0 rounding changes the GGUF export's greedy answers?

    python benchmarks/gguf_quant.py builds/medical [--prompts 20] [--skip 0]

`vertical export --format gguf` checks its Q8_0 file against the build's model on the pack's prompts
(greedy answers as the server cuts them, export/formats.py). This benchmark asks where the
disagreements come from. It rounds chosen groups of the model's matrices through gguf's own Q8_0
quantiser and back (what transformers' GGUF loader reads from the file), leaves the rest as they
are, and compares greedy answers with the unrounded model on the same prompts, for:

    all                 every matrix rounded (what the export writes)
    all-but-embedding   the (tied) embedding and head left unrounded, as an F16 embedding would be
    attention-only      only the attention matrices rounded
    mlp-only            only the MLP matrices rounded

`--skip N` starts at the pack's N-th prompt, so the export's own check prompts (the first 20) can
be left out. Results go to benchmarks/results/gguf-quant-<pack>.txt and .json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

HERE = Path(__file__).resolve().parent
GROUPS = {
    "all": lambda name: True,
    "all-but-embedding": lambda name: "embed_tokens" not in name and "lm_head" not in name,
    "attention-only": lambda name: "self_attn" in name,
    "mlp-only": lambda name: ".mlp." in name,
}


def rounded(tensor):
    """`tensor` through gguf's Q8_0 blocks and back."""
    import gguf
    import torch

    kind = gguf.GGMLQuantizationType.Q8_0
    array = tensor.float().numpy()
    return torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(array, kind), kind).reshape(array.shape))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("build", type=Path)
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--skip", type=int, default=0, help="start at the pack's N-th prompt")
    args = parser.parse_args()

    import torch

    from vertical.export.formats import AGREEMENT_TOKENS, _Context, served_answer
    from vertical.generation import greedy_ids
    from vertical.models import load_causal_lm, load_tokenizer

    torch.set_num_threads(2)
    context = _Context(args.build)
    config = context.pack.config
    tokenizer = load_tokenizer(context.model_dir)
    ids = [tokenizer(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
                     add_special_tokens=False)["input_ids"] for messages in context.prompts(args.skip, args.prompts)]
    model = load_causal_lm(context.model_dir).eval()
    original = {name: value.clone() for name, value in model.state_dict().items()}
    reference = [list(greedy_ids(model, prompt, AGREEMENT_TOKENS)) for prompt in ids]
    answers = [served_answer(tokenizer, tokens) for tokens in reference]

    rows = []
    for group, chosen in GROUPS.items():
        state = {name: rounded(value) if value.ndim == 2 and chosen(name) else value for name, value in original.items()}
        model.load_state_dict(state)
        started = time.perf_counter()
        got = [list(greedy_ids(model, prompt, AGREEMENT_TOKENS)) for prompt in ids]
        rows.append({"rounded": group, "prompts": len(ids),
                     "same_answers": sum(served_answer(tokenizer, g) == a for g, a in zip(got, answers)),
                     f"same_{AGREEMENT_TOKENS}_tokens": sum(g == r for g, r in zip(got, reference)),
                     "seconds": round(time.perf_counter() - started, 1)})
        print(rows[-1], flush=True)

    lines = [f"# GGUF Q8_0: greedy answers the same as the unrounded model ({config.name}, {context.role}, "
             f"pack prompts {args.skip}-{args.skip + len(ids) - 1})", "",
             f"| matrices rounded to Q8_0 | same answers | same first {AGREEMENT_TOKENS} tokens |", "|---|---|---|"]
    lines += [f"| {r['rounded']} | {r['same_answers']} of {r['prompts']} | {r[f'same_{AGREEMENT_TOKENS}_tokens']} "
              f"of {r['prompts']} |" for r in rows]
    out = HERE / "results" / f"gguf-quant-{config.name}"
    out.with_suffix(".txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    out.with_suffix(".json").write_text(json.dumps({"build": str(args.build), "skip": args.skip, "rows": rows},
                                                   indent=2) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
