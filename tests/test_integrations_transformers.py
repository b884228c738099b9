"""The SORSA regularizer in a training step: ``apply_ortho_grad_`` and the Trainer callback."""

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from sorsa_kernels import apply_ortho_grad_, apply_sorsa, sorsa_layers, sorsa_parameters
from support import LLAMA_TARGETS, assert_close, random_tokens, tiny_llama


def official_reg64(Us, Vts):
    """The reference SORSA ``calc_ortho`` in float64: mean of unsquared Frobenius norms."""
    norms = [torch.linalg.matrix_norm(U.T @ U - torch.eye(U.shape[1], dtype=U.dtype)) for U in Us]
    norms += [torch.linalg.matrix_norm(Vt @ Vt.T - torch.eye(Vt.shape[0], dtype=Vt.dtype)) for Vt in Vts]
    return torch.stack(norms).mean()


def mixed_model():
    """Two SORSA layers, one PiSSA layer and one plain linear, with U/Vt off orthonormality."""
    model = nn.Sequential(nn.Linear(30, 40), nn.Linear(40, 25), nn.Linear(25, 33), nn.Linear(33, 20))
    apply_sorsa(model, ["0", "1"], rank=6, adapter_dtype=torch.float64)
    apply_sorsa(model, ["2"], rank=5, mode="pissa", adapter_dtype=torch.float64, freeze_base=False)
    with torch.no_grad():
        for p in sorsa_parameters(model):
            p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("form", ["official", "squared"])
def test_model_route_adds_scaled_gradient_of_sorsa_layers_only(form):
    model = mixed_model()
    sorsa = [layer for _, layer in sorsa_layers(model) if layer.mode == "sorsa"]
    Us = [layer.U.detach().clone().requires_grad_() for layer in sorsa]
    Vts = [layer.Vt.detach().clone().requires_grad_() for layer in sorsa]
    if form == "official":
        expected_value = official_reg64(Us, Vts)
    else:
        expected_value = sum(torch.linalg.matrix_norm(U.T @ U - torch.eye(6, dtype=U.dtype)).square() for U in Us)
        expected_value = expected_value + sum(
            torch.linalg.matrix_norm(Vt @ Vt.T - torch.eye(6, dtype=Vt.dtype)).square() for Vt in Vts
        )
    expected_value.backward()
    prior = {layer: torch.randn_like(layer.U) for layer in sorsa}
    for layer in sorsa:
        layer.U.grad = prior[layer].clone()
    gamma, peak_lr = 4e-4, 2e-5
    value = apply_ortho_grad_(model, gamma, peak_lr, form=form)
    assert_close(value, expected_value, 1e-12, "value")
    for layer, U, Vt in zip(sorsa, Us, Vts):
        assert_close(layer.U.grad, prior[layer] + gamma / peak_lr * U.grad, 1e-12, "dU added to the existing grad")
        assert_close(layer.Vt.grad, gamma / peak_lr * Vt.grad, 1e-12, "dVt allocated")
        assert layer.S.grad is None
    pissa = model[2]
    assert pissa.U.grad is None and pissa.Vt.grad is None


def test_parameter_route_matches_model_route():
    model = mixed_model()
    twin = copy.deepcopy(model)
    sorsa_only = [p for _, layer in sorsa_layers(twin) if layer.mode == "sorsa" for p in (layer.U, layer.S, layer.Vt)]
    value = apply_ortho_grad_(model, 0.3)
    twin_value = apply_ortho_grad_(sorsa_only, 0.3)
    assert torch.equal(value, twin_value)
    for (_, a), (_, b) in zip(sorsa_layers(model), sorsa_layers(twin)):
        for p, q in ((a.U, b.U), (a.Vt, b.Vt)):
            assert (p.grad is None and q.grad is None) or torch.equal(p.grad, q.grad)


def test_frozen_factors_are_left_alone():
    model = mixed_model()
    model[1].U.requires_grad_(False)
    model[1].Vt.requires_grad_(False)
    layer = model[0]
    expected = official_reg64([layer.U.detach()], [layer.Vt.detach()])
    assert_close(apply_ortho_grad_(model, 1.0), expected, 1e-12, "value over the trainable factors")
    assert model[1].U.grad is None and model[1].Vt.grad is None


@pytest.mark.parametrize(
    "call, error, text",
    [
        (lambda m: apply_ortho_grad_(nn.Sequential(nn.Linear(4, 4)), 1.0), ValueError, "mode 'sorsa'"),
        (lambda m: apply_ortho_grad_(m, -1.0), ValueError, "gamma"),
        (lambda m: apply_ortho_grad_(m, 1.0, 0.0), ValueError, "peak_lr"),
        (lambda m: apply_ortho_grad_(m, "1"), TypeError, "gamma"),
        (lambda m: apply_ortho_grad_(m[0].U, 1.0), TypeError, "iterable of tensors"),
        (lambda m: apply_ortho_grad_([torch.ones(2, 2, 2)], 1.0), ValueError, "model_or_params[0]"),
        (lambda m: apply_ortho_grad_([m[0].S], 1.0), ValueError, "no 2-D tensor"),
        (lambda m: apply_ortho_grad_(m, 1.0, form="cubic"), ValueError, "form"),
    ],
)
def test_bad_arguments(call, error, text):
    with pytest.raises(error, match=text.replace("[", r"\[").replace("]", r"\]")):
        call(mixed_model())


