"""LoRA on the top layers only: training tokens/s of the tune stage's Trainer with adapters on every
layer and on the top share of the layers (`stages.tune.lora_layers`), same model, batches and
steps, one after the other in this one process.

    python benchmarks/lora_layers.py [--model PATH] [--shares 1.0,0.67] [--steps 4] [--batch 4]
                                     [--seq 512] [--answer-share 0.2]

--model defaults to the converted default base model (run `vertical models pull smollm2-135m-instruct`
first). Every batch is --batch x --seq tokens of random ids, the last --answer-share of each row
labelled, as in the pack's examples where the prompt with its retrieved sources is most of the
tokens. Below the lowest adapted layer nothing is back-propagated, so a smaller share saves the
backward pass through the layers it leaves out. Speed only: what the adapters learn is measured by
the tune stage itself (held-out loss and QA in tune/metrics.json).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    from peft import get_peft_model

    from benchmarks.tune import random_features, stage_trainer_seconds

    from vertical.models import ensure_local, load_causal_lm, load_tokenizer, resolve_base_model
    from vertical.models.registry import bf16_supported
    from vertical.pack.schema import TuneSettings
    from vertical.tune import hyperparameters, lora_config

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--shares", default="1.0,0.67", help="comma-separated lora_layers values")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--answer-share", type=float, default=0.2)
    args = parser.parse_args()
    model_dir = Path(args.model) if args.model else ensure_local(resolve_base_model("smollm2-135m-instruct"))
    tokenizer = load_tokenizer(model_dir)

    n = args.steps * args.batch
    prompt = args.seq - max(1, round(args.answer_share * args.seq))
    features = random_features(tokenizer, n, args.seq, args.answer_share)
    results = {}
    for share in [float(s) for s in args.shares.split(",")]:
        settings = TuneSettings(batch_size=args.batch, gradient_accumulation=1, epochs=1, lora_layers=share)
        base = load_causal_lm(model_dir).train()
        hp = hyperparameters(settings, sum(p.numel() for p in base.parameters()))
        model = get_peft_model(base, lora_config(base, settings, hp))
        results[share] = n * args.seq / stage_trainer_seconds(model, tokenizer, features, settings, hp)
        adapted = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"lora_layers {share:4.2f}: {results[share]:8.1f} tokens/s, {adapted / 1e6:.2f}M adapter parameters",
              flush=True)
    reference = results.get(1.0, next(iter(results.values())))
    print(f"model {model_dir.name}, {args.steps} steps of {args.batch}x{args.seq} tokens, "
          f"{'bf16 autocast' if bf16_supported() else 'fp32'}, labels on the last {args.seq - prompt} of each row")
    for share, speed in results.items():
        print(f"speed ratio {share:4.2f} / all layers: {speed / reference:.2f}")


if __name__ == "__main__":
    main()
