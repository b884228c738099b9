"""``sorsa-kernels demo``: fine-tune a tiny Llama-architecture model with SORSA and watch the loss fall.

The model is built from a config (random weights, nothing downloaded); SORSA adapters go on
every projection; the task is next-token prediction on counting sequences
(``t, t+k, t+2k, ...`` modulo the vocabulary, ``k`` drawn per sequence), which the adapters can
learn in a few dozen steps. The training step is the reference SORSA one: clip, add the
orthonormal regularizer's gradient (:func:`sorsa_kernels.apply_ortho_grad_`), step.
"""

from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from sorsa_kernels.backends import resolve
from sorsa_kernels.nn.model import apply_ortho_grad_, apply_sorsa, sorsa_parameters

LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VOCAB = 64


def counting_batch(batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """``[batch, length]`` sequences ``t, t+k, t+2k, ...`` modulo the vocabulary."""
    start = torch.randint(VOCAB, (batch, 1), generator=generator)
    stride = torch.randint(1, 4, (batch, 1), generator=generator)
    return (start + stride * torch.arange(length)) % VOCAB


def run_demo(
    steps: int = 40,
    *,
    rank: int = 16,
    lr: float = 3e-2,
    gamma: float = 0.05,
    batch: int = 16,
    length: int = 24,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> list[float]:
    """Fine-tune a tiny Llama with SORSA for ``steps`` steps, printing the loss as it falls.

    Args:
        steps: optimizer steps.
        rank: SORSA rank on every projection.
        lr: peak learning rate (AdamW, linear decay to zero).
        gamma: the regularizer's γ; the added gradient is ``γ / lr · ∇`` (reference SORSA scaling).
        batch, length: sequences per step and their length.
        seed: seeds the model and the data.
        device: default CUDA when available, else the CPU.
        progress: show a tqdm progress bar.

    Returns:
        The loss of every step.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=length,
    )
    model = LlamaForCausalLM(config).to(device)
    apply_sorsa(model, LLAMA_PROJECTIONS, rank=rank, mode="sorsa")
    params = sorsa_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)
    generator = torch.Generator().manual_seed(seed)
    backend = resolve("sorsa_linear", "auto", device)
    print(
        f"SORSA demo: tiny Llama ({sum(p.numel() for p in model.parameters()):,} parameters, "
        f"{sum(p.numel() for p in params):,} trainable), rank {rank}, {steps} steps on {device}, "
        f"sorsa_linear backend: {backend}"
    )
    losses = []
    started = time.perf_counter()
    bar = tqdm(range(steps), desc="fine-tuning", disable=not progress, dynamic_ncols=True)
    model.train()
    for step in bar:
        tokens = counting_batch(batch, length, generator).to(device)
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        ortho = apply_ortho_grad_(model, gamma, lr)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", ortho=f"{ortho.item():.2e}")
        if step % 10 == 0 or step == steps - 1:
            bar.write(f"step {step + 1:>4}  loss {losses[-1]:.4f}")
    bar.close()
    print(
        f"loss {losses[0]:.4f} -> {losses[-1]:.4f} in {time.perf_counter() - started:.1f} s "
        f"(orthonormality regularizer {ortho.item():.3g})"
    )
    return losses
