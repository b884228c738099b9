"""The ``sorsa-kernels`` command: ``info``, ``bench`` and ``demo``."""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata

import torch

import sorsa_kernels
from sorsa_kernels.backends import IMPLEMENTATIONS, available_backends

SUITES = {
    "linear": "sorsa_kernels.benchmark.linear",
    "ortho": "sorsa_kernels.benchmark.ortho",
    "init": "sorsa_kernels.benchmark.init",
    "model": "sorsa_kernels.benchmark.model",
}


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def info(args) -> None:
    """Versions, the device, and which backend serves which op (and why not)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"sorsa-kernels {sorsa_kernels.__version__}")
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}), triton {_version('triton')}")
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu (no CUDA device)'}")
    print("backends:")
    for backend, reason in available_backends(device).items():
        ops = [op for op, impls in IMPLEMENTATIONS.items() if backend in impls]
        state = "available" if reason is None else f"unavailable: {reason}"
        print(f"  {backend:<7} {state}; implements {', '.join(ops) or 'no op yet'}")


def bench(args) -> None:
    """Run benchmark suites; on a machine without a CUDA device, a small CPU configuration."""
    quick = args.quick or not torch.cuda.is_available()
    if quick:
        print("No CUDA device (or --quick): running the small CPU configuration; the GPU numbers")
        print("in README.md come from the full configuration on an H100.")
    for name in SUITES if args.suite == "all" else [args.suite]:
        print(f"== {name} ==")
        importlib.import_module(SUITES[name]).main(quick=quick, out_dir=args.out)


def demo(args) -> None:
    """Fine-tune a tiny Llama-architecture model with SORSA and print the loss falling."""
    from sorsa_kernels.demo import run_demo

    run_demo(args.steps, seed=args.seed)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="sorsa-kernels", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="versions, device and available backends").set_defaults(run=info)
    bench_parser = commands.add_parser("bench", help="run the benchmark suites (small CPU config without a GPU)")
    bench_parser.add_argument("--suite", choices=["all", *SUITES], default="all")
    bench_parser.add_argument("--quick", action="store_true", help="the small configuration even on a GPU")
    bench_parser.add_argument("--out", default="bench/results", help="directory for the JSON results")
    bench_parser.set_defaults(run=bench)
    demo_parser = commands.add_parser("demo", help="fine-tune a tiny Llama with SORSA and watch the loss fall")
    demo_parser.add_argument("--steps", type=int, default=40, help="optimizer steps (default 40)")
    demo_parser.add_argument("--seed", type=int, default=0)
    demo_parser.set_defaults(run=demo)
    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
