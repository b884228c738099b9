"""The training step of this checkout against another copy of the package, paired on one GPU.

``python bench/compare_step.py OTHER_ROOT [--out FILE] [--shapes M,IN,OUT,R ...]``, from the
repository root, where OTHER_ROOT holds another version's ``sorsa_kernels`` (``git worktree add
/tmp/old HEAD~1``): for each shape (SHAPES unless given), one layer's step (bench/layer_step.py:
sorsa_linear forward + backward beside ``F.linear`` forward + dx), each timed with
``triton.testing.do_bench`` (median), and the extra peak memory over the dense step, in one
subprocess per package, alternating for a few rounds. Prints one line per shape, round and
package, then the median ratio of this checkout's step to the other's.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

SHAPES = [(16384, 4096, 11008, 128), (16384, 11008, 4096, 128), (16384, 4096, 4096, 128), (16384, 4096, 14336, 16),
          (4096, 4096, 11008, 64), (4096, 4096, 4096, 128)]  # fmt: skip
ROUNDS = 3
SHAPES_ENV = "COMPARE_STEP_SHAPES"  # how the parent hands ``--shapes`` to its children


def measure() -> None:
    """Child: time every shape with the sorsa_kernels on sys.path; one JSON line per shape."""
    from layer_step import layer_steps

    import sorsa_kernels as sk
    from sorsa_kernels.benchmark.common import median_ms, peak_memory_mb

    for shape in json.loads(os.environ.get(SHAPES_ENV, json.dumps(SHAPES))):
        row = {"shape": list(shape), "root": str(Path(sk.__file__).parents[1])}
        for name, step in layer_steps(*shape).items():
            step()  # tunes and compiles
            row[f"{name} peak MB"] = peak_memory_mb(step)
            row[f"{name} ms"] = median_ms(step)
        print(json.dumps(row), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("other", type=Path, help="root of the other copy (holds its sorsa_kernels/)")
    parser.add_argument("--out", type=Path, help="also write every line here")
    parser.add_argument("--shapes", nargs="+", metavar="M,IN,OUT,R", help="these shapes instead of SHAPES")
    args = parser.parse_args()
    shapes = [tuple(int(n) for n in text.split(",")) for text in args.shapes] if args.shapes else SHAPES
    roots = {"this": Path(__file__).resolve().parents[1], "other": args.other.resolve()}
    step_ms: dict[tuple, float] = {}  # (round, package, shape) -> ms
    lines = []
    for round_ in range(ROUNDS):
        for name, root in roots.items():
            env = dict(os.environ, PYTHONPATH=str(root), **{SHAPES_ENV: json.dumps(shapes)})
            result = subprocess.run([sys.executable, __file__, "--child"], env=env, capture_output=True, text=True,
                                    cwd=root, check=True)  # fmt: skip
            for line in result.stdout.splitlines():
                row = json.loads(line)
                rows, in_features, out_features, rank = shape = tuple(row["shape"])
                step_ms[round_, name, shape] = row["ours ms"]
                assert Path(row["root"]) == root, f"the child imported {row['root']}, not {root}"
                text = (f"round {round_} {name:>5} M={rows:<5} {in_features:>5}->{out_features:<5} r={rank:<3} "
                        f"ours {row['ours ms']:.3f} ms, dense {row['dense ms']:.3f} ms ({row['ours ms'] / row['dense ms']:.3f}x), "
                        f"extra peak {row['ours peak MB'] - row['dense peak MB']:.1f} MB")  # fmt: skip
                print(text, flush=True)
                lines.append(text)
    lines.append("step time of this checkout / the other's, per shape: median (each round)")
    for shape in shapes:
        paired = [step_ms[r, "this", tuple(shape)] / step_ms[r, "other", tuple(shape)] for r in range(ROUNDS)]
        rows, in_features, out_features, rank = shape
        lines.append(f"  M={rows} {in_features}->{out_features} r={rank}: {statistics.median(paired):.3f} "
                     f"({', '.join(f'{v:.3f}' for v in paired)})")  # fmt: skip
    print("\n".join(lines[-len(shapes) - 1 :]))
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    measure() if sys.argv[1:] == ["--child"] else main()
