"""SORSALinear and the whole-model helpers."""

import pytest
import torch
from torch import nn

from sorsa_kernels import SORSALinear, apply_sorsa, sora_prox_, sorsa_layers, sorsa_parameters
from support import DEVICE, assert_close

MODES = ["sorsa", "pissa", "lora", "sora"]


def make_linear(in_features=45, out_features=37, dtype=torch.float64, bias=True):
    return nn.Linear(in_features, out_features, bias=bias, device=DEVICE, dtype=dtype)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("init", ["svd", "rsvd"])
@pytest.mark.parametrize("alpha", [None, 16.0])
def test_output_unchanged_at_init(mode, init, alpha):
    linear = make_linear()
    x = torch.randn(3, 5, 45, device=DEVICE, dtype=torch.float64)
    expected = linear(x)
    layer = SORSALinear.from_linear(linear, rank=7, alpha=alpha, init=init, mode=mode, adapter_dtype=torch.float64)
    assert_close(layer(x), expected, 1e-12, "output at init")


def test_sorsa_init_is_the_svd_split():
    linear = make_linear()
    original = linear.weight.detach().clone()
    layer = SORSALinear.from_linear(linear, rank=7, alpha=14.0, adapter_dtype=torch.float64)
    U, sigma, Vt = torch.linalg.svd(original, full_matrices=False)
    assert layer.weight is linear.weight and not layer.weight.requires_grad
    assert_close(layer.S * layer.scale, sigma[:7], 1e-12, "scale * S = top singular values")
    assert_close(layer.U.abs(), U[:, :7].abs(), 1e-10, "U")
    assert_close(layer.Vt.abs(), Vt[:7].abs(), 1e-10, "Vt")
    assert_close(layer.weight, (U[:, 7:] * sigma[7:]) @ Vt[7:], 1e-12, "residual")


def test_pissa_factors_are_root_split():
    linear = make_linear()
    original = linear.weight.detach().clone()
    layer = SORSALinear.from_linear(linear, rank=5, mode="pissa", adapter_dtype=torch.float64)
    assert layer.S is None
    sigma = torch.linalg.svdvals(original)[:5]
    assert_close(layer.U.norm(dim=0), sigma.sqrt(), 1e-10, "column norms of B")
    assert_close(layer.Vt.norm(dim=1), sigma.sqrt(), 1e-10, "row norms of A")


@pytest.mark.parametrize("mode", ["lora", "sora"])
def test_lora_modes_keep_weight_and_start_at_zero(mode):
    linear = make_linear(dtype=torch.float32)
    original = linear.weight.detach().clone()
    layer = SORSALinear.from_linear(linear, rank=4, mode=mode)
    assert torch.equal(layer.weight, original)
    assert torch.count_nonzero(layer.U) == 0 and torch.count_nonzero(layer.Vt) > 0
    assert (layer.S is None) == (mode == "lora")


def test_bfloat16_base_keeps_its_dtype_and_output():
    linear = make_linear(dtype=torch.bfloat16)
    x = torch.randn(11, 45, device=DEVICE, dtype=torch.bfloat16)
    expected = linear(x)
    layer = SORSALinear.from_linear(linear, rank=6)
    assert layer.weight.dtype == torch.bfloat16 and layer.U.dtype == torch.float32
    assert_close(layer(x), expected, 2e-2, "bf16 output at init")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_merge_unmerge_round_trip(dtype):
    layer = SORSALinear.from_linear(make_linear(dtype=dtype), rank=6)
    with torch.no_grad():
        layer.U.add_(0.1 * torch.randn_like(layer.U))
        layer.S.mul_(1.5)
    x = torch.randn(9, 45, device=DEVICE, dtype=dtype)
    residual = layer.weight.detach().clone()
    before = layer(x)
    layer.merge()
    assert layer.merged
    merged_ref = (residual.double() + layer.delta_weight().double()).to(dtype)
    assert torch.equal(layer.weight, merged_ref)
    assert_close(layer(x), before, 2e-2 if dtype == torch.bfloat16 else 1e-5, "merged output")
    layer.unmerge()
    assert not layer.merged and torch.equal(layer.weight, residual)
    assert torch.equal(layer(x), before)


def test_dropout_applies_to_the_adapter_only():
    torch.manual_seed(0)
    layer = SORSALinear.from_linear(make_linear(dtype=torch.float32), rank=6, dropout=0.5)
    x = torch.randn(64, 45, device=DEVICE)
    layer.train()
    torch.manual_seed(1)
    y = layer(x)
    torch.manual_seed(1)
    kept = nn.functional.dropout(x, 0.5, training=True)
    adapter = layer.scale * ((kept @ layer.Vt.T) * layer.S) @ layer.U.T
    assert_close(y, nn.functional.linear(x, layer.weight, layer.bias) + adapter, 1e-5, "train-mode output")
    layer.eval()
    assert_close(layer(x), nn.functional.linear(x, layer.weight + layer.delta_weight(), layer.bias), 1e-5, "eval")


