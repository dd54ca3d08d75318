"""Images/s of every loader on the same files with the same augmentation, and each one's ratio to the
plain PyTorch loader measured in the same run.

    python -m benchmarks.loader --data ../shared/data/cityscapes_pairs_sample --augment standard,none
    python -m benchmarks.loader                                # synthetic pairs (--n 256) in a temp folder
    python -m benchmarks.loader --data DIR --n 1024 --workers 0,2,4,8,16 --json OUT.json   # the GPU suite
    python -m benchmarks.loader --format cityscapes --synth-size 1024 --n 64   # official-layout PNG path

Loaders: `torch wN` (DataLoader + Pillow + torchvision v2, N worker processes; default 0, 1, 2, ... up
to --max-workers, powers of two past 4), `dali-cpu` (DALI, CPU operators), `dali-gpu` (DALI, nvJPEG
"mixed" decode; only with CUDA), `cache` (decoded once into device memory, augmented there; in RAM on
a CPU run). All read the first --n samples of DIR's train split (any layout: --format), with batch
--batch-size, shuffled, last partial batch dropped, and the same augmentation (`standard` = flip 0.5,
rotation +-10 deg, zoom 0.75-1.25, colour jitter 0.3; `none`). Every batch ends on the target device
(`cuda` when there is one) in the training dtype: DALI-CPU batches are copied there, as training would.

Order: the other loaders first, then `torch wN` from most to fewest workers (the slowest last, so a
run cut short by a time limit keeps the most; the JSON is rewritten after every loader). Per loader:
build it (`setup_s`; for the cache this is the one-time decode/fill), one warm-up epoch
(worker start-up, lookup-table load, DALI pipeline build; its time to first batch is reported), then
--reps timed epochs, each timed until its last batch has landed on the device (synchronised).
images/s = images of the epoch / its seconds; the table shows the median and every repetition goes
to the JSON. Ratios divide a loader's median by the median of `torch w2` (the default config) and by
the best `torch wN`, all from this run on this machine: a ratio never mixes runs or devices.
Results: benchmarks/results/loader-<cpu|gpu>.json (or --json).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (
    command_line,
    device_kind,
    exit_with,
    finish_record,
    median,
    new_parser,
    new_record,
    pick_device,
    print_header,
    print_table,
    result_file,
    sync,
)
from cityseg.config import AugmentConfig
from cityseg.data.contract import LoaderSpec
from cityseg.data.contract import make_loader as make_loader_of_kind
from cityseg.data.formats import FORMATS, Source

AUGMENTS: dict[str, AugmentConfig | None] = {
    "none": None,
    "standard": AugmentConfig(hflip=0.5, rotate_deg=10.0, scale=(0.75, 1.25), brightness=0.3, contrast=0.3,
                              saturation=0.3),
}  # fmt: skip
LOADERS = ("torch", "dali-cpu", "dali-gpu", "cache")
BASELINE_WORKERS = 2  # DataConfig.workers' default: the plain loader as `cityseg-fast train` runs it


@dataclass(frozen=True)
class Spec:
    loader: str  # torch | dali-cpu | dali-gpu | cache
    workers: int  # DataLoader workers, DALI threads, or the cache's decode workers

    @property
    def label(self) -> str:
        return f"torch w{self.workers}" if self.loader == "torch" else self.loader


def default_workers(max_workers: int) -> list[int]:
    """0, 1, 2, ... max_workers; past 4 only powers of two (and max_workers) to keep the run short."""
    counts = [w for w in range(max_workers + 1) if w <= 4 or (w & (w - 1)) == 0]
    return counts if counts[-1] == max_workers else [*counts, max_workers]


def parse_ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def available(loader: str, device: torch.device) -> str | None:
    """None when `loader` can run here, else why not."""
    if loader.startswith("dali"):
        from cityseg.data.contract import dali_available

        if not dali_available():
            return "nvidia.dali is not importable"
        if loader == "dali-gpu" and device.type != "cuda":
            return "no CUDA device"
    if loader == "cache":
        try:
            import cityseg.data.cache_loader  # noqa: F401
        except ImportError as e:
            return f"cityseg.data.cache_loader is not importable ({e})"
    return None


def make_loader(spec: Spec, files: Source, palette, augment: AugmentConfig | None, args: argparse.Namespace,
                device: torch.device, dtype: torch.dtype):
    """The loader `spec` names, through the package's registry (cityseg/data/contract.py)."""
    where = torch.device("cpu") if spec.loader == "dali-cpu" else device
    # A row's count is worker processes, or DALI's threads (`--threads`).
    loader_spec = LoaderSpec(image_size=args.image_size, batch_size=args.batch_size, augment=augment, shuffle=True,
                             drop_last=True, device=where, dtype=dtype, workers=spec.workers,
                             threads=max(1, spec.workers), prefetch=args.prefetch, seed=args.seed)
    kind = {"torch": "torch", "dali-cpu": "dali", "dali-gpu": "dali", "cache": "cache"}.get(spec.loader)
    if kind is None:
        raise ValueError(f"unknown loader {spec.loader!r}: expected one of {LOADERS}")
    return make_loader_of_kind(kind, files, palette, loader_spec)


