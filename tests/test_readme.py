"""The python snippets of README.md's "Use it in your trainer" section run as they stand."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "## Use it in your trainer"


def trainer_snippets() -> list[str]:
    text = README.read_text()
    assert SECTION in text, f"README.md lacks the section {SECTION!r}"
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^```python\n(.*?)^```$", section, re.MULTILINE | re.DOTALL)


def test_section_has_the_three_routes():
    snippets = trainer_snippets()
    assert len(snippets) == 3
    for snippet, api in zip(snippets, ["OrthoRegCallback", "export_peft_lora", "accelerate_peft"]):
        assert api in snippet


@pytest.mark.parametrize("index", range(3), ids=["trainer", "peft-export", "accelerate-peft"])
def test_snippet_runs(index, tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    monkeypatch.chdir(tmp_path)  # the snippets write "out", "base", "sorsa-adapter"
    code = trainer_snippets()[index]
    exec(compile(code, f"README.md snippet {index + 1}", "exec"), {"__name__": "__readme__"})


def test_api_example_runs():
    """The example right under README.md's opening commands."""
    text = README.read_text().split("\n## ", 1)[0]
    (example,) = re.findall(r"^```python\n(.*?)^```$", text, re.MULTILINE | re.DOTALL)
    exec(compile(example, "README.md API example", "exec"), {"__name__": "__readme__"})
