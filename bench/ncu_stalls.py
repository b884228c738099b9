"""Summarize an ``ncu --page source --csv --print-source sass`` export: warp-stall samples by
opcode and the instructions with the most samples."""

import collections
import csv
import sys


def main(path: str):
    with open(path, newline="") as f:
        lines = f.read().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(('"#"', '"Address"')))
    rows = list(csv.DictReader(lines[start:]))
    sample_column = next(c for c in rows[0] if c.startswith("Warp Stall Sampling (All"))
    source_column = "Source"

    def number(value):
        try:
            return float(value.replace(",", ""))
        except ValueError:
            return 0.0

    by_opcode = collections.Counter()
    total = 0.0
    for row in rows:
        samples = number(row[sample_column])
        tokens = row[source_column].split()
        if tokens and tokens[0].startswith("@"):
            tokens = tokens[1:]
        opcode = tokens[0].split(".")[0] if tokens else "?"
        by_opcode[opcode] += samples
        total += samples
    print(f"total samples {total:.0f}")
    for opcode, samples in by_opcode.most_common(25):
        print(f"  {opcode:12s} {100 * samples / total:5.1f} %")
    print("top instructions:")
    ranked = sorted(rows, key=lambda row: -number(row[sample_column]))[:40]
    for row in ranked:
        share = 100 * number(row[sample_column]) / total
        print(f"  {share:5.1f} %  {row.get('Address', row.get('#'))}  {row[source_column][:90]}")


if __name__ == "__main__":
    main(sys.argv[1])