def run_epoch(loader, epoch: int, device: torch.device) -> dict[str, float]:
    """One epoch, timed until its last batch is on `device`: images, seconds, seconds to first batch."""
    loader.set_epoch(epoch)
    images, first = 0, None
    sync(device)
    t0 = time.perf_counter()
    for image, target in loader:
        if image.device != device:  # DALI-CPU: the host-to-device copy is part of the loader's job
            image, target = image.to(device, non_blocking=True), target.to(device, non_blocking=True)
        images += image.shape[0]
        if first is None:
            sync(device)
            first = time.perf_counter() - t0
    sync(device)
    return {"images": images, "seconds": time.perf_counter() - t0, "first_batch_s": first or 0.0}


def measure(spec: Spec, files: Source, palette, augment_name: str, args: argparse.Namespace,
            device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    t0 = time.perf_counter()
    # Closed at the end of the block: its workers and threads go now, not during the next loader's timing.
    with make_loader(spec, files, palette, AUGMENTS[augment_name], args, device, dtype) as loader:
        sync(device)
        setup_s = time.perf_counter() - t0
        warm = [run_epoch(loader, e, device) for e in range(args.warmup)]
        timed = [run_epoch(loader, args.warmup + r, device) for r in range(args.reps)]
    rates = [t["images"] / t["seconds"] for t in timed]
    return {
        "loader": spec.loader,
        "label": spec.label,
        "workers": spec.workers,
        "runs_on": "gpu" if spec.loader == "dali-gpu" or (spec.loader == "cache" and device.type == "cuda")
        else "cpu",
        "augment": augment_name,
        "images_per_epoch": timed[0]["images"] if timed else None,
        "setup_s": setup_s,  # the cache's one-time decode/fill; pipeline build / nothing for the others
        "time_to_first_batch_s": setup_s + warm[0]["first_batch_s"] if warm else None,
        "warmup_epoch_s": [w["seconds"] for w in warm],
        "rep_seconds": [t["seconds"] for t in timed],
        "reps": rates,
        "median": median(rates),
        "min": min(rates),
        "max": max(rates),
        "unit": "images/s",
    }


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Ratios within one augmentation group of one run (same files, same machine, same minute)."""
    torch_rows = [r for r in rows if r["loader"] == "torch"]
    base = next((r["median"] for r in torch_rows if r["workers"] == BASELINE_WORKERS), None)
    best = max(torch_rows, key=lambda r: r["median"], default=None)
    for r in rows:
        r["ratio_vs_torch_w2"] = r["median"] / base if base else None
        r["ratio_vs_best_torch"] = r["median"] / best["median"] if best else None
        r["best_torch"] = best["label"] if best else None


def resolve_files(args: argparse.Namespace, tmp: Path) -> tuple[Source, str]:
    """The first --n train samples of --data (in --format), or --n synthetic samples written to `tmp`
    in --format (the official layout: PNG frames of --synth-size x 2 --synth-size with labelIds)."""
    from cityseg.data.formats import find_dataset
    from cityseg.palette import cityscapes_palette

    palette = cityscapes_palette()
    if args.data is not None:
        dataset = find_dataset(args.data, args.format)
        source = dataset.source("train", palette)
        return source.with_samples(source.samples[: args.n]), f"{args.data} ({dataset.format})"
    from cityseg.data.synth import write_dataset

    workers = min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1, 16)
    write_dataset(tmp / "pairs", n_train=args.n, n_val=1, seed=args.seed, size=args.synth_size, workers=workers)
    fmt = "pairs" if args.format == "auto" else args.format
    if fmt != "pairs":
        write_as(fmt, tmp / "pairs", tmp / fmt, palette)
    what = {"pairs": f"{args.synth_size}px pairs", "folders": f"{args.synth_size}px folders (JPEG photos, PNG masks)",
            "cityscapes": f"official layout, {2 * args.synth_size}x{args.synth_size} PNG"}[fmt]
    return find_dataset(tmp / fmt, fmt).source("train", palette), f"synthetic ({args.n}, {what}, seed {args.seed})"


def write_as(fmt: str, pairs_root: Path, root: Path, palette) -> None:
    """The synthetic pairs rewritten in another layout: `folders` (JPEG photos as the pairs hold them,
    colour PNG masks) or `cityscapes` (2:1 PNG frames, labelIds masks), for the other formats' readers."""
    import numpy as np
    from PIL import Image

    from cityseg.data.formats import cityscapes_id_table
    from cityseg.data.pairs import list_split, read_pair
    from cityseg.palette import map_colors_lut

    table = cityscapes_id_table().numpy()
    label_id_of = np.zeros(256, np.uint8)  # train id -> its first labelId; void (255) -> 0, 'unlabeled'
    for label_id in range(255, -1, -1):
        if table[label_id] != 255:
            label_id_of[table[label_id]] = label_id
    for split in ("train", "val"):
        for i, path in enumerate(list_split(pairs_root, split)):
            photo, mask = read_pair(path)
            if fmt == "folders":
                for folder, image, kind in (("images", photo, "JPEG"), ("masks", mask, "PNG")):
                    out = root / folder / split / f"{path.stem}.{kind.lower().replace('jpeg', 'jpg')}"
                    out.parent.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(image).save(out, kind, quality=95)
                continue
            h = photo.shape[0]
            ids = map_colors_lut(torch.from_numpy(np.ascontiguousarray(mask)), palette, torch.uint8).numpy()
            stem = f"{('aachen', 'bonn', 'zurich')[i % 3]}_000000_{i:06d}"
            frame = Image.fromarray(photo).resize((2 * h, h), Image.BILINEAR)
            labels = Image.fromarray(label_id_of[ids]).resize((2 * h, h), Image.NEAREST)
            for folder, image, suffix in (("leftImg8bit", frame, "leftImg8bit"), ("gtFine", labels, "gtFine_labelIds")):
                out = root / folder / split / stem.split("_")[0] / f"{stem}_{suffix}.png"
                out.parent.mkdir(parents=True, exist_ok=True)
                image.save(out)


def parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = new_parser("loader", __doc__, prog)
    p.add_argument("--data", type=Path, default=None, help="dataset folder (reads its train split); default synthetic")
    p.add_argument("--format", default="auto", choices=["auto", *FORMATS],
                   help="dataset layout (auto: detected; synthetic: pairs)")
    p.add_argument("--n", type=int, default=256, help="images per epoch (first N train files)")
    p.add_argument("--augment", default="standard", help="comma list of: standard, none")
    p.add_argument("--loaders", default=",".join(LOADERS), help="comma list of: " + ", ".join(LOADERS))
    p.add_argument("--workers", type=parse_ints, default=None, help="torch worker counts, e.g. 0,2,4,8")
    p.add_argument("--max-workers", type=int, default=os.cpu_count() or 1, help="cap of the default worker list")
    p.add_argument("--threads", type=int, default=None,
                   help="DALI threads and cache decode workers (default: --max-workers)")
    p.add_argument("--batch-size", type=int, default=32, help="images per batch, every loader alike")
    p.add_argument("--image-size", type=int, default=256, help="side of the square images the loaders deliver")
    p.add_argument("--prefetch", type=int, default=2,
                   help="batches each loader prepares ahead (DALI queue depth, DataLoader prefetch factor)")
    p.add_argument("--warmup", type=int, default=1, help="untimed epochs per loader")
    p.add_argument("--reps", type=int, default=5, help="timed epochs per loader (the median is reported)")
    p.add_argument("--device", default="auto", help="target device: auto | cpu | cuda")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="image dtype (auto: bf16 on GPU as training uses, fp32 on CPU)")
    p.add_argument("--synth-size", type=int, default=256, help="height of generated pairs without --data")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic data and the augmentation")
    return p


