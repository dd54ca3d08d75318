"""The GPU suite's plan: every step of `benchmarks/gpu_suite.sh`, which of the lease's two runs holds it,
its commands, its sizes and its time cap, with the sizes derived from each other and the caps from
costs measured on the H200 (or assumed, and over-estimated, where not measured yet).

    python -m benchmarks.gpu_plan --plan-only                 # the GPU plan, its relations checked
    python -m benchmarks.gpu_plan --plan-only --dry           # the CPU dry run's plan
    python -m benchmarks.gpu_plan --plan-only --set loader.n=4096   # a changed size: exit 1 on a contradiction
    python -m benchmarks.gpu_plan --shell --run 1 [--dry]     # what gpu_suite.sh evals (bash arrays)
    python -m benchmarks.gpu_plan --pack-real DIR             # real pairs -> .dali/real-0.tar, .dali/real-1.tar
    python -m benchmarks.gpu_plan --report DIR                # REPORT.md's head: status, plan, real-data run

The lease (../shared/device/README.md): 15 minutes on one H100 (80 GB) or H200, machine start, two
runs and the idle wait between them included, and >= 150 s of it left unplanned (no run has a retry
otherwise). Run 1 carries DALI's part-0, the first real pairs and .dali/extras (cityscapesscripts, which
cityseg.palette imports) and does every step that needs no DALI
(tests, kernel, train-step, `--batch-size auto`, the compile warm-up of every later graph); run 2
carries part-1 and does what needs DALI (its tests, the loaders, the real-data run). `lease()` adds it
up; a plan that leaves less than LEASE_FREE_S is an error.

Sizes are typed once, here: the shell script reads them (`--shell`) and a size that follows from others
(synthetic pairs from the loader's epoch, the warm-up's steps from one epoch...) is computed, never typed.
`--set NAME=VALUE` overrides one (also `PLAN_SET="a=1 b=2"` in gpu_suite.sh's environment); the relations
are checked after overrides, and a contradiction is an `error:` line and exit status 1.

Costs: COSTS below, each with where it was seen. A step's cap is its estimate from those costs times
MARGIN, rounded up to 5 s. Steps that compile share one inductor/Triton cache (in /tmp: it outlives run
1), filled by run 1's `warmup`: the engine test's graph (`engine_config`, the test's own definition), the
real-data run's (trained for a few steps on run 1's real pairs: the same train and val batch shapes) and
each compiled train-step config, in parallel processes, once. Memory is sized for an H100: what runs at
once must fit H100_GIB (`MEMORY` checks it).
The dry run (`--dry`, CPU) checks the plumbing with tiny sizes and caps generous enough for a loaded
2-core machine; its caps come from no GPU cost.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shlex
import sys
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
LEASE_S = 900  # one lease: 15 minutes, start-up, both runs, the idle wait between them and the release
LEASE_FREE_S = 150  # left unplanned: room to run one step again, or a slow start
# What the lease spends outside the runs' steps (../shared/device/README.md): the machine starts in
# ~30 s; run 2 must start within the ~30 s a machine stays up after run 1; ~30 s after run 2 until it is
# handed back; each run's transfer of up to 64 MiB each way.
LEASE_OVERHEAD_S = {"machine start": 30, "idle between runs": 30, "release": 30, "transfers": 2 * 15}
BUDGET_S = LEASE_S - LEASE_FREE_S - sum(LEASE_OVERHEAD_S.values())  # both runs' steps together: 630 s
RUN_LIMIT_S = 600  # one command on the device machine: a run's steps must fit it
DRY_BUDGET_S = 4200  # a loaded 2-core CPU: generous, it checks plumbing, not speed
KILL_GRACE_S = 2  # a step that ignores its timeout's SIGTERM is killed this much later
# real_e2e on SIGTERM finishes its step, saves last.pt, validates (40 real pairs), writes summary.json
# and its plots; SIGKILL only after this. On the GPU: a 40 ms step, DALI's threads (no worker processes
# for the group's SIGTERM to end), ~1 s of validation. Seen on the CPU machine at load ~20, width 4, 64 px,
# the plain loader (its workers ended by the group's SIGTERM): 28.8 s from SIGTERM to exit, summary.json
# written (/tmp/sigterm_probe.py in issue 31's note): the dry run waits DRY_SUMMARY_GRACE_S.
SUMMARY_GRACE_S = 20
DRY_SUMMARY_GRACE_S = 60
PACK_S = 1  # after each step the suite rewrites $OUT (archive, REPORT.md): ~1 s of tar and Python
MARGIN = 1.2  # cap = estimate x MARGIN: the costs below vary by ~20 % between runs
TRANSFER_MIB = 64  # what travels with one run: checkout + carried paths (../shared/device/README.md)
CHECKOUT_MIB = 3  # the checkout itself (~2 MB)
REAL_PART_MB = 22  # real pairs beside each ~35 MB DALI part
GPU_CORES = 16  # the GPU machine's CPU cores (loader workers, parallel compiles)
H100_GIB = 80  # the smaller of the two cards a lease may get
MEMORY_SHARE = 0.8  # of H100_GIB for the processes that run at once (allocator slack, CUDA graph pools)

# Seconds, on the H200 machine. "seen": measured there (../shared/device/README.md, issue 23);
# "assumed": not measured yet, a deliberate over-estimate that the next run's status.tsv replaces.
COSTS = {
    "cold_start": 30,  # seen: nvidia-smi + first `import torch` + CUDA init took > 10 s on a cold machine
    "python_start": 6,  # assumed: a later Python process importing torch + cityseg (page cache warm)
    "unpack": 4,  # seen: both DALI parts, xz -T0
    "engine_compile_cold": 56,  # seen: torch.compile of the default U-Net, 45-56 s cold
    "engine_compile_warm": 6,  # seen: the same from a warm inductor cache
    "step_compile_cold": 30,  # seen: 27 s for width 64 in benchmarks/train_step.py
    "parallel_compile_slowdown": 1.5,  # assumed: several compiles at once on 16 cores
    "triton_compile": 1.5,  # seen: "seconds each"; ~1 s on this CPU for K = 34 (triton.compile, sm_90)
    "synth_pairs_per_s_core": 200,  # seen on CPU: >= 200 pairs/s on one core (benchmarks/synth_speed.py)
    "lookup_table": 15,  # assumed: one 2^24-colour table on one thread: 8 CPU-s seen on the CPU machine
    "torch_loader_img_s": 120,  # seen on CPU: plain loader, 0 workers, standard augmentation, 256 px
    "step_ms_per_image_w64": 1.0,  # assumed: width 64, 256 px, eager bf16 (width 32: half)
    "real_step_ms": 40,  # assumed: width 32, batch 16, 256 px, compiled, with the loader
    "nccl_test": 30,  # assumed: torchrun + NCCL init + one small epoch, compiled from the warm-up's cache
    "nccl_test_cold": 90,  # assumed: the same with a cold compile of the DDP graph
    "dali_pipeline": 6,  # assumed: DALI pipeline build + a few batches (import seen at 1 s)
    "auto_trial": 45,  # assumed: `--batch-size auto`'s trial steps at a few batch sizes (graphs partly cached)
}
# Training memory per 256 px image at width 32 (the default model), MiB: ~110 of saved activations
# (issue 31, measured on CPU in fp32: bf16 halves it, kept as slack); scales with width and pixels.
ACT_MIB_PER_IMAGE_W32 = 110

# The engine test (tests/test_gpu.py) and the warm-up that compiles its graph: one definition
# (`engine_config`, on `ENGINE_DATA`), so the test's compile comes from the warm-up's cache. Small
# shapes: compile time grows with depth (ops), and CUDA graphs (reduce-overhead) are the point.
ENGINE_TEST = {"width": 8, "depth": 3, "image_size": 128, "batch_size": 8, "compile_mode": "reduce-overhead",
               "precision": "bf16-mixed", "upsample": "transpose", "norm": "batch", "epochs": 3}
ENGINE_DATA = {"n_train": 64, "n_val": 16, "seed": 0, "size": 256}  # write_dataset's arguments
# The one-rank NCCL test's `train` flags (compiled DDP: model and loss in one graph, torch's default mode):
# the warm-up runs them too, on its synthetic pairs (the same shapes), so the test's compile is warm.
DDP_TEST_FLAGS = ["--device", "cuda", "--image-size", "128", "--width", "8", "--depth", "3", "--batch-size", "8",
                  "--compile", "--skip-validate", "--no-tensorboard"]


def engine_config(data: Path, out: Path, **train_kw: Any) -> Any:
    """The GPU tests' config: ENGINE_TEST's model and shapes on CUDA, eager unless `train_kw` says."""
    from cityseg.config import Config, DataConfig, ModelConfig, TrainConfig

    e = ENGINE_TEST
    return Config(
        data=DataConfig(data_dir=str(data), image_size=e["image_size"], batch_size=e["batch_size"], workers=4,
                        skip_validate=True),
        model=ModelConfig(width=e["width"], depth=e["depth"], upsample=e["upsample"], norm=e["norm"]),
        train=TrainConfig(**{"epochs": 2, "lr": 3e-3, "warmup_steps": 2, "device": "cuda", "log_every": 4,
                             "out": str(out), **train_kw}),
    )


def engine_run_config(data: Path, out: Path) -> Any:
    """The compiled engine run (CUDA graphs, bf16): what the engine test trains and the warm-up compiles."""
    e = ENGINE_TEST
    return engine_config(data, out, epochs=e["epochs"], compile=True, compile_mode=e["compile_mode"],
                         precision=e["precision"])


def warm_engine(folder: Path) -> int:
    """The warm-up's engine command: the engine test's data and run, into the shared compile cache."""
    from cityseg.data.synth import write_dataset
    from cityseg.training import train

    data = write_dataset(folder / "data", **ENGINE_DATA)
    summary = train(engine_run_config(data, folder / "run"))
    print(f"engine graph compiled: {summary['steps']} steps, compile {summary['compile']}")
    return 0


def build_table() -> int:
    """The palette's lookup table, the one table every run and test session uses, into $CITYSEG_CACHE
    (what tests/conftest.py builds in its session fixture: built here once, the shards then load it)."""
    import torch

    from cityseg.palette import cityscapes_palette, lookup_table

    # One thread: the build runs thousands of small chunks, and intra-op threads then wait on each other at
    # every barrier when the machine is busy (two builders at once on a loaded 2-core CPU took > 900 s
    # with torch's default threads; one table on one thread: 8 CPU-seconds).
    torch.set_num_threads(1)
    lookup_table(cityscapes_palette())
    print("lookup table (palette) ready")
    return 0


# GPU tests: estimated seconds (cold cache, warm cache) per node id, and the shards that run at once
# (one pytest process each: Triton compiles are CPU-bound, the machine has 16 cores), each in its run:
# run 1 has no DALI, so DALI's tests wait for run 2. Tests not named run in run 1's last shard.


def gpu_test_files() -> tuple[str, ...]:
    """Every test module that carries the gpu marker (a GPU test added anywhere runs in the last shard)."""
    return tuple(str(p.relative_to(ROOT)) for p in sorted((ROOT / "tests").glob("test_*.py"))
                 if "pytest.mark.gpu" in p.read_text())


TEST_FILES = gpu_test_files()
PYTEST_START = (15, 8)  # a pytest process: import torch, cityseg, collection (cold machine, warm)
KERNEL_PARAM = (14, 4)  # one k/max_dist case of test_gpu_matches_reference: 9 Triton variants
TEST_COSTS: dict[str, tuple[float, float]] = {
    "tests/test_gpu.py::test_engine_compiled_cuda_graphs_without_recompiles": (66, 16),
    "tests/test_gpu.py::test_real_nvml_sampler_reads_utilisation_and_memory": (3, 3),
    "tests/test_gpu.py::test_one_rank_nccl_ddp_run_compiled": (COSTS["nccl_test_cold"], COSTS["nccl_test"]),
    "tests/test_gpu.py::test_fp16_with_a_gradient_scaler": (10, 8),
    "tests/test_gpu.py::test_dali_mixed_decode_with_augmentation_matches_the_cpu_pipeline": (8, 6),
    "tests/test_gpu.py::test_device_cache_on_cuda_matches_the_cpu_cache[plain]": (5, 4),
    "tests/test_gpu.py::test_device_cache_on_cuda_matches_the_cpu_cache[dali]": (6, 5),
    "tests/test_dali_loader.py::test_gpu_mixed_decode_matches_cpu_pipeline": (8, 6),
    "tests/test_gpu.py::test_kernel_on_jpeg_noisy_masks_at_odd_shapes": (15, 5),
    "tests/test_mask_kernel.py::test_gpu_non_integer_centres_differ_only_on_near_ties": (6, 2),
    "tests/test_mask_kernel.py::test_gpu_strided_views_and_ties": (10, 3),
    "tests/test_mask_kernel.py::test_gpu_real_sample_masks": (5, 2),
    **{f"tests/test_mask_kernel.py::test_gpu_matches_reference[{d}-{k}]": KERNEL_PARAM
       for d in ("None", "40.0") for k in (1, 20, 34, 64)},
}
UNKNOWN_TEST = (20, 10)  # a GPU test this table does not know yet
# Run 1's shards (no DALI there); the last, empty, runs every other GPU-marked test of TEST_FILES.
TEST_SHARDS: tuple[tuple[str, ...], ...] = (
    ("tests/test_gpu.py::test_engine_compiled_cuda_graphs_without_recompiles",
     "tests/test_gpu.py::test_real_nvml_sampler_reads_utilisation_and_memory",
     "tests/test_mask_kernel.py::test_gpu_matches_reference[None-1]"),
    ("tests/test_gpu.py::test_one_rank_nccl_ddp_run_compiled",
     "tests/test_gpu.py::test_fp16_with_a_gradient_scaler",
     "tests/test_gpu.py::test_device_cache_on_cuda_matches_the_cpu_cache[plain]",
     "tests/test_mask_kernel.py::test_gpu_matches_reference[None-20]"),
    ("tests/test_mask_kernel.py::test_gpu_matches_reference[40.0-20]",
     "tests/test_mask_kernel.py::test_gpu_matches_reference[None-34]",
     "tests/test_mask_kernel.py::test_gpu_matches_reference[40.0-34]",
     "tests/test_mask_kernel.py::test_gpu_non_integer_centres_differ_only_on_near_ties",
     "tests/test_mask_kernel.py::test_gpu_strided_views_and_ties"),
    (),
)
# Run 2's one shard: the tests that need DALI.
DALI_SHARD: tuple[str, ...] = (
    "tests/test_gpu.py::test_dali_mixed_decode_with_augmentation_matches_the_cpu_pipeline",
    "tests/test_gpu.py::test_device_cache_on_cuda_matches_the_cpu_cache[dali]",
    "tests/test_dali_loader.py::test_gpu_mixed_decode_matches_cpu_pipeline",
)
COLD_TESTS_LIMIT_S = 150  # issue 23: every GPU test from a cold cache within 150 s


def gpu_sizes() -> dict[str, object]:
    """The sizes typed by hand for the GPU run; everything else is derived (see `derive`)."""
    return {
        "batch": 16,  # the product's default batch: the real-data run and its warm-up
        "image_size": 256,
        "synth.val": 32,
        "loader.n": 256,  # images per loader epoch
        "loader.batch": 32,
        "loader.reps": 2,
        "loader.workers": "0,4,16",
        "loader.threads": 8,
        "kernel.batches": "64",  # 64 x 256^2: the kernel, not the launch, is the cost
        "step.widths": "32,64",
        "step.batches": "64",
        "step.modes": "off,cudagraphs",
        "step.losses": "ce,ce+dice",
        "step.warmup": 3,
        "step.steps": 10,
        "step.reps": 3,
        "real.target_acc": 0.85,
        "real.train_s": 25,  # --time-budget: training seconds, validation not counted
        # assumed: wall time beyond the training clock, as a share of it: validation and checkpoints (<= 10 %
        # by the `auto` cadence) and epoch boundaries (~0.24 s each before issue 31; 10-step epochs of ~0.4 s)
        "real.val_share": 0.6,
        "warmup.steps": 3,  # compiled steps per warm-up process (compile + CUDA-graph recording)
        "auto.steps": 2,  # training steps of the `--batch-size auto` run after its trial
        "tests.shards": len(TEST_SHARDS),
    }


def dry_sizes() -> dict[str, object]:
    """The CPU dry run: the same steps at tiny sizes."""
    return {
        "batch": 4, "image_size": 64, "synth.val": 4,
        "loader.n": 8, "loader.batch": 4, "loader.reps": 1, "loader.workers": "0", "loader.threads": 1,
        "kernel.batches": "1", "step.widths": "4", "step.batches": "2", "step.modes": "off", "step.losses": "ce",
        "step.warmup": 1, "step.steps": 1, "step.reps": 1, "real.target_acc": 0.85, "real.train_s": 4,
        "real.val_share": 0.5, "warmup.steps": 2, "auto.steps": 1, "tests.shards": len(TEST_SHARDS),
    }


def ints(text: object) -> list[int]:
    return [int(x) for x in str(text).split(",") if x != ""]


def words(text: object) -> list[str]:
    return [x for x in str(text).split(",") if x != ""]


def derive(s: dict[str, object]) -> dict[str, object]:
    """Sizes that follow from others; an override (`--set`) of one of these is kept and then checked."""
    d = dict(s)
    d.setdefault("synth.train", d["loader.n"])  # one loader epoch is the synthetic set
    d.setdefault("warmup.steps_per_epoch", int(d["synth.train"]) // int(d["batch"]))
    d.setdefault("loader.batches_per_epoch", int(d["loader.n"]) // int(d["loader.batch"]))
    cells = len(ints(d["step.widths"])) * len(ints(d["step.batches"])) * len(words(d["step.losses"]))
    d.setdefault("step.configs", cells * len(words(d["step.modes"])))
    d.setdefault("step.compiles", cells * sum(m != "off" for m in words(d["step.modes"])))
    return d


def problems(s: dict[str, object], dry: bool) -> list[str]:
    """Each relation between sizes that does not hold, as a sentence naming the sizes."""
    out = []
    per_epoch = int(s["synth.train"]) // int(s["batch"])
    if int(s["warmup.steps_per_epoch"]) != per_epoch:
        out.append(f"warmup.steps_per_epoch={s['warmup.steps_per_epoch']} but synth.train {s['synth.train']} / "
                   f"batch {s['batch']} makes {per_epoch} steps in one epoch")
    if int(s["warmup.steps"]) > per_epoch:
        out.append(f"warmup.steps={s['warmup.steps']} > {per_epoch} steps in one epoch "
                   f"(synth.train {s['synth.train']} / batch {s['batch']})")
    if int(s["loader.n"]) > int(s["synth.train"]):
        out.append(f"loader.n={s['loader.n']} > synth.train={s['synth.train']}: the loader reads the first "
                   "loader.n training pairs")
    if int(s["loader.n"]) % int(s["loader.batch"]):
        out.append(f"loader.n={s['loader.n']} is not a multiple of loader.batch={s['loader.batch']} "
                   "(the last partial batch is dropped: images/s would count images never loaded)")
    if int(s["loader.batches_per_epoch"]) != int(s["loader.n"]) // int(s["loader.batch"]):
        out.append(f"loader.batches_per_epoch={s['loader.batches_per_epoch']} but loader.n / loader.batch = "
                   f"{int(s['loader.n']) // int(s['loader.batch'])}")
    cores = 2 if dry else GPU_CORES
    if max(ints(s["loader.workers"]), default=0) > cores:
        out.append(f"loader.workers={s['loader.workers']}: more workers than the machine's {cores} cores")
    if int(s["synth.val"]) < int(s["batch"]) and not dry:
        out.append(f"synth.val={s['synth.val']} < batch={s['batch']}: validation would be one partial batch")
    for b in ints(s["step.batches"]):
        if b < 1:
            out.append(f"step.batches has {b}: batches must be >= 1")
    unknown = set(words(s["step.modes"])) - {"off", "default", "cudagraphs"}
    if unknown:
        out.append(f"step.modes has {', '.join(sorted(unknown))}: expected off, default, cudagraphs")
    if unknown := set(words(s["step.losses"])) - {"ce", "ce+dice"}:
        out.append(f"step.losses has {', '.join(sorted(unknown))}: expected ce, ce+dice")
    cells = len(ints(s["step.widths"])) * len(ints(s["step.batches"])) * len(words(s["step.losses"]))
    if int(s["step.compiles"]) != cells * sum(m != "off" for m in words(s["step.modes"])):
        out.append(f"step.compiles={s['step.compiles']} does not match widths x batches x losses x compiled modes")
    if int(s["tests.shards"]) != len(TEST_SHARDS):
        out.append(f"tests.shards={s['tests.shards']} but TEST_SHARDS lists {len(TEST_SHARDS)}")
    if not 0 < float(s["real.target_acc"]) <= 1:
        out.append(f"real.target_acc={s['real.target_acc']}: expected a pixel accuracy in (0, 1]")
    if not dry:
        gib, what = warmup_memory_gib(s)
        if gib > MEMORY_SHARE * H100_GIB:
            out.append(f"the warm-up's processes at once need ~{gib:.0f} GiB ({what}): more than "
                       f"{MEMORY_SHARE:.0%} of an H100's {H100_GIB} GB")
    return out


def train_gib(width: int, batch: int, size: int) -> float:
    """Training memory of one step, GiB: ACT_MIB_PER_IMAGE_W32 scaled to the width and pixels."""
    return ACT_MIB_PER_IMAGE_W32 * width / 32 * batch * (size / 256) ** 2 / 1024


def warmup_memory_gib(s: dict[str, object]) -> tuple[float, str]:
    """What run 1's warm-up holds at once on the GPU: the real-data graph, the engine test's, and every
    compiled train-step config (one process each). The default model is width 32."""
    size = int(s["image_size"])
    parts = {"real": train_gib(32, int(s["batch"]), size),
             "engine": train_gib(int(ENGINE_TEST["width"]), int(ENGINE_TEST["batch_size"]),
                                 int(ENGINE_TEST["image_size"]))}
    n_compiled = sum(m != "off" for m in words(s["step.modes"])) * len(words(s["step.losses"]))
    for w in ints(s["step.widths"]):
        for b in ints(s["step.batches"]):
            parts[f"step w{w} b{b} x{n_compiled}"] = n_compiled * train_gib(w, b, size)
    return sum(parts.values()), ", ".join(f"{k} {v:.1f}" for k, v in parts.items())


# ------------------------------------------------------------------------------------------ steps


@dataclass
class Step:
    """One step: commands run at once (each a list of words; "$VAR" words expand in the shell)."""

    name: str
    run: int  # 1: no DALI on board (it needs none); 2: DALI unpacked
    estimate_s: float  # from COSTS and the sizes (GPU); 0 in the dry run
    commands: list[list[str]]
    why: str
    cap_s: int = 0
    grace_s: int = KILL_GRACE_S  # between the timeout's SIGTERM and SIGKILL
    env: dict[str, str] = field(default_factory=dict)


IN_SHELL = ("stash", "unpack")  # steps run in the suite's own shell: what they export reaches later steps


def ceil5(x: float) -> int:
    return int(5 * math.ceil(x / 5))


def test_estimate(ids: tuple[str, ...], warm: bool) -> float:
    k = 1 if warm else 0
    return PYTEST_START[k] + sum(TEST_COSTS.get(t, UNKNOWN_TEST)[k] for t in ids)


def named_tests() -> list[str]:
    return [t for shard in (*TEST_SHARDS, DALI_SHARD) for t in shard]


def rest_estimate(warm: bool) -> float:
    named = set(named_tests())
    k = 1 if warm else 0
    return PYTEST_START[k] + sum(c[k] for t, c in TEST_COSTS.items() if t not in named)


def shard_estimates(warm: bool) -> list[float]:
    return [test_estimate(ids, warm) if ids else rest_estimate(warm) for ids in TEST_SHARDS]


PYTEST_BASE = ["$PYTHON", "-m", "pytest", "-m", "gpu", "-v", "-s", "--durations=0", "-p", "no:cacheprovider"]


def test_commands(junit_dir: str) -> list[list[str]]:
    """Run 1: one pytest per shard; the last runs every GPU test no shard (of either run) names.
    -v: a shard cut by its cap still shows which tests passed; -s: test output as it comes;
    --durations: the costs for TEST_COSTS."""
    cmds = []
    for i, ids in enumerate(TEST_SHARDS):
        junit = ["--junitxml", f"{junit_dir}/pytest-gpu-{i}.xml"]
        if ids:
            cmds.append(PYTEST_BASE + junit + list(ids))
        else:
            cmds.append(PYTEST_BASE + junit + list(TEST_FILES) + [w for t in named_tests() for w in ("--deselect", t)])
    return cmds


def dali_test_command(junit_dir: str) -> list[str]:
    return PYTEST_BASE + ["--junitxml", f"{junit_dir}/pytest-gpu-dali.xml", *DALI_SHARD]


def real_flags(s: dict[str, object], dry: bool, batch: bool = True) -> list[str]:
    """The real-data run's model and batch flags: the product's defaults with --data (typed here once,
    so its warm-up compiles the same graph)."""
    flags = (["--batch-size", str(s["batch"])] if batch else []) + ["--image-size", str(s["image_size"])]
    return flags + (["--width", "4", "--depth", "2", "--no-compile"] if dry else [])


def train_cmd(data: str, out: str, flags: list[str], steps: int) -> list[str]:
    return ["$PYTHON", "-m", "cityseg", "train", "--data", data, "--out", out, "--epochs", "1", "--max-steps",
            str(steps), "--no-tensorboard", "--log-every", "1", *flags]


def step_sweep_args(s: dict[str, object]) -> list[str]:
    return ["--widths", str(s["step.widths"]), "--batches", str(s["step.batches"]), "--compile-modes",
            str(s["step.modes"]), "--losses", str(s["step.losses"]), "--size", str(s["image_size"]),
            "--warmup", str(s["step.warmup"]), "--steps", str(s["step.steps"]), "--reps", str(s["step.reps"])]


def warmup_commands(s: dict[str, object], dry: bool) -> list[list[str]]:
    """Run 1's compiles, at once: the engine test's graph (its own config), the real-data run's (its
    flags, on run 1's real pairs: every val pair, so the same val batch sizes), the one-rank NCCL
    test's compiled DDP graph (its flags), each train-step config."""
    warm = [["$PYTHON", "-m", "benchmarks.gpu_plan", "--warm-engine", "$WORK/warm/engine-test"],
            train_cmd("$REAL", "$WORK/warm/real", real_flags(s, dry), int(s["warmup.steps"]))]
    if dry:  # the dry run compiles nothing (inductor's C++ build takes minutes on 2 cores): plumbing only
        return warm[1:]
    warm.append(["$PYTHON", "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", "-m", "cityseg",
                 "train", "--data", "$DATA", "--out", "$WORK/warm/ddp", *DDP_TEST_FLAGS, "--epochs", "1",
                 "--max-steps", "2"])
    for w in ints(s["step.widths"]):
        for b in ints(s["step.batches"]):
            for m in words(s["step.modes"]):
                for loss in words(s["step.losses"]):
                    if m != "off":
                        warm.append(["$PYTHON", "-m", "benchmarks.train_step", "--widths", str(w), "--batches",
                                     str(b), "--compile-modes", m, "--losses", loss, "--size", str(s["image_size"]),
                                     "--warmup", "1", "--steps", "1", "--reps", "1",
                                     "--json", f"$WORK/warm/train_step-{w}-{b}-{m}-{loss}.json"])
    return warm


