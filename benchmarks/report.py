"""Every JSON in benchmarks/results/ -> one markdown report (a table per result file, CPU and GPU in
separate sections) and a bar chart of images/s per loader.

    python -m benchmarks.report                               # writes benchmarks/results/REPORT.md + .png
    python -m benchmarks.report --results DIR --out DIR/REPORT.md

Each table comes from one file, i.e. one run on one machine, and carries its date, machine, load and
command; ratios are the ones computed inside that run, so CPU and GPU figures never meet in a ratio.
Reads this project's layout (`benchmark`, `device_kind`, `results` with `reps`/`median`) and the
layouts of mask_kernel.py (`env`, `results`) and synth_speed.py (`median_pairs_per_s_*`).
"""

from __future__ import annotations

import datetime as dt
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS, fmt, new_parser

ORDER = ("accuracy", "loader", "end_to_end", "train_step", "mask_kernel", "synth_speed")
TITLES = {"accuracy": "Time to accuracy", "loader": "Loaders", "end_to_end": "End to end (training)",
          "train_step": "Train step", "mask_kernel": "Mask kernel",
          "synth_speed": "Synthetic data generation"}  # fmt: skip
PNG_NAME = "loader_images_per_s.png"

Column = tuple[str, str, str]  # key, header, format spec


def python_command(command: str) -> str:
    # mask_kernel.py recorded its sys.argv ("benchmarks/mask_kernel.py ...") before it recorded the command.
    return command if command.startswith("python") else f"python {command}".strip()


