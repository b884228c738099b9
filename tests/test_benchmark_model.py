"""The model suite (``sorsa-kernels bench --suite model``) on its CPU configuration."""

import pytest
import torch

from sorsa_kernels.benchmark import model


def test_every_candidate_starts_from_the_frozen_model_and_is_timed():
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    row = model.measure(model.CPU_MODEL, 32, 8, torch.device("cpu"))
    for name in model.CANDIDATES:
        # LoRA's B is zero and SORSA's residual plus adapter is the weight: one function at the start.
        assert row[f"{name}_loss"] == pytest.approx(row["frozen_loss"], abs=1e-4), name
        assert len(row[f"{name}_rounds_ms"]) == 5 and min(row[f"{name}_rounds_ms"]) > 0, name
        if name != "frozen":
            assert row[f"{name}_ratio"] > 0, name
