"""Turn the raw results under bench/results/ into README.md's tables and plots.

    python bench/report.py            # rewrites README.md between its <!-- bench:NAME --> markers

Each table comes from the newest GPU result file of its suite and names the file, the device,
the versions and the date it was measured on. Nothing here measures anything.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
README = BENCH.parent / "README.md"


def gpu_results(suite: str) -> list[tuple[str, Path, dict]]:
    """``(date, path, data)`` of every result file of ``suite`` measured on a GPU, oldest first."""
    found = []
    for path in RESULTS.glob(f"{suite}-*.json"):
        data = json.loads(path.read_text())
        if data.get("suite") == suite and not data["environment"]["device"].startswith("cpu"):
            found.append((data["environment"]["date"], path, data))
    return sorted(found, key=lambda item: item[0])


def newest(suite: str) -> tuple[Path, dict] | None:
    """The most recent result file of ``suite`` measured on a GPU."""
    found = gpu_results(suite)
    return found[-1][1:] if found else None


def provenance(path: Path, data: dict) -> str:
    env = data["environment"]
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
    return f"*{env['device']}, {versions}, CUDA {env['cuda']}, {env['date'][:10]}; raw: `bench/results/{path.name}`*"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def ratio(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}×"


def judged(value: float | None, target: float) -> str:
    """The ratio with ✓ where it meets ``target``, ✗ where not."""
    return "–" if value is None else f"{ratio(value)} {'✓' if value <= target else '✗'}"


def shape(row: dict) -> str:
    return f"{row['in_features']}→{row['out_features']}"


# The caching allocator rounds every block up to 512 bytes: the three adapter gradients may
# occupy up to that much more than their sizes.
ALLOCATOR_SLACK_MB = 3 * 512 / 2**20


def render_linear_training(path: Path, data: dict) -> str:
    rows = [r for r in data["rows"] if r.get("mode") == "train"]
    body = []
    for r in rows:
        target = 1.05 * r["floor"]
        if r.get("extra_peak_mb") is None:
            extra = "–"
        else:
            net = r["extra_peak_mb"] - r["adapter_grads_mb"]
            fits = "✓" if net <= r["extra_peak_budget_mb"] + ALLOCATOR_SLACK_MB else "✗"
            extra = f"{r['extra_peak_mb']:.1f} ({net:.1f}) / {r['extra_peak_budget_mb']:.1f} {fits}"
        graphed = f"{r['dense_graph_ms']:.3f}" if "dense_graph_ms" in r else "–"
        body.append([
            str(r["tokens"]), shape(r), str(r["rank"]), f"{target:.3f}×", f"{r['dense_ms']:.3f}",
            judged(r["ours_ratio"], target), ratio(r.get("peft_lora_ratio")), ratio(r.get("naive_ratio")),
            ratio(r.get("reference_ratio")), graphed, judged(r.get("ours_graph_ratio"), target),
            ratio(r.get("peft_lora_graph_ratio")), ratio(r.get("naive_graph_ratio")), extra,
        ])
    header = ["M", "in→out", "r", "target 1.05·floor", "dense ms", "ours", "PEFT LoRA", "naive", "reference SORSA",
              "dense ms (graph)", "ours (graph)", "PEFT LoRA (graph)", "naive (graph)",
              "extra peak MB (less adapter grads) / budget"]
    return provenance(path, data) + "\n\n" + markdown_table(header, body)


def render_linear_inference(path: Path, data: dict) -> str:
    rows = [r for r in data["rows"] if r.get("mode") == "infer"]
    body = []
    for r in rows:
        decode = r["tokens"] <= 64
        target = 1.2 if decode else 1.05 * r["floor"]
        graphed = [f"{r['dense_graph_ms'] * 1000:.1f}", f"{r['ours_graph_ms'] * 1000:.1f}"] if "ours_graph_ms" in r else ["–"] * 2
        body.append([str(r["tokens"]), shape(r), str(r["rank"]), f"{target:.3f}×", f"{r['dense_ms'] * 1000:.1f}",
                     f"{r['ours_ms'] * 1000:.1f}", judged(r["ours_ratio"], target), *graphed,
                     judged(r.get("ours_graph_ratio"), target)])
    header = ["M", "in→out", "r", "target", "dense µs", "ours µs", "ratio", "dense µs (graph)", "ours µs (graph)",
              "ratio (graph)"]
    return provenance(path, data) + "\n\n" + markdown_table(header, body)


def plot_linear(path: Path, data: dict) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in data["rows"] if r.get("mode") == "train" and r["tokens"] == 4096]
    peers = [("ours", "sorsa-kernels"), ("peft_lora", "PEFT LoRA"), ("naive", "naive SORSA"),
             ("reference", "reference SORSA")]
    fig, ax = plt.subplots(figsize=(12, 4))
    width = 0.8 / len(peers)
    for i, (key, label) in enumerate(peers):
        values = [r.get(f"{key}_ratio") or 0 for r in rows]
        ax.bar([x + i * width for x in range(len(rows))], values, width, label=label)
    ax.scatter([x + 0.4 - width / 2 for x in range(len(rows))], [r["floor"] for r in rows], marker="_", s=400,
               color="black", label="FLOP floor", zorder=3)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(rows))],
                  [f"{shape(r)}\nr={r['rank']}" for r in rows], fontsize=7)
    ax.axhline(1.0, color="grey", linewidth=0.5)
    ax.set_ylabel("fwd+bwd time / frozen GEMM")
    ax.set_title(f"Adapter linear, M=4096 tokens, bf16, {data['environment']['device']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    image = BENCH / "linear.png"
    fig.savefig(image, dpi=110)
    return f"![adapter linear vs peers](bench/{image.name})"


def same_day_runs(suite: str, data: dict) -> list[tuple[Path, dict]]:
    """``(path, data)`` of every GPU result of ``suite`` measured on the day of ``data``, oldest
    first (runs of one configuration vary: all are shown, numbered from 1)."""
    day = data["environment"]["date"][:10]
    return [(p, d) for date, p, d in gpu_results(suite) if date[:10] == day]


def run_sources(runs: list[tuple[Path, dict]]) -> str:
    """One provenance line per numbered run of :func:`same_day_runs`."""
    return "\n".join(f"run {number}: {provenance(p, d)}" for number, (p, d) in enumerate(runs, 1))


def render_ortho(path: Path, data: dict) -> str:
    """Every run of the newest run's day."""
    runs = same_day_runs("ortho", data)
    header = ["run", "adapter set", "matrices", "ours ms (grad_ path)", "Python loop ms", "speedup", "bytes floor ms",
              "ours / floor", "host ms", "rel. error vs float64"]
    body = [[str(number), r["set"], str(r["n"]), f"{r['ms_grad_']:.3f}", f"{r['ms_loop']:.1f}", f"{r['speedup']:.0f}×",
             f"{r['floor_ms']:.3f}", f"{r['ours/floor']:.2f}", f"{r['host_ms']:.3f}", f"{r['rel_err']:.1e}"]
            for number, (_, run) in enumerate(runs, 1) for r in run["rows"]]
    return run_sources(runs) + "\n\n" + markdown_table(header, body)