def test_pissa_model_has_nothing_to_regularize():
    model = nn.Sequential(nn.Linear(8, 8))
    apply_sorsa(model, ["0"], rank=2, mode="pissa")
    with pytest.raises(ValueError, match="pissa, lora and sora have none"):
        apply_ortho_grad_(model, 1.0)


# ---- transformers.Trainer -------------------------------------------------------------------

STEPS, MICRO_BATCH, ACCUMULATION, LR, CLIP, GAMMA = 3, 2, 2, 1e-3, 0.05, 4e-4


def sorsa_llama():
    """A tiny Llama with SORSA on every projection, its factors pushed off orthonormality so
    that the regularizer's gradient is far from zero."""
    model = apply_sorsa(tiny_llama(), LLAMA_TARGETS, rank=4)
    with torch.no_grad():
        for p in sorsa_parameters(model):
            p.add_(0.05 * torch.randn_like(p))
    return model


def token_data():
    tokens = random_tokens(STEPS * ACCUMULATION * MICRO_BATCH, 12)
    return [{"input_ids": row, "labels": row} for row in tokens]


def optimizer_and_schedule(model):
    optimizer = torch.optim.AdamW(sorsa_parameters(model), lr=LR)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / STEPS)


def train_with_trainer(model, data, out_dir, gamma):
    transformers = pytest.importorskip("transformers")
    from torch.utils.data import SequentialSampler

    from sorsa_kernels.integrations.transformers import OrthoRegCallback

    class InOrderTrainer(transformers.Trainer):
        # The data order is the only thing the hand-written loop must be told.
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    args = transformers.TrainingArguments(
        output_dir=str(out_dir),
        per_device_train_batch_size=MICRO_BATCH,
        gradient_accumulation_steps=ACCUMULATION,
        max_steps=STEPS,
        learning_rate=LR,
        max_grad_norm=CLIP,
        logging_strategy="no",
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
    )
    callback = OrthoRegCallback(gamma)
    trainer = InOrderTrainer(
        model=model, args=args, train_dataset=data, optimizers=optimizer_and_schedule(model), callbacks=[callback]
    )
    # Each micro-batch's mean loss divided by the accumulation steps, as the loop below does.
    trainer.model_accepts_loss_kwargs = False
    trainer.train()
    return callback


def train_by_hand(model, data, gamma, regularize="after_clip"):
    optimizer, schedule = optimizer_and_schedule(model)
    model.train()
    batches = iter(range(0, len(data), MICRO_BATCH))
    for _ in range(STEPS):
        for _ in range(ACCUMULATION):
            start = next(batches)
            batch = {key: torch.stack([row[key] for row in data[start : start + MICRO_BATCH]]) for key in data[0]}
            (model(**batch).loss / ACCUMULATION).backward()
            if regularize == "per_micro_batch":
                apply_ortho_grad_(model, gamma, LR)
        if regularize == "before_clip":
            apply_ortho_grad_(model, gamma, LR)
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        if regularize == "after_clip":
            apply_ortho_grad_(model, gamma, LR)
        optimizer.step()
        schedule.step()
        model.zero_grad()


def same_parameters(a, b):
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_trainer_callback_equals_hand_written_loop(tmp_path):
    pytest.importorskip("transformers")
    start, data = sorsa_llama(), token_data()
    by_trainer, by_hand = copy.deepcopy(start), copy.deepcopy(start)
    callback = train_with_trainer(by_trainer, data, tmp_path, GAMMA)
    train_by_hand(by_hand, data, GAMMA)
    assert callback.last_value is not None and callback.last_value > 0
    assert not same_parameters(by_trainer, start)
    assert same_parameters(by_trainer, by_hand), "Trainer + OrthoRegCallback differs from the hand-written loop"
    # The comparison can tell the regularizer's placement apart: adding it per micro-batch,
    # before clipping, or not at all leaves other parameters.
    for variant in ("per_micro_batch", "before_clip"):
        other = copy.deepcopy(start)
        train_by_hand(other, data, GAMMA, regularize=variant)
        assert not same_parameters(by_trainer, other), variant
    unregularized = copy.deepcopy(start)
    train_by_hand(unregularized, data, 0.0)
    assert not same_parameters(by_trainer, unregularized)


def test_callback_checks_arguments():
    pytest.importorskip("transformers")
    from sorsa_kernels.integrations.transformers import OrthoRegCallback

    with pytest.raises(ValueError, match="form"):
        OrthoRegCallback(1e-4, form="cubic")
    with pytest.raises(ValueError, match="gamma"):
        OrthoRegCallback(-1e-4)


def test_package_import_needs_neither_transformers_nor_peft():
    code = (
        "import sys, sorsa_kernels; "
        "assert not {'transformers', 'peft'} & set(sys.modules), sorted({'transformers', 'peft'} & set(sys.modules)); "
        "assert callable(sorsa_kernels.apply_ortho_grad_)"
    )
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
