"""Merge benchmark results from several GPUs (or commits) into one table and one plot.

    python benchmarks/compare.py results/bench_nvidia-h100*.json results/bench_nvidia-h200*.json \
        --out benchmarks/results --name across-gpus

One column per run (device and commit) for every (model, dtype, provider): achieved
GB/s and its fraction of that run's own copy bandwidth, so devices with different
memory systems compare on the fraction.  Writes ``<name>.md`` and ``<name>.png``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import report


def load(paths: list[str]) -> list[dict]:
    """The results, each with a short unique ``label`` (device @ commit)."""
    runs = []
    for path in paths:
        with open(path) as f:
            result = json.load(f)
        if result.get("schema") != report.SCHEMA:
            raise SystemExit(f"{path}: not an ema_fused benchmark result ({report.SCHEMA})")
        m = result["machine"]
        dirty = "+" if m.get("git_dirty") else ""  # run from uncommitted changes
        result["label"] = f"{m['device_name']} @ {(m['git_commit'] or '?')[:7]}{dirty}"
        runs.append(result)
    seen: dict[str, int] = {}
    for r in runs:  # the same device and commit twice: tell them apart by date
        seen[r["label"]] = seen.get(r["label"], 0) + 1
    for r in runs:
        if seen[r["label"]] > 1:
            r["label"] += f" {r['machine']['date'][:16]}"
    return runs


def _cases(runs: list[dict]) -> list[tuple[str, str]]:
    keys: list[tuple[str, str]] = []
    for r in runs:
        keys += [k for k in ((c["model"], c["dtype"]) for c in r["cases"]) if k not in keys]
    return keys


def _find(run: dict, key: tuple[str, str]):
    return next((c for c in run["cases"] if (c["model"], c["dtype"]) == key), None)


def _providers(runs: list[dict], key) -> list[str]:
    names: list[str] = []
    for r in runs:
        c = _find(r, key)
        names += [n for n in (c["results"] if c else {}) if n not in names]
    return names


def markdown(runs: list[dict]) -> str:
    lines = ["## ema_fused across runs", "", "| run | date | torch | CUDA | Triton | commit |",
             "|---|---|---|---|---|---|"]
    for r in runs:
        m = r["machine"]
        lines.append(f"| {r['label']} | {m['date'][:10]} | {m['torch']} | {m['cuda'] or '-'} | "
                     f"{m['triton'] or '-'} | {(m['git_commit'] or '?')[:10]} |")
    lines += ["", "Cells: GB/s (fraction of that run's copy bandwidth); **bold shadows**: the "
              "provider keeps shadows in the model dtype (6 B/el instead of 10).", ""]
    for key in _cases(runs):
        lines += [f"### {key[0]}, {key[1]} params", "",
                  "| provider | " + " | ".join(r["label"] for r in runs) + " |",
                  "|---|" + "---:|" * len(runs)]
        for name in _providers(runs, key):
            cells, low = [], False
            for r in runs:
                row = (_find(r, key) or {"results": {}})["results"].get(name)
                if row is None or row["gb_per_s"] is None:
                    cells.append("-")
                    continue
                low |= row["shadow_dtype"] not in (None, "float32")
                frac = row.get("frac_of_copy")
                cells.append(f"{row['gb_per_s']:.1f}" + ("" if frac is None else f" ({frac:.0%})"))
            lines.append(f"| {'**' + name + '**' if low else name} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(runs: list[dict], path: str):
    """One panel per (model, dtype): bars per provider and run, each run's copy as a line."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        print(f"no plot: {exc}")
        return None
    keys = _cases(runs)
    ncols = min(3, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6 * ncols, 3.8 * nrows), squeeze=False)
    colors = [plt.get_cmap("tab10")(i % 10) for i in range(len(runs))]
    for ax, key in zip(axes.flat, keys):
        names = [n for n in _providers(runs, key) if not n.startswith("copy")]
        width = 0.8 / len(runs)
        for j, (r, color) in enumerate(zip(runs, colors)):
            case = _find(r, key)
            if not case:
                continue
            for i, name in enumerate(names):
                row = case["results"].get(name)
                if row and row["gb_per_s"]:
                    ax.bar(i - 0.4 + (j + 0.5) * width, row["gb_per_s"], width, color=color,
                           label=r["label"] if i == 0 else None)
            copy = next((x for x in case["results"].values() if x["kind"] == "roofline"), None)
            if copy:
                ax.axhline(copy["gb_per_s"], color=color, linestyle="--", linewidth=1)
        ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=7)
        ax.set_title(f"{key[0]}, {key[1]} params (dashed: copy)", fontsize=9)
        ax.set_ylabel("GB/s")
    for ax in list(axes.flat)[len(keys):]:
        ax.set_visible(False)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=min(3, len(labels)), fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="+", help="JSON files written by benchmarks/run.py")
    ap.add_argument("--out", default=".", help="folder for <name>.md and <name>.png")
    ap.add_argument("--name", default="compare")
    args = ap.parse_args(argv)
    runs = load(args.results)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, args.name)
    table = markdown(runs)
    with open(stem + ".md", "w") as f:
        f.write(table)
    print(table)
    print(f"wrote {stem}.md")
    if plot(runs, stem + ".png"):
        print(f"wrote {stem}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