def render_init(path: Path, data: dict) -> str:
    header = ["method", "seconds", "excess residual error", "max σ error", "extra GPU MB", "note"]
    shown = [r for r in data["rows"] if not r["method"].startswith(("products:", "small ", "residual write:", "build "))]

    def number(value, spec):
        return "–" if value is None else format(value, spec)

    body = [[r["method"], number(r["seconds"], ".3f"), number(r["excess_max"], ".1e"), number(r["sigma_error_max"], ".1e"),
             number(r["peak_extra_mb"], ".0f"), r["note"]] for r in shown]
    return provenance(path, data) + "\n\n" + markdown_table(header, body)


MODEL_PEERS = [("peft_lora", "PEFT LoRA"), ("peft_lora_fused", "PEFT LoRA + accelerate_peft"),
               ("sorsa", "SORSA (ours)"), ("sorsa_reference", "reference SORSA")]


def render_model(path: Path, data: dict) -> str:
    """Every run of the newest run's day, as for the regularizer."""
    runs = same_day_runs("model", data)
    body = []
    for number, (_, run) in enumerate(runs, 1):
        for r in run["rows"]:
            frozen_peak = r["frozen_peak_mb"]
            losses = [r[f"{key}_loss"] for key in ("frozen", *(k for k, _ in MODEL_PEERS)) if f"{key}_loss" in r]
            timed = [f"{r[f'{key}_ms']:.1f} ({ratio(r[f'{key}_ratio'])})" if f"{key}_ms" in r else "–"
                     for key, _ in MODEL_PEERS]  # fmt: skip
            extra = [f"+{(r[f'{key}_peak_mb'] - frozen_peak) / 1024:.2f}" if f"{key}_peak_mb" in r else "–"
                     for key, _ in MODEL_PEERS]  # fmt: skip
            body.append([str(number), str(r["tokens"]), str(r["rank"]), f"{r['frozen_ms']:.1f}", *timed,
                         f"{r['floor_projections']:.3f}×", f"{frozen_peak / 1024:.2f}", *extra,
                         f"{max(losses) - min(losses):.1e}"])  # fmt: skip
    header = ["run", "tokens", "r", "frozen ms", *(f"{label} ms" for _, label in MODEL_PEERS), "projections' floor",
              "frozen peak GiB", *(f"{label} peak GiB over frozen" for _, label in MODEL_PEERS),
              "first-loss spread"]
    model = data["model"]
    described = (f"{model['num_hidden_layers']} layers of hidden {model['hidden_size']}, "
                 f"MLP {model['intermediate_size']}, vocabulary {model['vocab_size']}, "
                 f"sequences of {model['sequence']}")
    return f"{described}; {run_sources(runs)}\n\n" + markdown_table(header, body)


SECTIONS = {
    "linear-train": ("linear", [render_linear_training]),
    "linear-plot": ("linear", [plot_linear]),
    "linear-infer": ("linear", [render_linear_inference]),
    "ortho": ("ortho", [render_ortho]),
    "init": ("init", [render_init]),
    "model": ("model", [render_model]),
}


def update_readme(readme: Path) -> list[str]:
    text = readme.read_text()
    updated = []
    for name, (suite, renderers) in SECTIONS.items():
        pattern = re.compile(rf"(<!-- bench:{name} -->\n).*?(\n<!-- /bench:{name} -->)", re.S)
        if not pattern.search(text):
            continue
        found = newest(suite)
        block = "*not measured yet*" if found is None else "\n\n".join(render(*found) for render in renderers)
        text = pattern.sub(lambda m: m.group(1) + block + m.group(2), text)
        updated.append(name)
    readme.write_text(text)
    return updated


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readme", type=Path, default=README)
    print("updated:", ", ".join(update_readme(parser.parse_args().readme)) or "nothing")
