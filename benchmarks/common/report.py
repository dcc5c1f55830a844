"""What a run leaves behind: the machine description, the JSON, the Markdown table, the plot."""
from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Optional

import torch

SCHEMA = "ema_fused-bench/1"
MiB = 2**20
PEER_PACKAGES = ("timm", "torch-ema", "ema-pytorch", "matplotlib", "pytest-benchmark")


def _version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> Optional[str]:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return re.search(r"model name\s*:\s*(.*)", f.read()).group(1).strip()
    except (OSError, AttributeError):
        return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict:
    """Device, versions, commit and date: everything needed to compare runs later."""
    import ema_fused
    status = _git("status", "--porcelain", "--untracked-files=no")
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": _git("rev-parse", "HEAD"), "git_dirty": bool(status) if status is not None
        else None, "python": platform.python_version(), "platform": platform.platform(),
        "torch": torch.__version__, "cuda": torch.version.cuda, "triton": _version("triton"),
        "ema_fused": ema_fused.__version__,
        "packages": {d: _version(d) for d in PEER_PACKAGES},
        "cpu": _cpu_name(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "load_avg_start": os.getloadavg(), "device": str(device),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(device_name=props.name, compute_capability=f"{props.major}.{props.minor}",
                    memory_bytes=props.total_memory, multiprocessors=props.multi_processor_count,
                    device_slug=re.sub(r"[^a-z0-9]+", "-", props.name.lower()).strip("-"))
    else:
        try:
            pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            pages = None
        info.update(device_name=f"CPU: {info['cpu']} ({os.cpu_count()} cores)",
                    compute_capability=None, memory_bytes=pages,
                    device_slug=f"cpu-{os.cpu_count()}core")
    return info


# --------------------------------------------------------------------- table
def _fmt(x, spec: str, none: str = "n/a") -> str:
    return none if x is None else format(x, spec)


def _best_ours(case: dict) -> Optional[tuple[str, dict]]:
    ours = [(n, r) for n, r in case["results"].items() if r["kind"] == "ema_fused"]
    return min(ours, key=lambda nr: nr[1]["median_ms"]) if ours else None


def _shadow(row: dict, dtype: str, params: int) -> str:
    if row["shadow_dtype"] is None:
        return "-"
    per = row["bytes_moved"] / params
    short = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(row["shadow_dtype"],
                                                                             row["shadow_dtype"])
    text = f"{short} ({per:.0f} B/el)"
    return text if short == "fp32" else f"**{text}**"


def case_table(case: dict) -> list[str]:
    best = _best_ours(case)
    copy = next((r for r in case["results"].values() if r["kind"] == "roofline"), None)
    head = (f"### {case['model']}, {case['dtype']} params ({case['params'] / 1e6:.1f}M in "
            f"{case['tensors']} tensors; copy {_fmt(copy and copy['gb_per_s'], '.1f')} GB/s; "
            f"{case['schedule']})")
    lines = [head, "", "| provider | shadows | median ms | p20-p80 ms | GB/s | of copy | "
             "ema_fused faster by | CPU ms/call | peak extra MiB | launches | host sync |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name, r in case["results"].items():
        speed = _fmt(r["median_ms"] / best[1]["median_ms"], ".2f") + "x" if best else "n/a"
        launches = r["launches"]["total"] if r.get("launches") else None
        sync = {True: "**yes**", False: "no", None: "n/a"}[r.get("host_sync")]
        mem = r.get("peak_extra_bytes")
        mem = "0" if mem == 0 else _fmt(None if mem is None else mem / MiB, ".1f")
        frac = r.get("frac_of_copy")
        frac = "n/a" if frac is None else f"{100 * frac:.0f}%"
        lines.append(
            f"| {'**' + name + '**' if r['kind'] == 'ema_fused' else name} "
            f"| {_shadow(r, case['dtype'], case['params'])} | {r['median_ms']:.3f} "
            f"| {r['p20_ms']:.3f}-{r['p80_ms']:.3f} | {_fmt(r['gb_per_s'], '.1f')} "
            f"| {frac} | {speed} | {r['cpu_ms']:.3f} | {mem} "
            f"| {_fmt(launches, 'd')} | {sync} |")
    for name, why in case["skipped"].items():
        lines.append(f"| {name} | skipped: {why} | | | | | | | | | |")
    return lines


def speedup_table(cases: list) -> list[str]:
    """Rows: cases; columns: peers; cells: peer median / best ema_fused median."""
    peers: list[str] = []
    for c in cases:
        peers += [n for n, r in c["results"].items() if r["kind"] == "peer" and n not in peers]
    lines = ["| case | ema_fused | " + " | ".join(peers) + " |",
             "|---|---|" + "---:|" * len(peers)]
    for c in cases:
        best = _best_ours(c)
        if not best:
            continue
        cells = [_fmt(c["speedup"][best[0]].get(p), ".2f", "-") for p in peers]
        lines.append(f"| {c['model']} {c['dtype']} | {best[0]} {best[1]['median_ms']:.3f} ms | "
                     + " | ".join(x if x == "-" else x + "x" for x in cells) + " |")
    return lines


def markdown(result: dict) -> str:
    m, cfg = result["machine"], result["config"]
    commit = (m["git_commit"] or "unknown")[:10] + (" (dirty)" if m.get("git_dirty") else "")
    lines = [f"## ema_fused benchmark: {m['device_name']}", "",
             f"{m['date']}, commit {commit}, torch {m['torch']}, CUDA {m['cuda'] or '-'}, "
             f"Triton {m['triton'] or '-'}, ema_fused {m['ema_fused']}. {cfg['timer']}, "
             f"{cfg['warmup']} warm-up + {cfg['repeats']} timed rounds, decay {cfg['decay']}, "
             f"run took {result['elapsed_s']:.0f} s.", "",
             "GB/s counts the bytes an update must move (param read + shadow read + shadow "
             "write); **bold shadows** keep the model dtype: fewer bytes, not FP32 master "
             "shadows. \"ema_fused faster by\": this row's median over the fastest ema_fused "
             "backend's. CPU ms: host process time per call (all threads)."
             + (" On a CPU the copy also reads every destination line before writing it "
                "(write-allocate), so an in-place update can exceed 100% of it."
                if cfg["device"].startswith("cpu") else ""), ""]
    for case in result["cases"]:
        lines += case_table(case) + [""]
    lines += ["### Speed-up of ema_fused against each peer (peer median / ema_fused median)", ""]
    lines += speedup_table(result["cases"]) + [""]
    for name, why in result["skipped_providers"].items():
        lines.append(f"- skipped {name}: {why}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------- plot
def plot(result: dict, path: str) -> Optional[str]:
    """Grouped bars of GB/s per provider per model, one panel per dtype, copy as the limit.

    Returns None (and says why) when matplotlib is missing: the plot is optional.
    """
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        print(f"no plot: {exc}")
        return None
    dtypes = list(dict.fromkeys(c["dtype"] for c in result["cases"]))
    names = [n for n in result["providers"] if result["providers"][n]["kind"] != "roofline"]
    colors = {n: plt.get_cmap("tab10")(i % 10) for i, n in enumerate(names)}
    fig, axes = plt.subplots(len(dtypes), 1, figsize=(12, 1 + 3.2 * len(dtypes)), squeeze=False)
    width = 0.8 / max(1, len(names))
    for ax, dtype in zip(axes[:, 0], dtypes):
        cases = [c for c in result["cases"] if c["dtype"] == dtype]
        for x, case in enumerate(cases):
            for i, name in enumerate(names):
                r = case["results"].get(name)
                if r and r["gb_per_s"]:
                    ax.bar(x - 0.4 + (i + 0.5) * width, r["gb_per_s"], width, color=colors[name],
                           hatch="//" if r["shadow_dtype"] not in (None, "float32") else None)
            copy = next((r for r in case["results"].values() if r["kind"] == "roofline"), None)
            if copy and copy["gb_per_s"]:
                ax.hlines(copy["gb_per_s"], x - 0.45, x + 0.45, colors="black", linestyles="--")
        ax.set_xticks(range(len(cases)), [f"{c['model']} ({c['params'] / 1e6:.0f}M, "
                                          f"{c['tensors']} tensors)" for c in cases])
        ax.set_ylabel("GB/s")
        note = "" if dtype == "fp32" else f"; hatched: shadows kept in {dtype} (6 B/el, not fp32)"
        ax.set_title(f"{dtype} params{note}", fontsize=10)
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    handles = [Patch(color=colors[n], label=n) for n in names]
    handles.append(Line2D([], [], color="black", linestyle="--", label="copy (roofline)"))
    fig.legend(handles=handles, loc="center right", fontsize=8)
    fig.suptitle(f"EMA update, achieved GB/s: {result['machine']['device_name']}")
    fig.tight_layout(rect=(0, 0, 0.8, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------- files
def write(result: dict, out_dir: str, tag: str = "") -> dict:
    """``bench_<device>_<date>[_tag].{json,md,png}`` in ``out_dir``; returns the paths and table."""
    os.makedirs(out_dir, exist_ok=True)
    m = result["machine"]
    stem = os.path.join(out_dir, f"bench_{m['device_slug']}_{m['date'][:10]}"
                                 f"{'_' + tag if tag else ''}")
    table = markdown(result)
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(table)
    return {"json": stem + ".json", "md": stem + ".md", "png": plot(result, stem + ".png"),
            "table": table}


def save_json(result: dict, out_dir: str, name: str, tag: str = "",
              table: Optional[str] = None) -> str:
    """Write ``result`` as ``<name>_<device>_<date>[_tag].json`` in ``out_dir`` (made if
    missing), and ``table`` beside it as ``.md`` when given; print the table and the path;
    return the JSON's path.  The file name carries the device, as the results folder asks."""
    os.makedirs(out_dir, exist_ok=True)
    m = result["machine"]
    stem = os.path.join(out_dir, f"{name}_{m['device_slug']}_{m['date'][:10]}"
                                 f"{'_' + tag if tag else ''}")
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=1)
    if table is not None:
        with open(stem + ".md", "w") as f:
            f.write(table + "\n")
        print(table)
    print(f"\nwrote {stem}.json")
    return stem + ".json"
