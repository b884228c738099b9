"""Shared test machinery: the device under test, backend parametrization, float64 oracles,
relative errors and poisoned allocations."""

from __future__ import annotations

import contextlib

import pytest
import torch

from sorsa_kernels.backends import IMPLEMENTATIONS, why_unavailable

# The suite runs on the GPU when there is one (the device machine), else on the CPU.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

gpu = pytest.mark.gpu
requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# Relative Frobenius error allowed against the float64 oracle, by the dtype of the inputs.
# float32 on a GPU backend runs Triton's full-precision dot (tf32 stays off, torch's default).
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 1e-2}


def backend_params(op: str) -> list:
    """One pytest param per backend implementing ``op``, skipped with the reason it cannot run here."""
    params = []
    for name in IMPLEMENTATIONS[op]:
        reason = why_unavailable(name, DEVICE)
        marks = [pytest.mark.skip(reason=f"{name} backend: {reason}")] if reason else []
        params.append(pytest.param(name, marks=marks, id=name))
    return params


def interpretable_dtypes(backend: str, dtypes):
    """bfloat16 ``tl.dot`` is wrong under the Triton CPU interpreter: test it on GPUs only."""
    if backend == "triton" and DEVICE.type == "cpu":
        return [d for d in dtypes if d != torch.bfloat16]
    return list(dtypes)


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """‖actual − expected‖_F / ‖expected‖_F in float64; NaN or Inf anywhere gives inf."""
    actual = actual.detach().to(torch.float64).cpu()
    expected = expected.detach().to(torch.float64).cpu()
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if not torch.isfinite(actual).all():
        return float("inf")
    scale = expected.norm().item()
    return (actual - expected).norm().item() / (scale if scale > 0 else 1.0)


def assert_close(actual, expected, tol: float, what: str = ""):
    err = rel_error(actual, expected)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


def assert_faithfully_rounded(actual, exact, magnitude, what: str = ""):
    """Each element of the 16-bit ``actual``, a sum rounded to its dtype, within one unit in the
    last place of the ``exact`` sum plus ``eps²·magnitude`` (``magnitude``: the sum of the terms'
    absolute values): what a sum whose wider operand entered as a rounding plus its rounded
    residue leaves, float32 accumulation included. Without the residue the error is about
    ``eps·magnitude/√terms``, which elements whose sums cancel show. NaN or Inf anywhere fails."""
    eps = torch.finfo(actual.dtype).eps
    actual, exact, magnitude = (t.detach().to(torch.float64).cpu() for t in (actual, exact, magnitude))
    assert actual.shape == exact.shape, f"shape {tuple(actual.shape)} != {tuple(exact.shape)}"
    excess = ((actual - exact).abs() - eps * exact.abs() - eps**2 * magnitude).nan_to_num(nan=float("inf"))
    assert excess.max() <= 0, f"{what}: {(excess > 0).sum()} elements beyond the bound, worst by {excess.max():.3e}"


def as_float64(*tensors):
    return [None if t is None else t.detach().to(torch.float64).requires_grad_(t.requires_grad) for t in tensors]


@contextlib.contextmanager
def poisoned_allocations():
    """Every ``torch.empty``/``empty_like``/``new_empty`` made inside comes back filled with NaN
    (so an output element a kernel forgets to write fails the test), and on CUDA the caching
    allocator's free memory is NaN-filled too."""
    originals = torch.empty, torch.empty_like, torch.Tensor.new_empty

    def poison(tensor):
        if tensor.dtype.is_floating_point:
            tensor.fill_(float("nan"))
        return tensor

    torch.empty = lambda *a, **k: poison(originals[0](*a, **k))
    torch.empty_like = lambda *a, **k: poison(originals[1](*a, **k))
    torch.Tensor.new_empty = lambda self, *a, **k: poison(originals[2](self, *a, **k))
    if torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info()
        filler = originals[0](min(free // 4, 1 << 30), dtype=torch.uint8, device="cuda").fill_(0xFF)
        del filler
    try:
        yield
    finally:
        torch.empty, torch.empty_like, torch.Tensor.new_empty = originals


LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(seed: int = 0, **config):
    """A two-layer Llama-architecture causal LM built from a config (no download), float32,
    deterministic in ``seed``; keyword arguments override config fields."""
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = dict(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    fields.update(config)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LlamaForCausalLM(LlamaConfig(**fields))


def random_tokens(batch: int, length: int, vocab_size: int = 97) -> torch.Tensor:
    return torch.randint(vocab_size, (batch, length))