def run(argv: Sequence[str] | None = None, prog: str | None = None) -> dict[str, Any]:
    """Run the benchmark; returns the JSON record (also written to --json)."""
    args = parser(prog).parse_args(argv)
    from cityseg.palette import cityscapes_palette

    device = pick_device(args.device)
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32,
             "float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]  # fmt: skip
    augments = [a.strip() for a in args.augment.split(",") if a.strip()]
    unknown = [a for a in augments if a not in AUGMENTS]
    if unknown or not augments:
        raise SystemExit(f"--augment {args.augment}: expected a comma list of {', '.join(AUGMENTS)}")
    loaders = [name.strip() for name in args.loaders.split(",") if name.strip()]
    if bad := [name for name in loaders if name not in LOADERS]:
        raise SystemExit(f"--loaders: unknown {bad}; expected {', '.join(LOADERS)}")
    out = result_file(args, "loader", device_kind(device))
    if args.reps < 5:
        print(f"note: --reps {args.reps} < 5: fine for a smoke test, too few for a figure to quote")
    workers = args.workers if args.workers is not None else default_workers(args.max_workers)
    threads = args.threads or max(1, args.max_workers)

    with tempfile.TemporaryDirectory(prefix="loader-bench-") as tmp:
        files, source = resolve_files(args, Path(tmp))
        if len(files) < args.batch_size:
            raise SystemExit(f"{len(files)} files make no full batch of {args.batch_size}: lower --batch-size")
        config = {
            "data": source, "format": files.format, "n_images": len(files), "batch_size": args.batch_size,
            "image_size": args.image_size,
            "augment": {a: None if AUGMENTS[a] is None else asdict(AUGMENTS[a]) for a in augments},
            "loaders": loaders, "torch_workers": workers, "dali_threads": threads, "cache_decode_workers": threads,
            "prefetch": args.prefetch, "warmup_epochs": args.warmup, "reps": args.reps, "dtype": str(dtype),
            "target_device": str(device), "baseline": f"torch w{BASELINE_WORKERS}", "seed": args.seed,
        }  # fmt: skip
        record = new_record("loader", device, command_line("loader", argv), config)
        print_header(record)
        specs = [Spec("torch", w) for w in workers] if "torch" in loaders else []
        for name in loaders:
            if name == "torch":
                continue
            why = available(name, device)
            if why is None:
                specs.append(Spec(name, threads))
            else:
                record["notes"].append(f"{name} skipped: {why}")
                print(f"{name} skipped: {why}")
        palette = cityscapes_palette()
        # Slowest last (fewest workers), so a run cut short by a time limit loses the least; rows are
        # reported in canonical order.
        order = sorted(specs, key=lambda s: (s.loader == "torch", -s.workers))
        for aug in augments:
            rows = []
            for spec in order:
                print(f"  {aug:8s} {spec.label:10s} ...", end=" ", flush=True)
                row = measure(spec, files, palette, aug, args, device, dtype)
                print(f"{row['median']:8.1f} images/s  (reps {', '.join(f'{v:.0f}' for v in row['reps'])})")
                rows.append(row)
                add_ratios(rows)
                finish_record(record | {"results": record["results"] + rows}, out, done=False)
            rows.sort(key=lambda r: (r["loader"] != "torch", r["workers"] if r["loader"] == "torch" else 0,
                                     LOADERS.index(r["loader"])))  # fmt: skip
            record["results"].extend(rows)
            print_table(rows, [("label", "loader", ""), ("runs_on", "on", ""), ("median", "images/s", ".1f"),
                               ("min", "min", ".1f"), ("max", "max", ".1f"), ("ratio_vs_torch_w2", "x torch w2", ".2f"),
                               ("ratio_vs_best_torch", "x best torch", ".2f"), ("setup_s", "setup s", ".2f"),
                               ("time_to_first_batch_s", "1st batch s", ".2f")],
                        title=f"augment={aug}, {len(files)} images of {source}, batch {args.batch_size}, "
                              f"{args.image_size}px, on {record['device']} (median of {args.reps})")  # fmt: skip
    if device.type == "cpu" and "cache" in loaders:
        record["notes"].append("cache on a CPU run holds the decoded split in RAM and augments it with batched "
                               "tensor ops on the CPU")  # fmt: skip
    finish_record(record, out)
    return record


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    run(argv, prog)
    return 0


if __name__ == "__main__":
    exit_with(main)
