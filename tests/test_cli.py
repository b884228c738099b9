"""The ``sorsa-kernels`` console script: ``--help``, ``info`` and ``demo``."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

import sorsa_kernels
from sorsa_kernels.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_console_script_is_declared():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["sorsa-kernels"] == "sorsa_kernels.cli:main"


def test_help_lists_the_subcommands():
    result = subprocess.run(
        [sys.executable, "-m", "sorsa_kernels.cli", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "{info,bench,demo}" in result.stdout
    for command in ("info", "bench", "demo"):
        assert re.search(rf"^\s+{command}\s+\S", result.stdout, re.MULTILINE), command


def test_info_reports_versions_and_backends(capsys):
    main(["info"])
    out = capsys.readouterr().out
    assert f"sorsa-kernels {sorsa_kernels.__version__}" in out
    assert "torch " in out and "backends:" in out
    assert re.search(r"^\s+torch\s+available", out, re.MULTILINE)
    assert re.search(r"^\s+cuda\s+(available|unavailable: \S)", out, re.MULTILINE)


def test_demo_prints_the_loss_falling_with_a_progress_bar(capsys):
    pytest.importorskip("transformers")
    main(["demo", "--steps", "12"])
    captured = capsys.readouterr()
    first, last = map(float, re.search(r"loss (\d+\.\d+) -> (\d+\.\d+)", captured.out).groups())
    assert last < first - 0.2, captured.out
    assert "sorsa_linear backend:" in captured.out
    assert "fine-tuning" in captured.err and "12/12" in captured.err, "the tqdm bar"