def load(path: Path) -> dict[str, Any] | None:
    """A result file in any of the three layouts, normalised to benchmark / device_kind / results."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(data, dict):
        return None
    if "benchmark" in data and "results" in data:
        return data | {"file": path.name}
    if "env" in data and "results" in data:  # mask_kernel.py
        env = data["env"]
        gpu = env.get("device", "cpu") != "cpu"
        return {"benchmark": "mask_kernel", "file": path.name, "date": env.get("date"),
                "device": env["device"] if gpu else f"cpu ({env.get('cpu')}, {env.get('cpu_threads')} threads)",
                "device_kind": "gpu" if gpu else "cpu", "command": python_command(data.get("command", "")),
                "versions": {k: env.get(k) for k in ("python", "torch", "triton")}, "results": data["results"],
                "machine": {"load_average_start": [load] if (load := env.get("load_avg_1min_at_start")) else None},
                "notes": []}  # fmt: skip
    if "median_pairs_per_s_cpu" in data:  # synth_speed.py
        m = data.get("machine", {})
        row = {"median_cpu": data["median_pairs_per_s_cpu"], "median_wall": data["median_pairs_per_s_wall"],
               "n": data.get("config", {}).get("n"), "reps": len(data.get("repetitions", [])),
               **{k.removesuffix("_ms"): v for k, v in data.get("stages_cpu_ms_per_pair", {}).items()}}  # fmt: skip
        return {"benchmark": "synth_speed", "file": path.name, "date": data.get("date"),
                "device": f"cpu ({m.get('cpu')}, 1 pinned core)", "device_kind": "cpu",
                "command": "python -m benchmarks.synth_speed", "versions": data.get("versions", {}),
                "machine": {"load_average_start": m.get("load_average_at_start")}, "results": [row], "notes": []}
    return None


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[Column]) -> str:
    head = "| " + " | ".join(h for _, h, _ in columns) + " |"
    rule = "|" + "|".join("---" if not spec else "---:" for _, _, spec in columns) + "|"
    body = ["| " + " | ".join(fmt(r.get(k), spec) for k, _, spec in columns) + " |" for r in rows]
    return "\n".join([head, rule, *body])


def _spread(r: dict[str, Any]) -> dict[str, Any]:
    return r | {"range": f"{r['min']:.1f}–{r['max']:.1f}" if r.get("min") is not None else None,
                "n_reps": len(r.get("reps", []))}  # fmt: skip


def loader_table(results: list[dict[str, Any]]) -> str:
    cols: list[Column] = [("augment", "augment", ""), ("label", "loader", ""), ("runs_on", "works on", ""),
                          ("median", "images/s (median)", ".1f"), ("range", "min–max", ""), ("n_reps", "reps", ""),
                          ("ratio_vs_torch_w2", "× torch w2", ".2f"), ("ratio_vs_best_torch", "× best torch", ".2f"),
                          ("setup_s", "setup s", ".2f"), ("time_to_first_batch_s", "first batch s", ".2f")]
    return markdown_table([_spread(r) for r in results], cols)


def train_step_table(results: list[dict[str, Any]]) -> str:
    cols: list[Column] = [("width", "width", ""), ("variant", "variant", ""), ("batch", "batch", ""),
                          ("size", "size", ""), ("median", "ms/step (median)", ".2f"),
                          ("images_per_s", "images/s", ".2f"), ("tflops", "TFLOP/s", ".3g"),
                          ("pct_peak", "% of peak", ".1f"), ("vs_ce", "× CE step", ".3f"),
                          ("speedup_vs_off", "× eager", ".2f"), ("compile_s", "compile s", ".1f"),
                          ("peak_mem_gib", "peak GiB", ".2f")]
    return markdown_table(results, cols)


def end_to_end_table(results: list[dict[str, Any]]) -> str:
    rows = [r | {"wait_pct": None if r.get("data_wait_share") is None else 100 * r["data_wait_share"],
                 "n_reps": len(r.get("reps", []))} for r in results]  # fmt: skip
    cols: list[Column] = [("loader", "loader", ""), ("median", "images/s (median)", ".1f"), ("n_reps", "runs", ""),
                          ("ratio_vs_torch", "× torch", ".2f"), ("wait_pct", "data wait %", ".0f"),
                          ("gpu_util", "GPU util %", ".0f"), ("time_to_first_batch_s", "first batch s", ".2f"),
                          ("compile_s", "compile s", ".1f"), ("steady_step_s", "step s", ".3f")]
    return markdown_table(rows, cols)


def mask_kernel_table(results: list[dict[str, Any]]) -> str:
    if results and "median_ms" in results[0]:  # CPU layout
        cols: list[Column] = [("batch", "batch", ""), ("masks", "masks", ""), ("impl", "impl", ""),
                              ("median_ms", "ms (median)", ".3f"), ("gbps", "GB/s", ".2f")]
    else:
        cols = [("palette", "palette", ""), ("batch", "batch", ""), ("masks", "masks", ""), ("impl", "impl", ""),
                ("us", "µs (median)", ".1f"), ("gbps", "GB/s", ".1f"), ("pct_peak", "% of peak", ".1f")]
        results = [r | {"us": r["ms"] * 1e3 if r.get("ms") is not None else None} for r in results]
    ratios = dict.fromkeys(k for r in results for k in r if "_vs_" in k)  # e.g. the `speedup` rows' lut_vs_cdist
    cols += [(k, "× " + k.split("_vs_")[1] + f" ({k.split('_vs_')[0]})", ".0f") for k in ratios]
    return markdown_table(results, cols)


def synth_table(results: list[dict[str, Any]]) -> str:
    cols: list[Column] = [("median_cpu", "pairs/s per core (CPU time)", ".1f"),
                          ("median_wall", "pairs/s (wall)", ".1f"),
                          ("n", "pairs per rep", ""), ("reps", "reps", ""), ("render", "render ms", ".2f"),
                          ("encode", "encode ms", ".2f"), ("write", "write ms", ".2f")]
    return markdown_table(results, cols)


def accuracy_table(results: list[dict[str, Any]]) -> str:
    """Each recipe at the end of the budget and its change in mIoU against the first (the baseline)."""
    base = results[0]["miou"] if results else None
    rows = [r | {"change": ", ".join(f"{k}={v}" for k, v in r.get("overrides", {}).items()) or "—",
                 "delta": None if r is results[0] else r["miou"] - base} for r in results]  # fmt: skip
    cols: list[Column] = [("label", "recipe", ""), ("change", "change", ""), ("pixel_acc", "val pixel acc", ".4f"),
                          ("miou", "val mIoU", ".4f"), ("delta", "Δ mIoU vs first", "+.4f"),
                          ("best_miou", "best mIoU", ".4f"), ("train_seconds", "train s", ".0f"),
                          ("steps", "steps", ""), ("images_per_s", "img/s", ".1f")]
    return markdown_table(rows, cols)


TABLES: dict[str, Callable[[list[dict[str, Any]]], str]] = {
    "accuracy": accuracy_table, "loader": loader_table, "end_to_end": end_to_end_table, "train_step": train_step_table,
    "mask_kernel": mask_kernel_table, "synth_speed": synth_table,
}  # fmt: skip


def section(doc: dict[str, Any]) -> str:
    name = doc["benchmark"]
    v = doc.get("versions") or {}
    keys = ("torch", "torchvision", "dali", "triton", "cuda") if v.get("torch") else ("python", "numpy", "pillow")
    shown = ", ".join(f"{k} {v[k]}" for k in keys if v.get(k))
    m = doc.get("machine") or {}
    load = m.get("load_average_start")
    load_s = f"; load average {load[0]:.2f} at start" if load else ""
    if load and m.get("load_average_end"):
        load_s += f", {m['load_average_end'][0]:.2f} at end"
    lines = [
        f"### {TITLES.get(name, name)} — {doc.get('device')}, {doc.get('date')}",
        "",
        f"`{doc.get('command', '')}` → `{doc['file']}`{load_s}." + (f" {shown}." if shown else ""),
        "",
        TABLES[name](doc["results"]) if name in TABLES else "(no table for this benchmark)",
    ]
    if doc.get("complete") is False:
        lines += ["", "**Incomplete run**: stopped before its end (a time limit); the rows are what it measured."]
    if doc.get("notes"):
        lines += ["", *[f"- {n}" for n in doc["notes"]]]
    return "\n".join(lines) + "\n"


def plot_loaders(docs: list[dict[str, Any]], path: Path) -> bool:
    """One horizontal bar chart per (file, augmentation): median images/s with min–max whiskers.
    CPU and GPU runs get separate panels (and scales)."""
    groups = []
    for doc in docs:
        if doc["benchmark"] != "loader":
            continue
        for aug in dict.fromkeys(r["augment"] for r in doc["results"]):
            groups.append((doc, aug, [r for r in doc["results"] if r["augment"] == aug]))
    if not groups:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(groups), 1, figsize=(8, 0.45 * sum(len(g[2]) for g in groups) + 1.4 * len(groups)),
                             squeeze=False)  # fmt: skip
    for ax, (doc, aug, rows) in zip(axes[:, 0], groups, strict=True):
        labels = [r["label"] for r in rows]
        med = [r["median"] for r in rows]
        err = [[m - r["min"] for m, r in zip(med, rows, strict=True)],
               [r["max"] - m for m, r in zip(med, rows, strict=True)]]
        colors = ["tab:gray" if r["loader"] == "torch" else "tab:green" for r in rows]
        ax.barh(labels, med, xerr=err, color=colors, capsize=3)
        ax.invert_yaxis()
        for y, r in enumerate(rows):  # the label right of the whisker
            ax.text(r["max"], y, f"  {r['median']:.0f}", va="center", fontsize=8)
        ax.set_xlabel("images/s (median; whiskers min–max)")
        ax.set_title(f"{doc['device_kind'].upper()}: {doc['device']}, augment={aug}, {doc.get('date', '')[:10]}",
                     fontsize=9)  # fmt: skip
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def build(results_dir: Path, out: Path, png: Path | None = None) -> str:
    """Write the markdown report (and the loader chart beside it); returns the markdown."""
    png = png or out.parent / PNG_NAME
    files = sorted(p for p in results_dir.glob("*.json"))
    docs = [d for d in (load(p) for p in files) if d is not None]
    skipped = sorted({p.name for p in files} - {d["file"] for d in docs})
    rank = {name: i for i, name in enumerate(ORDER)}
    docs.sort(key=lambda d: (rank.get(d["benchmark"], len(ORDER)), d["file"]))
    has_png = plot_loaders(docs, png)
    now = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    parts = [
        "# Benchmark results",
        "",
        f"Generated {now} by `python -m benchmarks.report` from {len(docs)} result files in "
        f"`{results_dir.name}/`. Each table is one run on one machine (date, machine, load and command in its "
        "heading); CPU and GPU results are in separate sections and no ratio mixes them.",
    ]
    for kind in ("cpu", "gpu"):
        mine = [d for d in docs if d.get("device_kind") == kind]
        parts += ["", f"## {kind.upper()}", ""]
        if not mine:
            parts.append(f"No {kind.upper()} results yet.")
            continue
        parts += [section(d) for d in mine]
    if has_png:
        rel = png.relative_to(out.parent) if png.is_relative_to(out.parent) else png
        parts += ["", "## Images/s per loader", "",
                  "One panel per loader run (CPU and GPU runs in separate panels, each on its own scale).", "",
                  f"![images/s per loader]({rel.as_posix()})"]  # fmt: skip
    if skipped:
        parts += ["", "Not read (unknown layout): " + ", ".join(skipped)]
    text = "\n".join(parts).rstrip() + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"wrote {out}" + (f" and {png}" if has_png else ""))
    return text


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    p = new_parser("report", __doc__, prog, result=False)
    p.add_argument("--results", type=Path, default=RESULTS, help="folder of result JSON files")
    p.add_argument("--out", type=Path, default=None, help="markdown output (default RESULTS/REPORT.md)")
    p.add_argument("--png", type=Path, default=None, help=f"chart output (default beside --out, {PNG_NAME})")
    args = p.parse_args(argv)
    build(args.results, args.out or args.results / "REPORT.md", args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