def test_prune_drops_zero_gates_and_slices_optimizer_state():
    layer = SORSALinear.from_linear(make_linear(dtype=torch.float32), rank=8, mode="sora")
    optimizer = torch.optim.AdamW([layer.U, layer.S, layer.Vt], lr=1e-2)
    x = torch.randn(16, 45, device=DEVICE)
    layer(x).square().mean().backward()
    optimizer.step()
    with torch.no_grad():
        layer.S[[1, 4, 5]] = 0.0
    before = layer(x)
    keep = [0, 2, 3, 6, 7]
    exp_avg = optimizer.state[layer.U]["exp_avg"][:, keep].clone()
    assert layer.prune_(optimizer) == 5
    assert layer.U.shape == (37, 5) and layer.S.shape == (5,) and layer.Vt.shape == (5, 45)
    assert torch.equal(optimizer.state[layer.U]["exp_avg"], exp_avg)
    assert {id(p) for p in optimizer.param_groups[0]["params"]} == {id(layer.U), id(layer.S), id(layer.Vt)}
    assert_close(layer(x), before, 1e-6, "output after pruning")
    optimizer.zero_grad()
    layer(x).square().mean().backward()
    optimizer.step()  # the optimizer still works on the shrunk parameters


def test_sora_training_step_with_prox():
    layer = SORSALinear.from_linear(make_linear(dtype=torch.float32), rank=4, mode="sora")
    sora_prox_([layer.S], 0.25)
    assert torch.allclose(layer.S, torch.full((4,), 0.75, device=DEVICE))


class TinyBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.ModuleDict({"q_proj": nn.Linear(24, 24), "k_proj": nn.Linear(24, 8), "o_proj": nn.Linear(24, 24)})
        self.mlp = nn.ModuleDict({"up_proj": nn.Linear(24, 40), "down_proj": nn.Linear(40, 24)})
        self.norm = nn.LayerNorm(24)


def tiny_model():
    return nn.Sequential(TinyBlock(), TinyBlock()).to(DEVICE)


def test_apply_sorsa_targets_like_peft():
    model = tiny_model()
    apply_sorsa(model, ["q_proj", "down_proj"], rank=4)
    names = [name for name, _ in sorsa_layers(model)]
    assert names == ["0.attn.q_proj", "0.mlp.down_proj", "1.attn.q_proj", "1.mlp.down_proj"]
    trainable = {p for p in model.parameters() if p.requires_grad}
    assert trainable == set(sorsa_parameters(model)) and len(trainable) == 12

    apply_sorsa(model, ["k_proj"], rank=2)  # a second call keeps the first call's adapters trainable
    assert {p for p in model.parameters() if p.requires_grad} == set(sorsa_parameters(model))
    assert len(sorsa_parameters(model)) == 18

    regex_model = apply_sorsa(tiny_model(), r"1\.attn\.(q|k)_proj", rank=3, mode="lora")
    assert [name for name, _ in sorsa_layers(regex_model)] == ["1.attn.q_proj", "1.attn.k_proj"]


def test_apply_sorsa_keeps_outputs_and_trains():
    model = tiny_model().double()
    x = torch.randn(5, 24, device=DEVICE, dtype=torch.float64)
    expected = model[1].mlp.down_proj(model[0].mlp.up_proj(x))
    apply_sorsa(model, ["up_proj", "down_proj"], rank=4, adapter_dtype=torch.float64)
    assert_close(model[1].mlp.down_proj(model[0].mlp.up_proj(x)), expected, 1e-12, "output")
    optimizer = torch.optim.SGD(sorsa_parameters(model), lr=0.1)
    target = torch.randn_like(expected)
    losses = []
    for _ in range(5):
        loss = (model[1].mlp.down_proj(model[0].mlp.up_proj(x)) - target).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize(
    "kwargs,error,text",
    [
        (dict(rank=0), ValueError, "rank must be >= 1"),
        (dict(rank=38), ValueError, "rank 38 exceeds"),
        (dict(rank=2.5), TypeError, "rank must be an integer"),
        (dict(rank=4, mode="dora"), ValueError, "mode must be one of"),
        (dict(rank=4, init="qr"), ValueError, "init must be one of"),
        (dict(rank=4, dropout=1.0), ValueError, "dropout must be < 1"),
    ],
)
def test_from_linear_rejects_bad_arguments(kwargs, error, text):
    with pytest.raises(error, match=text):
        SORSALinear.from_linear(make_linear(), **kwargs)


def test_bad_targets_and_layers():
    with pytest.raises(ValueError, match="matches no nn.Linear"):
        apply_sorsa(tiny_model(), ["v_proj"], rank=2)
    with pytest.raises(TypeError, match="nn.Linear"):
        SORSALinear.from_linear(nn.Conv1d(3, 3, 1), rank=1)
    with pytest.raises(ValueError, match="has no S"):
        SORSALinear.from_linear(make_linear(), rank=2, mode="pissa").prune_()


def test_grouped_rsvd_init_records_the_initial_adapter_after_the_svd():
    model = apply_sorsa(tiny_model(), ["up_proj", "down_proj"], rank=4, init="rsvd", keep_initial=True, progress=False)
    for _, layer in sorsa_layers(model):
        U0, S0, Vt0 = layer.initial_adapter
        assert torch.count_nonzero(S0) == 4
        assert torch.equal(U0, layer.U.detach().cpu()) and torch.equal(Vt0, layer.Vt.detach().cpu())
    with pytest.raises(ValueError, match="keep_initial needs the SVD init"):
        SORSALinear.from_linear(make_linear(), rank=2, init="none", keep_initial=True)
