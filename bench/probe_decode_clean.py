"""What keeping the decode forward's workspace zeroed costs on the device: the op from CUDA graphs
at five decode shapes (r = 128) against ``F.linear``, tuned and with its best candidate tile, as
it is and (``--dirty``) without the product's count of finished tiles, the last of which zeroes t
(a copy of the package edited so; t then keeps what earlier calls added, so the values are
wrong: a timing bound only, every launch still doing its whole work).

From the repository root on a GPU machine (``PYTHONPATH`` naming another revision's package
times that one)::

    PYTHONPATH=.:bench python bench/probe_decode_clean.py [--dirty]
"""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from host_linear import layer

import sorsa_kernels as sk
from sorsa_kernels.triton import linear
from sorsa_kernels.triton.common import graphed

SHAPES = [(1, 4096, 1024), (8, 4096, 1024), (64, 4096, 1024), (64, 4096, 4096), (1, 4096, 4096)]
# The product's count of finished tiles, the last of which zeroes t (see _few_rows_forward_kernel).
CLEANING = '''        if tl.atomic_add(finished, 1, sem="acq_rel") == tiles - 1:  # every tile has read t: zero it
'''
LEFT_DIRTY = '''        if tiles < 0:  # (probe: t left dirty)
'''


def run_dirty_copy():
    """This script again, on a copy of the package whose product leaves t dirty."""
    package = Path(sk.__file__).parent
    with tempfile.TemporaryDirectory() as root:
        shutil.copytree(package, Path(root, "sorsa_kernels"), ignore=shutil.ignore_patterns("__pycache__"))
        source = Path(root, "sorsa_kernels/triton/linear.py")
        text = source.read_text()
        assert text.count(CLEANING) == 1, "the product's cleaning is not where this probe expects it"
        source.write_text(text.replace(CLEANING, LEFT_DIRTY))
        bench = str(Path(__file__).parent)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, bench]))
        subprocess.run([sys.executable, __file__, "dirty"], env=env, check=True)


def main(label: str):
    print(f"{torch.cuda.get_device_name()}, package {Path(sk.__file__).parent}")
    for rows, in_features, out_features in SHAPES:
        x, weight, U, S, Vt, _ = layer(rows, in_features, out_features, 128)
        x = x.detach()
        y = torch.empty(rows, out_features, device=x.device, dtype=x.dtype)
        with torch.no_grad():
            dense = triton.testing.do_bench(graphed(lambda: F.linear(x, weight)), rep=200)
            tuned = triton.testing.do_bench(graphed(lambda: sk.sorsa_linear(x, weight, U, S, Vt, None, 0.5)), rep=200)
            tiles = []
            for config in linear.few_rows_candidates(x, weight, y):
                run = graphed(lambda c=config: linear.few_rows_forward(x, weight, U, S, Vt, None, 0.5, y, c))
                tiles.append((triton.testing.do_bench(run, rep=100), str(config)))
        best, config = min(tiles)
        print(f"{label:6s} {rows:2d}x{in_features}->{out_features}: graph us dense {dense * 1e3:5.1f} "
              f"tuned {tuned * 1e3:5.1f} best tile {best * 1e3:5.1f} [{config}]", flush=True)  # fmt: skip


if __name__ == "__main__":
    if "--dirty" in sys.argv[1:]:
        run_dirty_copy()
    else:
        main(sys.argv[1] if len(sys.argv) > 1 else "as is")
