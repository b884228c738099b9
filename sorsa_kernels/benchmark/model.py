"""A whole training step of a Llama-architecture model, each way of fine-tuning it side by side.

The model has Llama-2-7B's decoder layers (hidden 4096, MLP 11008, 32 heads), a few of them,
and a small vocabulary, so that the layers rather than the output head take the time; its
bfloat16 weights come from a fixed seed (nothing is downloaded). Adapters of rank r sit on all
seven projections of every layer, in float32 (as PEFT keeps them under a 16-bit base, and as
the reference SORSA code trains them). A step is what ``Trainer(bf16=True)`` runs: the forward
with the labels under bfloat16 autocast, the backward, the gradients clipped to norm 1, the
regularizer where the method has one, AdamW's step over the adapters, and the gradients dropped.

Candidates, each its own copy of the same model:

* ``frozen``: no adapters, the input embeddings requiring grad (``enable_input_require_grads``,
  as PEFT's gradient checkpointing does): the forward and every dx, no optimizer. What a step
  cannot go below.
* ``peft_lora``: PEFT's LoRA (``get_peft_model``), its own forward.
* ``peft_lora_fused``: the same PEFT model after
  :func:`~sorsa_kernels.integrations.peft.accelerate_peft` (PEFT's layers through our fused op).
* ``sorsa``: :func:`~sorsa_kernels.apply_sorsa` (``init="rsvd"``) and, after clipping,
  :func:`~sorsa_kernels.apply_ortho_grad_` (the official regularizer).
* ``sorsa_reference``: the reference SORSA code's step on the same adapters: its layer, which
  rebuilds ``(B*S)@A`` on every call (:class:`~sorsa_kernels.benchmark.linear.ReferenceSORSALinear`),
  and its Python loop over the adapters for the regularizer
  (:func:`~sorsa_kernels.benchmark.ortho.loop_reference`).

The candidates are timed in turns (:func:`~sorsa_kernels.benchmark.common.interleaved_ms`);
a ratio is the median of the per-round ratios to ``frozen``. ``*_loss`` is each candidate's
loss on the first step, before any update: every adapter starts from the frozen model's
function (LoRA's B is zero, SORSA's residual plus adapter is the weight), so these agree up to
rounding, a check that every candidate computes the same model. ``*_peak_mb`` is the peak
memory of one step above what was allocated before it; ``*_host_ms`` the time for one step
to return, started on an idle GPU (see :func:`~sorsa_kernels.benchmark.common.idle_host_ms`: an
upper bound on the host's time).
"""

from __future__ import annotations

import importlib.util
import statistics

import torch
from torch import nn

from sorsa_kernels.benchmark.common import (
    activation_autocast,
    activation_dtype,
    format_table,
    idle_host_ms,
    interleaved_ms,
    median_ratio,
    peak_memory_mb,
    write_results,
)
from sorsa_kernels.benchmark.linear import ReferenceSORSALinear
from sorsa_kernels.benchmark.ortho import loop_reference
from sorsa_kernels.demo import LLAMA_PROJECTIONS
from sorsa_kernels.nn.model import apply_ortho_grad_, apply_sorsa, sorsa_layers

# Llama-2-7B's layer, four of them, sequences of 2048 tokens.
GPU_MODEL = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_hidden_layers=4,
                 vocab_size=8192, sequence=2048)  # fmt: skip
GPU_TOKENS = (4096, 16384)
GPU_RANKS = (16, 128)
CPU_MODEL = dict(hidden_size=64, intermediate_size=176, num_attention_heads=4, num_hidden_layers=2, vocab_size=128,
                 sequence=16)  # fmt: skip
CPU_TOKENS = (32,)
CPU_RANKS = (8,)
PEAK_LR = 1e-4
GAMMA = 4e-4  # the reference SORSA code's default γ
SEED = 0
CANDIDATES = ("frozen", "peft_lora", "peft_lora_fused", "sorsa", "sorsa_reference")