def build_steps(s: dict[str, object], dry: bool) -> list[Step]:
    """Every step in run order (in each run, the most wanted figures first: a cut loses the least)."""
    from kernels.mask_to_class import AUTOTUNE_BLOCKS  # torch and triton: imported only to plan steps

    c = COSTS
    py = c["python_start"]
    synth_n = int(s["synth.train"]) + int(s["synth.val"])
    warm = warmup_commands(s, dry)
    max_steps = max(1, int(float(s["real.train_s"]) * 1000 / c["real_step_ms"]))
    loaders = len(ints(s["loader.workers"])) + 3  # + dali-cpu, dali-gpu, cache
    loader_epochs = 1 + int(s["loader.reps"])
    # Plain loaders: start-up, then epochs at the one-core rate times ~0.8 per worker; DALI/cache: a build.
    torch_s = sum(2 + loader_epochs * int(s["loader.n"]) / (c["torch_loader_img_s"] * max(1.0, 0.8 * w))
                  for w in ints(s["loader.workers"]))
    sweep_steps = int(s["step.warmup"]) + int(s["step.steps"]) * int(s["step.reps"])
    sweep_s = len(words(s["step.modes"])) * len(words(s["step.losses"])) * sum(
        sweep_steps * b * c["step_ms_per_image_w64"] * w / 64 / 1000
        for w in ints(s["step.widths"]) for b in ints(s["step.batches"]))
    report = lambda name, run: Step(  # noqa: E731
        name, run, py + 2, [["$PYTHON", "-m", "benchmarks.report", "--results", "$WORK", "--out",
                             "$WORK/benchmarks-report.md"]], "benchmarks.report over the results; then $OUT is packed")
    steps = [
        # ---- run 1: carries DALI's part-0, real-0.tar (every val pair, some train pairs) and extras
        Step("stash", 1, 4, [["stash"]],
             "part-0 and real-0.tar into /tmp/keep for run 2; real-0's pairs unpacked for the warm-up"),
        Step("prepare", 1, max(c["cold_start"] + 5, py + synth_n / (c["synth_pairs_per_s_core"] * GPU_CORES) + 2,
                               py + c["lookup_table"]),
             [["environment"],
              ["$PYTHON", "-m", "cityseg", "synth", "--out", "$DATA", "--train", str(s["synth.train"]), "--val",
               str(s["synth.val"]), "--size", str(s["image_size"]), "--workers", "$CORES"],
              ["$PYTHON", "-m", "benchmarks.gpu_plan", "--build-table"]],
             f"at once: nvidia-smi, first import torch, CUDA init (a cold machine); {s['synth.train']} train + "
             f"{s['synth.val']} val synthetic pairs; the lookup table into the shared $CITYSEG_CACHE"),
        Step("warmup", 1, py + c["engine_compile_cold"] * c["parallel_compile_slowdown"] + 5, warm,
             f"{len(warm)} compiles at once into the shared caches: the engine test's graph, the real-data "
             f"run's, and {s['step.compiles']} train-step configs"),
        Step("tests", 1, max(shard_estimates(warm=True)), test_commands("$WORK"),
             f"{len(TEST_SHARDS)} pytest shards at once (no DALI); longest estimate "
             f"{max(shard_estimates(True)):.0f}s warm, {max(shard_estimates(False)):.0f}s cold"),
        Step("kernel", 1, py + (len(AUTOTUNE_BLOCKS) + 3) * c["triton_compile"]
             + 4 * 2 * 0.5 * len(ints(s["kernel.batches"])),
             [["$PYTHON", "-m", "benchmarks.mask_kernel", "--batches", str(s["kernel.batches"]),
               *(["--cpu", "--reps", "5"] if dry else []), "--json", "$WORK/mask_kernel-$KIND.json"]],
             f"mask kernel at {s['kernel.batches']} x {s['image_size']}^2: training's {len(AUTOTUNE_BLOCKS)} "
             "autotune blocks pinned, the autotuned launch, uint8, 2 SASS counts"),
        Step("train_step", 1, py + int(s["step.compiles"]) * c["engine_compile_warm"] + sweep_s,
             [["$PYTHON", "-m", "benchmarks.train_step", *(["--quick"] if dry else step_sweep_args(s)),
               "--device", "$DEVICE", "--json", "$WORK/train_step-$KIND.json"]],
             f"{s['step.configs']} configs ({s['step.compiles']} compiled, from the warm-up's cache)"),
        Step("batch_auto", 1, py + c["auto_trial"] + c["engine_compile_warm"] + 5,
             [["batch_auto", *train_cmd("$REAL", "$WORK/auto-run", ["--batch-size", "auto",
                                                                     *real_flags(s, dry, batch=False)],
                                        int(s["auto.steps"]))]],
             "`cityseg-fast train --batch-size auto` on run 1's real pairs: its choice (config.json) and the "
             "'batch size auto:' lines"),
        report("report_1", 1),
        # ---- run 2: carries DALI's part-1, extras and real-1.tar
        Step("unpack", 2, c["unpack"] + 2, [["unpack"]],
             "DALI parts into site-packages, both real tars into one folder (in the suite's own shell)"),
        Step("dali_tests", 2, test_estimate(DALI_SHARD, warm=True), [dali_test_command("$WORK")],
             f"the {len(DALI_SHARD)} GPU tests that need DALI"),
        Step("loader", 2, py + 3 * c["dali_pipeline"] + torch_s,
             [["$PYTHON", "-m", "benchmarks.loader", "--data", "$DATA", "--device", "$DEVICE", "--n",
               str(s["loader.n"]), "--batch-size", str(s["loader.batch"]), "--image-size", str(s["image_size"]),
               "--reps", str(s["loader.reps"]), "--workers", str(s["loader.workers"]), "--threads",
               str(s["loader.threads"]), "--augment", "standard", "--json", "$WORK/loader-$KIND.json"]],
             f"{loaders} loaders x {loader_epochs} epochs of {s['loader.n']} images"),
        Step("real_e2e", 2, py + c["engine_compile_warm"] + c["dali_pipeline"]
             + float(s["real.train_s"]) * (1 + float(s["real.val_share"])),
             [["real_e2e", "$PYTHON", "-m", "cityseg", "train", "--data", "$REAL", "--out", "$WORK/real-run",
               "--target-acc", str(s["real.target_acc"]), "--time-budget", str(s["real.train_s"]),
               *real_flags(s, dry), *(["--max-steps", "3"] if dry else [])]],
             f"real pairs to pixel accuracy {s['real.target_acc']} within {s['real.train_s']}s of training "
             f"(~{max_steps} steps at {c['real_step_ms']} ms); graph from run 1's warm-up",
             grace_s=DRY_SUMMARY_GRACE_S if dry else SUMMARY_GRACE_S),
        report("report", 2),
    ]
    for st in steps:
        st.cap_s = dry_cap(st.name) if dry else max(10, ceil5(st.estimate_s * MARGIN))
    return steps


