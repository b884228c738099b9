"""PEFT interop: ``export_peft_lora`` round trips through stock PEFT, ``accelerate_peft`` keeps
PEFT's outputs and gradients and is reversible."""

import copy
import json
import warnings

import pytest
import torch
from torch import nn

from sorsa_kernels import SORSALinear, apply_sorsa, sorsa_layers, sorsa_parameters
from support import DEVICE, LLAMA_TARGETS, TOLERANCE, assert_close, gpu, random_tokens, rel_error, tiny_llama

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

from sorsa_kernels.integrations import peft as integration  # noqa: E402
from sorsa_kernels.integrations.peft import (  # noqa: E402
    SORSAPeftLinear,
    accelerate_peft,
    export_peft_lora,
    restore_peft,
)

# fp32 everywhere: the two sides differ only in rounding order.
FP32_TOLERANCE = 2e-5
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]


def perturb_(params, size=0.1):
    """Stand-in for training: move every adapter parameter well away from its init."""
    with torch.no_grad():
        for p in params:
            p.add_(size * torch.randn_like(p))


def logits(model, tokens):
    model.eval()
    with torch.no_grad():
        return model(input_ids=tokens).logits


def load_exported(original, path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = peft.PeftModel.from_pretrained(original, path)
    problems = [str(w.message) for w in caught if "missing" in str(w.message) or "unexpected" in str(w.message)]
    assert not problems, problems
    return loaded


# ---- export_peft_lora -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mode, alpha", [("sorsa", None), ("sorsa", 8.0), ("pissa", 16.0), ("lora", 8.0), ("sora", None)]
)
def test_export_round_trip(mode, alpha, tmp_path):
    original = tiny_llama(attention_bias=True)
    model = apply_sorsa(copy.deepcopy(original), LLAMA_TARGETS, rank=4, alpha=alpha, mode=mode, keep_initial=True)
    perturb_(sorsa_parameters(model))
    tokens = random_tokens(2, 10)
    expected = logits(model, tokens)
    assert (expected - logits(original, tokens)).norm() > 0.1 * expected.norm(), "the adapters must matter"

    export_peft_lora(model, tmp_path, task_type="CAUSAL_LM")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    export_rank = 8 if mode in ("sorsa", "pissa") else 4
    assert (config["r"], config["lora_alpha"], config["peft_type"]) == (export_rank, export_rank, "LORA")
    loaded = load_exported(original, tmp_path)
    assert isinstance(loaded, peft.PeftModelForCausalLM)
    assert_close(logits(loaded, tokens), expected, FP32_TOLERANCE, "PEFT-loaded logits")


def test_export_mixed_modes_and_pruned_ranks(tmp_path):
    original = tiny_llama()
    model = copy.deepcopy(original)
    apply_sorsa(model, ATTENTION, rank=3, keep_initial=True)
    apply_sorsa(model, MLP, rank=6, mode="sora", freeze_base=False)
    perturb_(sorsa_parameters(model))
    gate_layer = model.model.layers[1].mlp.up_proj
    with torch.no_grad():
        gate_layer.S[1::2] = 0.0
    assert gate_layer.prune_() == 3
    tokens = random_tokens(3, 7)
    expected = logits(model, tokens)

    export_peft_lora(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["r"] == 6 and sorted(config["target_modules"]) == sorted(name for name, _ in sorsa_layers(model))
    loaded = load_exported(original, tmp_path)
    assert_close(logits(loaded, tokens), expected, FP32_TOLERANCE, "PEFT-loaded logits")


def test_export_of_svd_mode_needs_the_initial_adapter(tmp_path):
    model = apply_sorsa(tiny_llama(), ["q_proj"], rank=2)
    with pytest.raises(ValueError, match="keep_initial=True"):
        export_peft_lora(model, tmp_path)
    with pytest.raises(ValueError, match="no SORSALinear"):
        export_peft_lora(tiny_llama(), tmp_path)


@pytest.mark.parametrize("mode", ["sorsa", "pissa", "lora", "sora"])
def test_initial_adapter_is_a_cpu_copy_outside_the_state_dict(mode):
    layer = SORSALinear.from_linear(nn.Linear(20, 12), rank=3, mode=mode, keep_initial=True)
    if mode in ("lora", "sora"):
        assert layer.initial_adapter is None  # U₀ = 0: nothing to subtract
        return
    U0, S0, Vt0 = layer.initial_adapter
    for kept, param in ((U0, layer.U), (S0, layer.S), (Vt0, layer.Vt)):
        if param is None:
            assert kept is None
            continue
        assert kept.device.type == "cpu" and torch.equal(kept, param.detach())
        assert kept.data_ptr() != param.data_ptr()
    perturb_(sorsa_parameters(layer))
    assert not torch.equal(U0, layer.U.detach())
    assert set(layer.state_dict()) == {name for name, _ in layer.named_parameters()} | {"weight", "bias"}


# ---- accelerate_peft -------------------------------------------------------------------------


def peft_llama(**lora_options):
    options = dict(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, lora_dropout=0.0)
    options.update(lora_options)
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**options))
    perturb_([p for name, p in model.named_parameters() if "lora_B" in name], size=0.05)
    return model


@pytest.fixture
def fused_calls(monkeypatch):
    """How many times the fused op ran in accelerated layers."""
    calls = []
    original = integration.sorsa_linear

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(integration, "sorsa_linear", counting)
    return calls


def loss_and_grads(model, tokens):
    model.zero_grad()
    loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if "lora_" in name}
    return loss.detach(), grads


