import os
import random
import zlib

import pytest
import torch

# Tests check results, not speed: Triton kernels take the first launch configuration each shape
# class keeps instead of autotuning every shape (bench/ tunes; a test may set it back to "1").
os.environ.setdefault("SORSA_KERNELS_AUTOTUNE", "0")

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
