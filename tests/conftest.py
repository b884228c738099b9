import os
import random
import zlib

import pytest
import torch


def _fix_interpreter_scalar_index():
    """Triton <= 3.6's interpreter turns a runtime scalar into a Python int with
    ``int(array_of_shape_1)``, which NumPy >= 2.4 rejects, so every kernel loop with a runtime
    bound fails under TRITON_INTERPRET=1. Convert through ``.item()`` instead (as newer
    Triton does, with ``squeeze``)."""
    import numpy as np

    try:
        int(np.ones(1))
        return
    except TypeError:
        pass
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    original = interpreter._patch_lang_tensor

    def patch(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    interpreter._patch_lang_tensor = patch


if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    _fix_interpreter_scalar_index()

# Fresh inputs on every run; SORSA_TEST_SEED=<n> replays a run.
RUN_SEED = int(os.environ.get("SORSA_TEST_SEED", random.randrange(2**31)))


def pytest_report_header(config):
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    interpret = os.environ.get("TRITON_INTERPRET", "0")
    return f"sorsa-kernels tests on {device}; TRITON_INTERPRET={interpret}; SORSA_TEST_SEED={RUN_SEED}"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="gpu test: no CUDA device on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed(request):
    torch.manual_seed(RUN_SEED ^ zlib.crc32(request.node.nodeid.encode()))