def _llama(shape: dict, device: torch.device) -> nn.Module:
    """A Llama-architecture model of ``shape`` with the same weights on every call."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=shape["hidden_size"], intermediate_size=shape["intermediate_size"],
        num_attention_heads=shape["num_attention_heads"], num_key_value_heads=shape["num_attention_heads"],
        num_hidden_layers=shape["num_hidden_layers"], vocab_size=shape["vocab_size"],
        max_position_embeddings=shape["sequence"],
    )  # fmt: skip
    torch.manual_seed(SEED)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.to(activation_dtype(device))


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _frozen(shape, rank, device):
    model = _llama(shape, device)
    model.requires_grad_(False)
    model.enable_input_require_grads()
    return model, None


def _peft_lora(shape, rank, device):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=LLAMA_PROJECTIONS, lora_dropout=0.0)
    return get_peft_model(_llama(shape, device), config), None


def _peft_lora_fused(shape, rank, device):
    from sorsa_kernels.integrations.peft import accelerate_peft

    model, _ = _peft_lora(shape, rank, device)
    return accelerate_peft(model), None


def _sorsa(shape, rank, device):
    model = apply_sorsa(_llama(shape, device), LLAMA_PROJECTIONS, rank, init="rsvd", progress=False)
    return model, lambda: apply_ortho_grad_(model, GAMMA, PEAK_LR)


def _sorsa_reference(shape, rank, device):
    model, _ = _sorsa(shape, rank, device)
    references = []
    for name, layer in list(sorsa_layers(model)):
        parent_name, _, child = name.rpartition(".")
        factors = (layer.weight.detach(), *(t.detach().clone() for t in (layer.U, layer.S, layer.Vt)))
        references.append(ReferenceSORSALinear(*factors, layer.scale))
        setattr(model.get_submodule(parent_name), child, references[-1])
    Us, Vts = [m.sorsa_B for m in references], [m.sorsa_A for m in references]
    return model, lambda: loop_reference(Us, Vts, GAMMA / PEAK_LR)


BUILDERS = {"frozen": _frozen, "peft_lora": _peft_lora, "peft_lora_fused": _peft_lora_fused, "sorsa": _sorsa,
            "sorsa_reference": _sorsa_reference}  # fmt: skip


def training_step(model: nn.Module, regularize, batch: torch.Tensor, device: torch.device):
    """``step() -> loss``: one optimizer step of ``model`` on ``batch`` as described above."""
    params = _trainable(model)
    optimizer = torch.optim.AdamW(params, lr=PEAK_LR) if params else None

    def step():
        with activation_autocast(device):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        if optimizer is not None:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            if regularize is not None:
                regularize()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def measure(shape: dict, tokens: int, rank: int, device: torch.device) -> dict:
    """One row: every candidate's step time, ratio to ``frozen``, first loss and peak memory."""
    sequence = shape["sequence"]
    generator = torch.Generator().manual_seed(SEED)
    batch = torch.randint(shape["vocab_size"], (tokens // sequence, sequence), generator=generator).to(device)
    names = [n for n in CANDIDATES if "peft" not in n or importlib.util.find_spec("peft") is not None]
    steps, row = {}, dict(tokens=tokens, rank=rank, layers=shape["num_hidden_layers"],
                          hidden=shape["hidden_size"], intermediate=shape["intermediate_size"])  # fmt: skip
    for name in names:
        model, regularize = BUILDERS[name](shape, rank, device)
        steps[name] = training_step(model, regularize, batch, device)
        row[f"{name}_loss"] = steps[name]().item()  # before any update: the model as built
    times = interleaved_ms(steps)
    for name in names:
        row[f"{name}_rounds_ms"] = times[name]
        row[f"{name}_ms"] = statistics.median(times[name])
        row[f"{name}_peak_mb"] = peak_memory_mb(steps[name])
        row[f"{name}_host_ms"] = idle_host_ms(steps[name], device)
        if name != "frozen":
            row[f"{name}_ratio"] = median_ratio(times[name], times["frozen"])
    row["floor_projections"] = _floor(shape, rank)
    return row


def _floor(shape: dict, rank: int) -> float:
    """The adapters' FLOPs over the frozen projections' (forward + dx), plus one: the step's floor
    if the projections were all it computed (attention and the output head make it lower)."""
    hidden, inner = shape["hidden_size"], shape["intermediate_size"]
    projections = [(hidden, hidden)] * 4 + [(hidden, inner)] * 2 + [(inner, hidden)]
    base = sum(i * o for i, o in projections)
    return 1 + 1.5 * rank * sum(i + o for i, o in projections) / base


COLUMNS = ["tokens", "rank", "frozen_ms", "peft_lora_ratio", "peft_lora_fused_ratio", "sorsa_ratio",
           "sorsa_reference_ratio", "floor_projections", "frozen_host_ms", "sorsa_host_ms", "frozen_peak_mb",
           "peft_lora_peak_mb", "sorsa_peak_mb"]  # fmt: skip


def run(quick: bool) -> list[dict]:
    """Every row: the H100 configuration or (``quick``) a tiny CPU one."""
    if quick:
        device, shape, tokens, ranks = torch.device("cpu"), CPU_MODEL, CPU_TOKENS, CPU_RANKS
    else:
        device, shape, tokens, ranks = torch.device("cuda"), GPU_MODEL, GPU_TOKENS, GPU_RANKS
    rows = []
    for count in tokens:
        for rank in ranks:
            row = measure(shape, count, rank, device)
            rows.append(row)
            ratios = ", ".join(f"{name} {row[f'{name}_ratio']:.3f}" for name in CANDIDATES if f"{name}_ratio" in row)
            print(f"{count} tokens, r={rank}: step / frozen step: {ratios}", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def main(quick: bool, out_dir: str = "bench/results") -> None:
    if importlib.util.find_spec("transformers") is None:
        print("model suite skipped: it needs transformers (pip install -e '.[hf]')")
        return
    rows = run(quick)
    print(format_table(rows, COLUMNS))
    print(f"wrote {write_results('model', rows, out_dir, quick=quick, model=CPU_MODEL if quick else GPU_MODEL)}")


if __name__ == "__main__":
    main(not torch.cuda.is_available())
