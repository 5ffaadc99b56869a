"""Does the GGUF export's compensated Q8_0 rounding keep the model's greedy answers better than rounding to nearest?

    python benchmarks/gguf_quant.py builds/medical [--prompts 40] [--skip 52]

`vertical export --format gguf` checks its Q8_0 file against the build's model on the pack's first
20 prompts (greedy answers as the server cuts them, export/formats.py) and calibrates its rounding
on the 32 after them. This benchmark rounds every matrix of the model to Q8_0 and back (what
transformers' GGUF loader reads from the file) in two ways and compares greedy answers with the
unrounded model on other prompts of the pack:

    nearest       each weight to its nearest grid point (gguf's own quantiser)
    compensated   as the export rounds: GPTQ on the layers' inputs over the export's calibration
                  prompts (export/gptq.py), the tied embedding to nearest

and, as llama.cpp's quantiser can keep some tensors at F16 (`--token-embedding-type`), compensated
with the embedding at F16, and with the embedding and the first and last layers at F16.

`--skip` (default 52) starts past the check's and the calibration's prompts, so neither is among
those compared. Results go to benchmarks/results/gguf-quant-<pack>.txt and .json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

HERE = Path(__file__).resolve().parent


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
    parser.add_argument("--prompts", type=int, default=40)
    parser.add_argument("--skip", type=int, default=52, help="start at the pack's N-th prompt (past the export's 20 "
                        "checked and 32 calibration prompts)")
    args = parser.parse_args()

    import torch

    from vertical.export.formats import (AGREEMENT_PROMPTS, AGREEMENT_TOKENS, CALIBRATION_PROMPTS, _Context,
                                         chat_ids, served_answer)
    from vertical.export.gptq import input_moments, round_q8_0
    from vertical.generation import greedy_ids
    from vertical.models import load_causal_lm, load_tokenizer

    torch.set_num_threads(2)
    context = _Context(args.build)
    config = context.pack.config
    tokenizer = load_tokenizer(context.model_dir)

    ids = chat_ids(tokenizer, context.prompts(args.skip, args.prompts))
    model = load_causal_lm(context.model_dir).eval()
    moments = input_moments(model, chat_ids(tokenizer, context.prompts(AGREEMENT_PROMPTS, CALIBRATION_PROMPTS)))
    moments.pop("lm_head", None)  # as in the file: the tied head is the embedding, rounded to nearest

    rounded_once: dict = {}

    def compensated(name, tensor):
        if name not in rounded_once:
            scales, values = round_q8_0(tensor.float().numpy(), moments.get(name.removesuffix(".weight")))
            rounded_once[name] = torch.from_numpy(scales.astype("float32").repeat(32, axis=1) * values)
        return rounded_once[name]
    original = {name: value.clone() for name, value in model.state_dict().items()}
    reference = [list(greedy_ids(model, prompt, AGREEMENT_TOKENS)) for prompt in ids]

    def prompt_logits():  # the last 32 positions of each prompt: all of them would not fit in memory
        with torch.inference_mode():
            return [model(torch.tensor([prompt])).logits[:, -32:] for prompt in ids]
    reference_logits = prompt_logits()
    answers = [served_answer(tokenizer, tokens) for tokens in reference]

    last = f"layers.{model.config.num_hidden_layers - 1}."
    # The tied head is the embedding: the state dict holds it twice and loads lm_head last, so
    # keeping the embedding at F16 keeps the head at F16 too.
    embedding = ("embed_tokens", "lm_head") if model.config.tie_word_embeddings else ("embed_tokens",)

    def kept_f16(*parts):
        def round_matrix(name, value):
            return value.half().float() if any(part in name for part in parts) else compensated(name, value)
        return round_matrix
    rows = []
    for rounding, round_matrix in (("nearest", lambda name, value: rounded(value)), ("compensated", compensated),
                                   ("compensated, embedding F16", kept_f16(*embedding)),
                                   ("compensated, embedding and first and last layers F16",
                                    kept_f16(*embedding, "layers.0.", last))):
        state = {name: round_matrix(name, value) if value.ndim == 2 else value for name, value in original.items()}
        model.load_state_dict(state)
        started = time.perf_counter()
        got = [list(greedy_ids(model, prompt, AGREEMENT_TOKENS)) for prompt in ids]
        rows.append({"rounding": rounding, "prompts": len(ids),
                     "same_answers": sum(served_answer(tokenizer, g) == a for g, a in zip(got, answers)),
                     f"same_{AGREEMENT_TOKENS}_tokens": sum(g == r for g, r in zip(got, reference)),
                     "logit_error": round(max(float((got - expected).norm() / expected.norm())
                                              for got, expected in zip(prompt_logits(), reference_logits)), 4),
                     "seconds": round(time.perf_counter() - started, 1)})
        print(rows[-1], flush=True)

    lines = [f"# GGUF Q8_0: greedy answers the same as the unrounded model ({config.name}, {context.role}, "
             f"pack prompts {args.skip}-{args.skip + len(ids) - 1})", "",
             f"| Q8_0 rounding | same answers | same first {AGREEMENT_TOKENS} tokens | "
             "largest relative change of a prompt's last 32 logits |", "|---|---|---|---|"]
    lines += [f"| {r['rounding']} | {r['same_answers']} of {r['prompts']} | {r[f'same_{AGREEMENT_TOKENS}_tokens']} "
              f"of {r['prompts']} | {r['logit_error']} |" for r in rows]
    out = HERE / "results" / f"gguf-quant-{config.name}"
    out.with_suffix(".txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    out.with_suffix(".json").write_text(json.dumps({"build": str(args.build), "skip": args.skip, "rows": rows},
                                                   indent=2) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
