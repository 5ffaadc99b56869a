"""Error-compensating rounding onto llama.cpp's Q8_0 grid (GPTQ: Frantar et al., ICLR 2023).

Q8_0 stores each run of 32 weights of a row as one fp16 scale d and 32 int8 values q, w ~ d * q.
Rounding every weight to its nearest grid point, as gguf's own quantiser does, moves a 135M
model's logits enough to tip the near-ties of its greedy choice. GPTQ rounds a matrix's columns
one at a time and, after each, moves the columns not yet rounded so that the layer's output on the
inputs it actually sees changes as little as possible. "The inputs it sees" is the second moment
H = X^T X of the layer's inputs over calibration prompts (the pack's own questions with their
retrieved sources, none of those the export checks against). Each block's scale is the largest
magnitude among its weights at the moment the block is reached, as gguf's quantiser takes it, so
the result is an ordinary Q8_0 tensor that llama.cpp, Ollama and transformers read unchanged.

With H the identity no column is moved, and the rounding is round-to-nearest.
"""

from __future__ import annotations

import numpy as np

BLOCK = 32  # weights per Q8_0 block (one fp16 scale each)
DAMPING = 0.01  # share of H's mean diagonal added to it, so its inverse exists and stays tame


def input_moments(model, prompts: list[list[int]]) -> dict[str, "torch.Tensor"]:  # noqa: F821
    """H = X^T X of every linear layer's input (float64, keyed by module name) over the token id
    lists `prompts`, read one prompt at a time."""
    import torch

    moments: dict[str, torch.Tensor] = {}

    def record(name: str):
        def hook(module, inputs):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
            moments[name] = moments.get(name, 0) + (x.T @ x).double()
        return hook

    handles = [module.register_forward_pre_hook(record(name)) for name, module in model.named_modules()
               if isinstance(module, torch.nn.Linear)]
    try:
        with torch.inference_mode():
            for ids in prompts:
                model(torch.tensor([ids]))
    finally:
        for handle in handles:
            handle.remove()
    return moments


def round_q8_0(weight: np.ndarray, moment=None) -> tuple[np.ndarray, np.ndarray]:
    """(scales float16 [rows, blocks], values int8 [rows, columns]) of the 2-D `weight`, rounded
    column by column with the error on the output compensated under `moment` (H of the layer's
    input, [columns, columns]); None rounds to nearest."""
    import torch

    w = torch.from_numpy(np.asarray(weight, dtype=np.float64)).clone()
    rows, columns = w.shape
    if columns % BLOCK:
        raise ValueError(f"a Q8_0 row holds whole blocks of {BLOCK}; this one has {columns} columns")
    if moment is None:
        upper = torch.eye(columns, dtype=torch.float64)
    else:
        h = moment.double().clone()
        dead = torch.diag(h) == 0  # an input that is always zero: its weights cannot matter
        h[dead, dead] = 1.0
        w[:, dead] = 0.0
        h += DAMPING * torch.mean(torch.diag(h)) * torch.eye(columns, dtype=torch.float64)
        # The upper Cholesky factor of H^-1 holds, row by row, how the remaining columns absorb
        # one column's rounding error (GPTQ's reformulation of the Optimal Brain Surgeon update).
        upper = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    scales = np.zeros((rows, columns // BLOCK), dtype=np.float16)
    values = torch.zeros((rows, columns), dtype=torch.int8)
    for start in range(0, columns, BLOCK):
        end = start + BLOCK
        block, inverse = w[:, start:end].clone(), upper[start:end, start:end]
        scale16 = (block.abs().amax(dim=1) / 127).numpy().astype(np.float16)
        scales[:, start // BLOCK] = scale16
        scale = torch.from_numpy(scale16.astype(np.float64))
        divisor = torch.where(scale == 0, torch.ones_like(scale), scale)
        errors = torch.zeros_like(block)
        for j in range(BLOCK):
            q = torch.clamp(torch.round(block[:, j] / divisor), -127, 127)
            values[:, start + j] = q.to(torch.int8)
            error = (block[:, j] - q * scale) / inverse[j, j]
            block[:, j:] -= error[:, None] * inverse[j, j:][None, :]
            errors[:, j] = error
        w[:, end:] -= errors @ upper[start:end, end:]
    return scales, values.numpy()


def q8_0_bytes(scales: np.ndarray, values: np.ndarray) -> np.ndarray:
    """The Q8_0 tensor data as gguf lays it out: per block the fp16 scale, then its 32 int8
    values; uint8 [rows, blocks * 34]."""
    rows, blocks = scales.shape
    packed = np.concatenate([scales.astype("<f2").view(np.uint8).reshape(rows, blocks, 2),
                             values.astype(np.int8).view(np.uint8).reshape(rows, blocks, BLOCK)], axis=-1)
    return packed.reshape(rows, blocks * (2 + BLOCK))
