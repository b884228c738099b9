"""``transformers.Trainer`` integration: the SORSA regularizer as a ``TrainerCallback``.

Why a callback suffices: ``Trainer._inner_training_loop`` (transformers 5.17.0,
``transformers/trainer.py`` lines 1861-1868) runs, for the last micro-batch of every optimizer
step only (``do_sync_step``)::

    if self.args.max_grad_norm > 0:
        grad_norm = self._clip_grad_norm(model)
    grad_norm = self._get_grad_norm(model, grad_norm)
    self.control = self.callback_handler.on_pre_optimizer_step(self.args, self.state, self.control)
    self.optimizer.step()

so ``on_pre_optimizer_step`` runs after clipping and before the step, once per optimizer step
whatever ``gradient_accumulation_steps`` is: exactly where the reference SORSA trainer adds its
regularizer. (``TrainerCallback.on_pre_optimizer_step`` documents the same contract: "before the
optimizer step but after gradient clipping"; transformers 4.45 and 4.46 call it at the same
point.) The gradients are unscaled there under fp16: both ``_clip_grad_norm`` and
``_get_grad_norm`` go through ``accelerator.clip_grad_norm_``, which unscales them first.
DeepSpeed keeps the gradients in its own partitioned buffers and steps inside its engine, so the
callback refuses to run under it.
"""

from __future__ import annotations

from transformers import TrainerCallback
from transformers.trainer_callback import CallbackHandler

from sorsa_kernels.nn.model import apply_ortho_grad_
from sorsa_kernels.ops._validate import check_number
from sorsa_kernels.ops.ortho import FORMS

__all__ = ["OrthoRegCallback"]


class OrthoRegCallback(TrainerCallback):
    """Adds ``(gamma / peak_lr) · ∇ ortho_reg(form)`` of every SORSA-mode layer's U and Vt into
    their ``.grad`` after gradient clipping and before ``optimizer.step()``, once per optimizer
    step, as the reference SORSA trainer does (see :func:`sorsa_kernels.apply_ortho_grad_`)::

        trainer = Trainer(model, args, train_dataset=data, callbacks=[OrthoRegCallback(gamma=4e-4)])

    Args:
        gamma: the regularizer's weight γ (``>= 0``).
        peak_lr: the peak learning rate that divides γ; ``None`` (default) takes
            ``args.learning_rate``, as the reference does. ``1.0`` makes γ a plain coefficient.
        form: ``"official"`` (default) or ``"squared"``.
        backend: backend of the regularizer's kernels.

    Attributes:
        last_value: the regularizer's value at the latest step (a 0-dim tensor), or ``None``
            before the first step.
    """

    def __init__(self, gamma: float, peak_lr: float | None = None, form: str = "official", backend: str = "auto"):
        if not hasattr(CallbackHandler, "on_pre_optimizer_step"):
            raise RuntimeError(
                "OrthoRegCallback needs the Trainer's on_pre_optimizer_step event, which this version of "
                "transformers lacks; upgrade transformers, or call sorsa_kernels.apply_ortho_grad_ in your loop"
            )
        self.gamma = check_number("gamma", gamma, minimum=0.0)
        self.peak_lr = None if peak_lr is None else check_number("peak_lr", peak_lr)
        if form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}, got {form!r}")
        self.form, self.backend = form, backend
        self.last_value = None

    def on_train_begin(self, args, state, control, **kwargs):
        if getattr(args, "deepspeed", None):
            raise RuntimeError(
                "OrthoRegCallback does not support DeepSpeed (its gradients live in the engine's buffers)"
            )

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        peak_lr = args.learning_rate if self.peak_lr is None else self.peak_lr
        self.last_value = apply_ortho_grad_(model, self.gamma, peak_lr, form=self.form, backend=self.backend)