def dry_cap(name: str) -> int:
    """Dry-run caps: a loaded 2-core CPU, several processes at once in `prepare`, `warmup` and `tests`."""
    # prepare: two 2^24-colour tables built at once, ~35 CPU-s each on an idle core, > 400 s at load 23.
    return {"stash": 60, "unpack": 60, "prepare": 900, "warmup": 300, "tests": 600, "dali_tests": 300,
            "real_e2e": 300, "report_1": 120, "report": 120}.get(name, 200)


def plan(dry: bool, overrides: dict[str, str]) -> tuple[dict[str, object], list[Step], list[str]]:
    typed = dry_sizes() if dry else gpu_sizes()
    known = derive(typed)
    bad = [k for k in overrides if k not in known]
    if bad:
        return typed, [], [f"--set {k}: unknown size (known: {', '.join(sorted(known))})" for k in bad]
    try:  # an override keeps the type of the size it replaces; derived sizes are then computed around it
        s = derive({**typed, **{k: type(known[k])(v) for k, v in overrides.items()}})
    except ValueError as exc:
        return typed, [], [f"--set: {exc}"]
    steps = build_steps(s, dry)
    errs = problems(s, dry)
    if dry:
        if planned_total(steps) > DRY_BUDGET_S:
            errs.append(f"the dry run's caps ({planned_total(steps)}s) exceed its budget ({DRY_BUDGET_S}s)")
    else:
        use = lease(steps)
        if use["free"] < LEASE_FREE_S:
            errs.append(f"the plan leaves {use['free']}s of the {LEASE_S}s lease free (runs {use['run 1']}s + "
                        f"{use['run 2']}s, overhead {use['overhead']}s): at least {LEASE_FREE_S}s must stay free")
        for run in (1, 2):
            if use[f"run {run}"] > RUN_LIMIT_S:
                errs.append(f"run {run}'s caps ({use[f'run {run}']}s) exceed one device command's {RUN_LIMIT_S}s")
    cold = max(shard_estimates(warm=False))
    if not dry and cold > COLD_TESTS_LIMIT_S:
        errs.append(f"the longest test shard is estimated at {cold:.0f}s from a cold cache "
                    f"(> {COLD_TESTS_LIMIT_S}s): rebalance TEST_SHARDS")
    return s, steps, errs