@pytest.mark.parametrize(
    "options",
    [{}, {"use_rslora": True}, {"init_lora_weights": "pissa"}, {"lora_dropout": 0.2}],
    ids=["lora", "rslora", "pissa", "dropout"],
)
def test_accelerated_matches_peft(options, fused_calls):
    reference = peft_llama(**options)
    accelerated = accelerate_peft(copy.deepcopy(reference))
    layers = [m for m in accelerated.modules() if isinstance(m, peft.tuners.lora.Linear)]
    assert len(layers) == 14 and all(type(m) is SORSAPeftLinear for m in layers)
    tokens = random_tokens(2, 9)
    assert_close(logits(accelerated, tokens), logits(reference, tokens), FP32_TOLERANCE, "eval logits")
    assert len(fused_calls) == 14

    reference.train(), accelerated.train()
    torch.manual_seed(1)  # the same dropout masks on both sides
    expected_loss, expected = loss_and_grads(reference, tokens)
    torch.manual_seed(1)
    loss, grads = loss_and_grads(accelerated, tokens)
    assert len(fused_calls) == 28
    assert_close(loss, expected_loss, FP32_TOLERANCE, "training loss")
    assert grads.keys() == expected.keys() and len(grads) == 28
    for name in grads:
        assert_close(grads[name], expected[name], 1e-4, name)


def test_restore_and_runtime_fallbacks(fused_calls):
    reference = peft_llama()
    accelerated = accelerate_peft(copy.deepcopy(reference))
    tokens = random_tokens(2, 6)
    expected = logits(reference, tokens)

    with accelerated.disable_adapter():
        with reference.disable_adapter():
            assert torch.equal(logits(accelerated, tokens), logits(reference, tokens))
    accelerated.merge_adapter()
    assert_close(logits(accelerated, tokens), expected, FP32_TOLERANCE, "merged")
    accelerated.unmerge_adapter()
    assert not fused_calls, "disabled or merged adapters must take PEFT's path"

    restore_peft(accelerated)
    lora_layers = [m for m in accelerated.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    assert len(lora_layers) == 14 and all(type(m) is peft.tuners.lora.Linear for m in lora_layers)
    assert not any(hasattr(m, "sorsa_backend") for m in accelerated.modules())
    assert_close(logits(accelerated, tokens), expected, FP32_TOLERANCE, "restored")
    assert not fused_calls


def test_unsupported_layers_are_left_with_a_warning():
    model = peft_llama(use_dora=True)
    with pytest.warns(UserWarning, match="14 PEFT LoRA layers stay on PEFT's forward.*LoRA variant"):
        accelerate_peft(model)
    assert not any(isinstance(m, SORSAPeftLinear) for m in model.modules())
    with pytest.raises(ValueError, match="no PEFT LoRA layer"):
        accelerate_peft(tiny_llama())
    with pytest.raises(ValueError, match="unknown backend 'fastest'"):
        accelerate_peft(peft_llama(), backend="fastest")


def test_custom_module_route(fused_calls):
    reference = peft_llama()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, lora_dropout=0.0)
    config._register_custom_module({nn.Linear: SORSAPeftLinear})
    custom = peft.get_peft_model(tiny_llama(), config)
    custom.load_state_dict(reference.state_dict())
    assert sum(type(m) is SORSAPeftLinear for m in custom.modules()) == 14
    tokens = random_tokens(2, 5)
    assert_close(logits(custom, tokens), logits(reference, tokens), FP32_TOLERANCE, "custom-module logits")
    assert len(fused_calls) == 14


def test_float32_adapters_on_a_bfloat16_model(fused_calls):
    """PEFT keeps float32 adapters under a bfloat16 base (autocast_adapter_dtype); the fused op
    takes them as they are, accumulating in float32."""
    base = tiny_llama().to(torch.bfloat16)
    reference = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS))
    perturb_([p for name, p in reference.named_parameters() if "lora_B" in name], size=0.05)
    assert reference.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.dtype == torch.float32
    accelerated = accelerate_peft(copy.deepcopy(reference))
    tokens = random_tokens(2, 8)
    expected = logits(reference, tokens)
    actual = logits(accelerated, tokens)
    assert actual.dtype == torch.bfloat16 and len(fused_calls) == 14
    assert_close(actual, expected, TOLERANCE[torch.bfloat16], "bfloat16 logits")


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_accelerated_is_as_accurate_as_peft_on_gpu(dtype, fused_calls):
    """Against the same PEFT model in float64, the accelerated model's logits, loss and
    gradients are within the dtype's tolerance or no worse than twice PEFT's own error."""
    base = tiny_llama(hidden_size=256, intermediate_size=512, num_attention_heads=8, num_key_value_heads=4)
    config = peft.LoraConfig(r=16, lora_alpha=32, target_modules=LLAMA_TARGETS, init_lora_weights="pissa")
    reference = peft.get_peft_model(base.to(DEVICE, dtype), config)
    oracle = copy.deepcopy(reference).to(torch.float64)
    accelerated = accelerate_peft(copy.deepcopy(reference))
    tokens = random_tokens(4, 33).to(DEVICE)
    results = {}
    for name, model in (("peft", reference), ("ours", accelerated), ("oracle", oracle)):
        model.train()  # dropout is 0: train mode only enables the gradients' path
        loss, grads = loss_and_grads(model, tokens)
        results[name] = {"logits": logits(model, tokens), "loss": loss, **grads}
    assert len(fused_calls) == 28
    for key, exact in results["oracle"].items():
        ours, theirs = rel_error(results["ours"][key], exact), rel_error(results["peft"][key], exact)
        assert ours <= max(TOLERANCE[dtype], 2 * theirs), f"{key}: {ours:.2e} vs PEFT's {theirs:.2e}"
