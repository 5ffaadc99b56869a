"""Tune benchmark: training tokens/s of the tune stage's Trainer beside a minimal hand-written PEFT
loop on the same model, data and batch shape, and the share of this machine's matmul throughput
that training reaches. Both run in this one process, one after the other.

    python benchmarks/tune.py [--model PATH] [--steps 8] [--batch 4] [--seq 512] [--answer-share 1.0]

--model defaults to the converted default base model (run `vertical models pull smollm2-135m-instruct`
first). Every batch is exactly --batch x --seq tokens (no padding), so both sides do the same work.
--answer-share < 1 labels only the last share of each row, as in the pack's examples, where the
prompt with its retrieved sources is most of the tokens: the plain loop computes the model's own
loss over every position's logits, the stage's Trainer the logits of labelled positions only.
FLOPs per trained token are counted as 4 x parameters for LoRA (forward 2N, backward through the
frozen weights 2N; the adapters' own share is negligible), the usual 6N minus the frozen weight
gradients.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def matmul_gflops(size: int = 2048, repeats: int = 10, dtype=None) -> float:
    import torch

    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    torch.matmul(a, b)
    started = time.perf_counter()
    for _ in range(repeats):
        torch.matmul(a, b)
    return 2 * size ** 3 * repeats / (time.perf_counter() - started) / 1e9


def random_features(tokenizer, rows: int, seq: int, answer_share: float) -> list[dict]:
    """`rows` rows of `seq` random ids (seeded), the last `answer_share` of each labelled."""
    import torch

    torch.manual_seed(0)
    prompt = seq - max(1, round(answer_share * seq))
    return [{"input_ids": ids, "attention_mask": [1] * seq, "labels": [-100] * prompt + ids[prompt:]}
            for ids in torch.randint(100, tokenizer.vocab_size - 1, (rows, seq)).tolist()]


def stage_trainer_seconds(model, tokenizer, features: list[dict], settings, hp: dict) -> float:
    """Seconds the tune stage's Trainer takes for one epoch over `features`, no saving."""
    from vertical.tune import make_trainer

    with tempfile.TemporaryDirectory() as tmp:
        trainer = make_trainer(model, tokenizer, features, settings, hp, Path(tmp), save_strategy="no",
                               disable_tqdm=True, logging_steps=1000,
                               warmup_steps=0)
        started = time.perf_counter()
        trainer.train()
        return time.perf_counter() - started


def main() -> None:
    import torch
    from peft import get_peft_model

    from vertical.models import ensure_local, load_causal_lm, load_tokenizer, resolve_base_model
    from vertical.models.registry import autocast, bf16_supported
    from vertical.pack.schema import TuneSettings
    from vertical.tune import hyperparameters, lora_config

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--answer-share", type=float, default=1.0, help="labelled share at the end of each row")
    args = parser.parse_args()
    model_dir = Path(args.model) if args.model else ensure_local(resolve_base_model("smollm2-135m-instruct"))
    tokenizer = load_tokenizer(model_dir)
    n_params = sum(p.numel() for p in load_causal_lm(model_dir).parameters())

    n = args.steps * args.batch
    prompt = args.seq - max(1, round(args.answer_share * args.seq))
    features = random_features(tokenizer, n, args.seq, args.answer_share)
    settings = TuneSettings(batch_size=args.batch, gradient_accumulation=1, epochs=1)
    hp = hyperparameters(settings, n_params)
    tokens = n * args.seq

    # 1. the stage's Trainer
    base = load_causal_lm(model_dir).train()
    model = get_peft_model(base, lora_config(base, settings, hp))
    stage_seconds = stage_trainer_seconds(model, tokenizer, features, settings, hp)

    # 2. a minimal PEFT loop: same model, adapters, batches, optimizer and learning rate
    base = load_causal_lm(model_dir).train()
    model = get_peft_model(base, lora_config(base, settings, hp))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=hp["learning_rate"])
    started = time.perf_counter()
    for step in range(args.steps):
        batch = features[step * args.batch:(step + 1) * args.batch]
        ids = torch.tensor([f["input_ids"] for f in batch])
        labels = torch.tensor([f["labels"] for f in batch])
        with autocast():  # the same mixed precision the stage's Trainer uses
            loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    plain_seconds = time.perf_counter() - started

    gflops = matmul_gflops()
    stage_tps, plain_tps = tokens / stage_seconds, tokens / plain_seconds
    reached = 4 * n_params * stage_tps / 1e9
    print(f"model {model_dir.name}: {n_params / 1e6:.1f}M parameters, {args.steps} steps of {args.batch}x{args.seq} tokens, "
          f"{'bf16 autocast' if bf16_supported() else 'fp32'}, labels on the last {args.seq - prompt} tokens of each row")
    print(f"tune stage (Trainer)  {stage_tps:10.1f} tokens/s")
    print(f"plain PEFT loop       {plain_tps:10.1f} tokens/s")
    print(f"ratio stage/plain     {stage_tps / plain_tps:10.2f}   (goal: >= 0.90)")
    print(f"matmul throughput     {gflops:10.1f} GFLOP/s (fp32 2048x2048)")
    if bf16_supported():
        bf16 = matmul_gflops(dtype=torch.bfloat16)
        print(f"matmul throughput     {bf16:10.1f} GFLOP/s (bf16 2048x2048)")
        gflops = bf16
    print(f"training reaches      {reached:10.1f} GFLOP/s = {reached / gflops:.1%} of the matmul throughput of its precision")


if __name__ == "__main__":
    main()