# ------------------------------------------------------------------------------------------ output


def step_total(st: Step) -> int:
    """What a step may take at most: its cap, the SIGTERM-to-SIGKILL grace, and packing $OUT after it."""
    return st.cap_s + st.grace_s + PACK_S


def planned_total(steps: list[Step]) -> int:
    return sum(step_total(st) for st in steps)


def run_steps(steps: list[Step], run: int | None) -> list[Step]:
    """The steps of one run (None: both, in order: a machine with DALI already, or the dry run)."""
    return [st for st in steps if run is None or st.run == run]


def lease(steps: list[Step]) -> dict[str, int]:
    """The lease, second by second: each run's planned total, the overhead outside them, what is left."""
    use = {f"run {r}": planned_total(run_steps(steps, r)) for r in (1, 2)}
    use["overhead"] = sum(LEASE_OVERHEAD_S.values())
    use["free"] = LEASE_S - use["run 1"] - use["run 2"] - use["overhead"]
    return use


def print_plan(s: dict[str, object], steps: list[Step], dry: bool) -> None:
    if dry:
        print("plan (dry run, CPU): " + " ".join(f"{st.name}={st.cap_s}s" for st in steps)
              + f" = {planned_total(steps)}s of {DRY_BUDGET_S}s")
    else:
        use = lease(steps)
        print(f"plan (GPU): run 1 {use['run 1']}s + run 2 {use['run 2']}s + overhead {use['overhead']}s "
              f"({', '.join(f'{k} {v}s' for k, v in LEASE_OVERHEAD_S.items())}) = "
              f"{LEASE_S - use['free']}s of the {LEASE_S}s lease: {use['free']}s free (>= {LEASE_FREE_S}s)")
    for run in (1, 2):
        print(f"run {run}: " + " ".join(f"{st.name}={st.cap_s}s" for st in run_steps(steps, run))
              + f" (each + grace and {PACK_S}s packing) = {planned_total(run_steps(steps, run))}s")
        for st in run_steps(steps, run):
            est = "" if dry else f" (estimate {st.estimate_s:.0f}s x {MARGIN})"
            grace = f", SIGKILL {st.grace_s}s after SIGTERM" if st.grace_s != KILL_GRACE_S else ""
            print(f"  {st.name:<10} cap {st.cap_s:>4}s{est}{grace}: {st.why}")
            for cmd in st.commands:
                print("      " + " ".join(cmd))
    print("sizes: " + ", ".join(f"{k}={v}" for k, v in s.items()))
    if not dry:
        cold, warm = shard_estimates(False), shard_estimates(True)
        pairs = zip(cold, warm, strict=True)
        print("test shards (estimated s, cold / warm): " + ", ".join(f"{c:.0f}/{w:.0f}" for c, w in pairs))
        gib, what = warmup_memory_gib(s)
        print(f"warm-up memory at once: ~{gib:.0f} GiB of {MEMORY_SHARE:.0%} x {H100_GIB} GB ({what})")


def shell_word(word: str) -> str:
    """A bash word: "$VAR..." expands when the suite evals the plan, everything else is literal."""
    if word.startswith("$"):
        return '"' + word.replace('"', '\\"') + '"'
    return shlex.quote(word)


def print_shell(s: dict[str, object], steps: list[Step], dry: bool, run: int | None) -> None:
    chosen = run_steps(steps, run)
    print(f"BUDGET={planned_total(chosen)} PACK={PACK_S}")
    print("STEPS=(" + " ".join(st.name for st in chosen) + ")")
    print("declare -A CAP=(" + " ".join(f"[{st.name}]={st.cap_s}" for st in chosen) + ")")
    print("declare -A GRACE=(" + " ".join(f"[{st.name}]={st.grace_s}" for st in chosen) + ")")
    print("declare -A NCMD=(" + " ".join(f"[{st.name}]={len(st.commands)}" for st in chosen) + ")")
    for st in chosen:
        for i, cmd in enumerate(st.commands):
            print(f"CMD_{st.name}_{i}=(" + " ".join(shell_word(w) for w in cmd) + ")")
    print(f"REAL_BATCH={s['batch']}")


# ------------------------------------------------------------------------------------------ real pairs


def pack_real(src: Path, dest: Path, part_mb: float = REAL_PART_MB, batch: int | None = None) -> list[Path]:
    """Real pairs split into two tars of at most `part_mb` MB each (one per run): every val pair and at
    least one batch of train pairs in the first (run 1 trains the real-data run's graph on them: the
    same train and val batch shapes), then train pairs in name order until both are full."""
    batch = batch or int(gpu_sizes()["batch"])
    by_split = {split: sorted((src / split).glob("*.jpg"), key=lambda p: (len(p.stem), p.stem))
                for split in ("val", "train")}
    files = by_split["val"] + by_split["train"]
    if not files:
        raise SystemExit(f"error: {src}: no val/*.jpg or train/*.jpg pairs")
    limit = part_mb * 1e6 * 0.99 - 10240  # tar: a 512-byte header and padding per file (counted below), end blocks
    parts: list[list[Path]] = [[], []]
    sizes = [0, 0]
    for p in files:
        n = p.stat().st_size + 1024
        i = 0 if sizes[0] + n <= limit else 1
        if sizes[i] + n > limit:
            break
        parts[i].append(p)
        sizes[i] += n
    first_train = sum(p.parent.name == "train" for p in parts[0])
    if len(parts[0]) < len(by_split["val"]) + min(batch, len(by_split["train"])):
        raise SystemExit(f"error: {src}: its {len(by_split['val'])} val pairs and one batch of {batch} train pairs "
                         f"do not fit the first {part_mb} MB part (run 1 warms the real-data run's graph on them)")
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for i, members in enumerate(parts):
        path = dest / f"real-{i}.tar"
        with tarfile.open(path, "w") as tar:
            for p in members:
                tar.add(p, arcname=f"{p.parent.name}/{p.name}")
        out.append(path)
        counts = {sp: sum(p.parent.name == sp for p in members) for sp in ("train", "val")}
        print(f"{path}: {counts['train']} train + {counts['val']} val pairs, {path.stat().st_size / 1e6:.1f} MB")
    left = len(files) - len(parts[0]) - len(parts[1])
    if left:
        print(f"{left} pairs left out: two parts of {part_mb} MB hold {len(files) - left} of {len(files)}")
    print(f"run 1 warms the real-data graph on real-0.tar: {first_train} train + every val pair")
    return out


def transfer_check(dali_dir: Path) -> list[str]:
    """Each run's carried files against the 64 MiB a run may carry (when the parts exist here)."""
    # extras (cityscapesscripts: cityseg.palette imports it) travel with both runs: ~0.3 MB.
    runs = {1: ["part-0", "real-0.tar", "extras"], 2: ["part-1", "real-1.tar", "extras"]}
    out = []
    for run, names in runs.items():
        paths = [dali_dir / n for n in names if (dali_dir / n).exists()]
        mib = CHECKOUT_MIB + sum(du(p) for p in paths) / 2**20
        line = f"run {run}: {' + '.join(p.name for p in paths) or 'nothing from .dali/'} + checkout = {mib:.1f} MiB"
        print(line + f" of {TRANSFER_MIB}")
        if mib > TRANSFER_MIB:
            out.append(line + f": more than the {TRANSFER_MIB} MiB one run carries")
    return out


def du(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ------------------------------------------------------------------------------------------ report head


def report_head(work: Path, status: Path) -> str:
    """REPORT.md's first part: each step's status and time, and the real-data run's figures."""
    lines = ["# GPU suite report", ""]
    rows = list(csv.reader(status.open(), delimiter="\t")) if status.exists() else []
    if rows:
        lines += ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
        lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
        lines.append("")
    summary = work / "real-run" / "summary.json"
    if summary.exists():
        doc = json.loads(summary.read_text())
        lines += ["## Real pairs to a pixel-accuracy target (`cityseg-fast train --data REAL --target-acc ...`)", ""]
        # Today's summary.json fields, and the timing fields issue 21 adds (whichever are present).
        keep = ("device", "precision", "compile", "loader", "steps", "epochs", "images_per_s", "elapsed_s",
                "train_seconds", "startup_s", "warmup_s", "train_s", "val_s", "checkpoint_s", "target_acc",
                "target_reached_train_s", "time_to_pixel_acc_s", "val_scored_at_px")
        lines += [f"- {k}: {json.dumps(doc[k])}" for k in keep if k in doc]
        for part in ("final", "best"):
            lines += [f"- {part}.{k}: {json.dumps(v)}" for k, v in (doc.get(part) or {}).items()
                      if isinstance(v, (int, float, str))]
        lines.append("")
    auto = work / "batch-auto.json"
    if auto.exists():
        doc = json.loads(auto.read_text())
        lines += ["## `cityseg-fast train --batch-size auto`", "", f"- device: {doc.get('device')}",
                  f"- chosen batch (config.json): {doc.get('batch_size')}"]
        lines += [f"- `{ln}`" for ln in doc.get("lines", [])] + [""]
    return "\n".join(lines) + "\n"


def parse_sets(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        for part in item.split():
            if "=" not in part:
                raise SystemExit(f"error: --set {part}: expected NAME=VALUE")
            k, v = part.split("=", 1)
            out[k] = v
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu_plan", description=__doc__.splitlines()[0])
    ap.add_argument("--plan-only", action="store_true", help="print the plan and check its relations")
    ap.add_argument("--shell", action="store_true", help="print the plan as bash for gpu_suite.sh")
    ap.add_argument("--run", choices=("1", "2", "all"), default="all", help="--shell: the steps of this run")
    ap.add_argument("--dry", action="store_true", help="the CPU dry run's plan")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="override a size")
    ap.add_argument("--pack-real", type=Path, metavar="DIR", help="split DIR's pairs into .dali/real-{0,1}.tar")
    ap.add_argument("--dest", type=Path, default=ROOT / ".dali", help="where --pack-real writes (default .dali/)")
    ap.add_argument("--report", type=Path, metavar="WORK", help="print REPORT.md's head for a suite's work dir")
    ap.add_argument("--status", type=Path, help="status.tsv for --report")
    ap.add_argument("--warm-engine", type=Path, metavar="DIR", help="the warm-up's engine-test run (a GPU)")
    ap.add_argument("--build-table", action="store_true", help="build the palette's lookup table into $CITYSEG_CACHE")
    args = ap.parse_args(argv)
    if args.warm_engine:
        return warm_engine(args.warm_engine)
    if args.build_table:
        return build_table()
    if args.pack_real:
        pack_real(args.pack_real, args.dest)
        return 1 if transfer_check(args.dest) else 0
    if args.report:
        sys.stdout.write(report_head(args.report, args.status or args.report / "status.tsv"))
        return 0
    s, steps, errs = plan(args.dry, parse_sets(args.set))
    if args.shell and not errs:
        print_shell(s, steps, args.dry, None if args.run == "all" else int(args.run))
    elif steps:
        print_plan(s, steps, args.dry)
        if args.plan_only and not args.dry:
            errs += transfer_check(ROOT / ".dali")
    for e in errs:
        print(f"error: {e}", file=sys.stderr)
    return 1 if errs else 0


if __name__ == "__main__":
    sys.exit(main())
