"""The GPU suite's plan: every step of `benchmarks/gpu_suite.sh`, its commands, its sizes and its time
cap, with the sizes derived from each other and the caps from costs measured on the H200.

    python -m benchmarks.gpu_plan --plan-only                 # the GPU plan, its relations checked
    python -m benchmarks.gpu_plan --plan-only --dry           # the CPU dry run's plan
    python -m benchmarks.gpu_plan --plan-only --set loader.n=4096   # a changed size: exit 1 on a contradiction
    python -m benchmarks.gpu_plan --shell [--dry]             # what gpu_suite.sh evals (bash arrays)
    python -m benchmarks.gpu_plan --pack-real DIR             # real pairs -> .dali/real-0.tar, .dali/real-1.tar
    python -m benchmarks.gpu_plan --report DIR                # REPORT.md's head: status, plan, real-data run

Sizes are typed once, here: the shell script reads them (`--shell`) and a size that follows from others
(synthetic pairs from the loader's epoch, the warm-up's steps from one epoch...) is computed, never typed.
`--set NAME=VALUE` overrides one (also `PLAN_SET="a=1 b=2"` in gpu_suite.sh's environment); the relations
are checked after overrides, and a contradiction is an `error:` line and exit status 1.

Costs: COSTS below, each with where it was seen. A step's cap is its estimate from those costs times
MARGIN, rounded up to 5 s; the caps plus a kill grace per step must fit BUDGET_S (9 minutes: the machine
is lent for 15, start-up, the first run and idle included). Steps that compile share one inductor/Triton
cache, filled first by the `warmup` step: every compiled configuration a later step runs (the engine test's,
the real-data run's, the train-step sweep's) compiles there, in parallel processes, once.
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

ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = 540  # the whole suite, unpack to archive: 9 of the machine's 15 minutes
DRY_BUDGET_S = 3000  # a loaded 2-core CPU: generous, it checks plumbing, not speed
KILL_GRACE_S = 2  # a step that ignores its timeout's SIGTERM is killed this much later
PACK_S = 1  # after each step the suite rewrites $OUT (archive, REPORT.md): ~1 s of tar and Python
MARGIN = 1.2  # cap = estimate x MARGIN: the costs below vary by ~20 % between runs
TRANSFER_MIB = 64  # what travels with one run: checkout + carried paths (../shared/device/README.md)
CHECKOUT_MIB = 3  # the checkout itself (~2 MB)
REAL_PART_MB = 22  # real pairs beside each ~35 MB DALI part
GPU_CORES = 16  # the GPU machine's CPU cores (loader workers, parallel compiles)

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
    "torch_loader_img_s": 120,  # seen on CPU: plain loader, 0 workers, standard augmentation, 256 px
    "step_ms_per_image_w64": 1.0,  # assumed: width 64, 256 px, eager bf16 (width 32: half)
    "real_step_ms": 40,  # assumed: width 32, batch 16, 256 px, compiled, with the loader
    "nccl_test": 30,  # assumed: torchrun + NCCL init + one small epoch, no compile
    "dali_pipeline": 6,  # assumed: DALI pipeline build + a few batches (import seen at 1 s)
}

# The engine test (tests/test_gpu.py) and the warm-up that compiles its graph: one definition, so the
# test's compile comes from the warm-up's cache. Small shapes: compile time grows with depth (ops), and
# CUDA graphs (reduce-overhead) are the point.
ENGINE_TEST = {"width": 8, "depth": 3, "image_size": 128, "batch_size": 8, "compile_mode": "reduce-overhead",
               "precision": "bf16-mixed", "upsample": "transpose", "norm": "batch"}

# GPU tests: estimated seconds (cold cache, warm cache) per node id or id prefix, and the shards that run
# at once (one pytest process each: Triton compiles are CPU-bound, the machine has 16 cores). Tests not
# named here run in the last shard (every GPU-marked test runs: the last shard deselects the others').


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
    "tests/test_gpu.py::test_one_rank_nccl_ddp_run": (COSTS["nccl_test"], 25),
    "tests/test_gpu.py::test_fp16_with_a_gradient_scaler": (10, 8),
    "tests/test_gpu.py::test_dali_mixed_decode_with_augmentation_matches_the_cpu_pipeline": (8, 6),
    "tests/test_gpu.py::test_device_cache_on_cuda_matches_the_cpu_cache": (10, 8),
    "tests/test_dali_loader.py::test_gpu_mixed_decode_matches_cpu_pipeline": (8, 6),
    "tests/test_gpu.py::test_kernel_on_jpeg_noisy_masks_at_odd_shapes": (15, 5),
    "tests/test_mask_kernel.py::test_gpu_non_integer_centres_differ_only_on_near_ties": (6, 2),
    "tests/test_mask_kernel.py::test_gpu_strided_views_and_ties": (10, 3),
    "tests/test_mask_kernel.py::test_gpu_real_sample_masks": (5, 2),
    **{f"tests/test_mask_kernel.py::test_gpu_matches_reference[{d}-{k}]": KERNEL_PARAM
       for d in ("None", "40.0") for k in (1, 20, 34, 64)},
}
UNKNOWN_TEST = (20, 10)  # a GPU test this table does not know yet
TEST_SHARDS: tuple[tuple[str, ...], ...] = (
    ("tests/test_gpu.py::test_engine_compiled_cuda_graphs_without_recompiles",
     "tests/test_gpu.py::test_real_nvml_sampler_reads_utilisation_and_memory",
     "tests/test_mask_kernel.py::test_gpu_matches_reference[None-1]"),
    ("tests/test_gpu.py::test_one_rank_nccl_ddp_run",
     "tests/test_gpu.py::test_fp16_with_a_gradient_scaler",
     "tests/test_gpu.py::test_dali_mixed_decode_with_augmentation_matches_the_cpu_pipeline",
     "tests/test_gpu.py::test_device_cache_on_cuda_matches_the_cpu_cache",
     "tests/test_dali_loader.py::test_gpu_mixed_decode_matches_cpu_pipeline",
     "tests/test_mask_kernel.py::test_gpu_matches_reference[None-20]"),
    ("tests/test_mask_kernel.py::test_gpu_matches_reference[40.0-20]",
     "tests/test_mask_kernel.py::test_gpu_matches_reference[None-34]",
     "tests/test_mask_kernel.py::test_gpu_matches_reference[40.0-34]",
     "tests/test_mask_kernel.py::test_gpu_non_integer_centres_differ_only_on_near_ties",
     "tests/test_mask_kernel.py::test_gpu_strided_views_and_ties"),
    (),  # the rest: every other GPU-marked test of TEST_FILES
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
        "loader.workers": "0,4,8,16",
        "loader.threads": 8,
        "kernel.batches": "64",  # 64 x 256^2: the kernel, not the launch, is the cost
        "step.widths": "32,64",
        "step.batches": "16,128",
        "step.modes": "off,cudagraphs",
        "step.warmup": 3,
        "step.steps": 10,
        "step.reps": 3,
        "real.target_acc": 0.85,
        "real.train_s": 25,  # --time-budget: training seconds, validation not counted
        # assumed: validation + checkpoints each epoch (160 real train pairs = 10 steps) as long as training
        "real.val_share": 1.0,
        "warmup.steps": 3,  # compiled steps per warm-up process (compile + CUDA-graph recording)
        "tests.shards": len(TEST_SHARDS),
    }


def dry_sizes() -> dict[str, object]:
    """The CPU dry run: the same steps at tiny sizes."""
    return {
        "batch": 4, "image_size": 64, "synth.val": 4,
        "loader.n": 8, "loader.batch": 4, "loader.reps": 1, "loader.workers": "0", "loader.threads": 1,
        "kernel.batches": "1", "step.widths": "4", "step.batches": "2", "step.modes": "off", "step.warmup": 1,
        "step.steps": 1, "step.reps": 1, "real.target_acc": 0.85, "real.train_s": 4, "real.val_share": 0.5,
        "warmup.steps": 2, "tests.shards": len(TEST_SHARDS),
    }


def ints(text: object) -> list[int]:
    return [int(x) for x in str(text).split(",") if x != ""]


def derive(s: dict[str, object]) -> dict[str, object]:
    """Sizes that follow from others; an override (`--set`) of one of these is kept and then checked."""
    d = dict(s)
    d.setdefault("synth.train", d["loader.n"])  # one loader epoch is the synthetic set
    d.setdefault("warmup.steps_per_epoch", int(d["synth.train"]) // int(d["batch"]))
    d.setdefault("loader.batches_per_epoch", int(d["loader.n"]) // int(d["loader.batch"]))
    d.setdefault("step.configs", len(ints(d["step.widths"])) * len(ints(d["step.batches"]))
                 * len(str(d["step.modes"]).split(",")))
    d.setdefault("step.compiles", len(ints(d["step.widths"])) * len(ints(d["step.batches"]))
                 * sum(m != "off" for m in str(d["step.modes"]).split(",")))
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
    unknown = set(str(s["step.modes"]).split(",")) - {"off", "default", "cudagraphs"}
    if unknown:
        out.append(f"step.modes has {', '.join(sorted(unknown))}: expected off, default, cudagraphs")
    if int(s["step.compiles"]) != len(ints(s["step.widths"])) * len(ints(s["step.batches"])) * sum(
            m != "off" for m in str(s["step.modes"]).split(",")):
        out.append(f"step.compiles={s['step.compiles']} does not match widths x batches x compiled modes")
    if int(s["tests.shards"]) != len(TEST_SHARDS):
        out.append(f"tests.shards={s['tests.shards']} but TEST_SHARDS lists {len(TEST_SHARDS)}")
    if not 0 < float(s["real.target_acc"]) <= 1:
        out.append(f"real.target_acc={s['real.target_acc']}: expected a pixel accuracy in (0, 1]")
    return out


# ------------------------------------------------------------------------------------------ steps


@dataclass
class Step:
    """One step: commands run at once (each a list of words; "$VAR" words expand in the shell)."""

    name: str
    estimate_s: float  # from COSTS and the sizes (GPU); 0 in the dry run
    commands: list[list[str]]
    why: str
    cap_s: int = 0
    env: dict[str, str] = field(default_factory=dict)


def ceil5(x: float) -> int:
    return int(5 * math.ceil(x / 5))


def shard_ids(i: int) -> tuple[str, ...]:
    return TEST_SHARDS[i]


def test_estimate(ids: tuple[str, ...], warm: bool) -> float:
    k = 1 if warm else 0
    return PYTEST_START[k] + sum(TEST_COSTS.get(t, UNKNOWN_TEST)[k] for t in ids)


def rest_estimate(warm: bool) -> float:
    named = {t for shard in TEST_SHARDS for t in shard}
    k = 1 if warm else 0
    return PYTEST_START[k] + sum(c[k] for t, c in TEST_COSTS.items() if t not in named)


def shard_estimates(warm: bool) -> list[float]:
    return [test_estimate(ids, warm) if ids else rest_estimate(warm) for ids in TEST_SHARDS]


def test_commands(junit_dir: str) -> list[list[str]]:
    """One pytest per shard; the last runs every GPU test the others do not name."""
    named = [t for shard in TEST_SHARDS for t in shard]
    # -v: a shard cut by its cap still shows which tests passed; --durations: the costs for TEST_COSTS.
    base = ["$PYTHON", "-m", "pytest", "-m", "gpu", "-v", "--durations=0", "-p", "no:cacheprovider"]
    cmds = []
    for i, ids in enumerate(TEST_SHARDS):
        junit = ["--junitxml", f"{junit_dir}/pytest-gpu-{i}.xml"]
        if ids:
            cmds.append(base + junit + list(ids))
        else:
            cmds.append(base + junit + list(TEST_FILES) + [w for t in named for w in ("--deselect", t)])
    return cmds


def engine_flags(cfg: dict[str, object]) -> list[str]:
    """`cityseg-fast train` flags that give ENGINE_TEST's compiled graph."""
    return ["--width", str(cfg["width"]), "--depth", str(cfg["depth"]), "--image-size", str(cfg["image_size"]),
            "--batch-size", str(cfg["batch_size"]), "--compile", "--compile-mode", str(cfg["compile_mode"]),
            "--precision", str(cfg["precision"]), "--upsample", str(cfg["upsample"]), "--norm", str(cfg["norm"])]


def real_flags(s: dict[str, object], dry: bool) -> list[str]:
    """The real-data run's model and batch flags: the product's defaults with --data (typed here once,
    so its warm-up compiles the same graph)."""
    flags = ["--batch-size", str(s["batch"]), "--image-size", str(s["image_size"])]
    return flags + (["--width", "4", "--depth", "2", "--no-compile"] if dry else [])


def train_cmd(data: str, out: str, flags: list[str], steps: int) -> list[str]:
    return ["$PYTHON", "-m", "cityseg", "train", "--data", data, "--out", out, "--epochs", "1", "--max-steps",
            str(steps), "--skip-validate", "--no-tensorboard", "--log-every", "1", *flags]


def step_sweep_args(s: dict[str, object]) -> list[str]:
    return ["--widths", str(s["step.widths"]), "--batches", str(s["step.batches"]), "--compile-modes",
            str(s["step.modes"]), "--size", str(s["image_size"]), "--warmup", str(s["step.warmup"]),
            "--steps", str(s["step.steps"]), "--reps", str(s["step.reps"])]


def build_steps(s: dict[str, object], dry: bool) -> list[Step]:
    """Every step in run order (the most wanted figures first: a cut loses the least)."""
    c = COSTS
    py = c["python_start"]
    synth_n = int(s["synth.train"]) + int(s["synth.val"])
    # The dry run compiles nothing (inductor's C++ build takes minutes on 2 cores): plumbing only.
    engine = real_flags(s, dry) if dry else engine_flags(ENGINE_TEST)
    warm = [train_cmd("$DATA", "$WORK/warm/engine-test", engine, int(s["warmup.steps"])),
            train_cmd("$DATA", "$WORK/warm/real", real_flags(s, dry), int(s["warmup.steps"]))]
    if not dry:  # each compiled train-step config in its own process: the sweep then finds it cached
        for w in ints(s["step.widths"]):
            for b in ints(s["step.batches"]):
                for m in str(s["step.modes"]).split(","):
                    if m != "off":
                        warm.append(["$PYTHON", "-m", "benchmarks.train_step", "--widths", str(w), "--batches", str(b),
                                     "--compile-modes", m, "--size", str(s["image_size"]), "--warmup", "1",
                                     "--steps", "1", "--reps", "1",
                                     "--json", f"$WORK/warm/train_step-{w}-{b}-{m}.json"])
    max_steps = max(1, int(float(s["real.train_s"]) * 1000 / c["real_step_ms"]))
    loaders = len(ints(s["loader.workers"])) + 3  # + dali-cpu, dali-gpu, cache
    loader_epochs = 1 + int(s["loader.reps"])
    # Plain loaders: start-up, then epochs at the one-core rate times ~0.8 per worker; DALI/cache: a build.
    torch_s = sum(2 + loader_epochs * int(s["loader.n"]) / (c["torch_loader_img_s"] * max(1.0, 0.8 * w))
                  for w in ints(s["loader.workers"]))
    sweep_steps = int(s["step.warmup"]) + int(s["step.steps"]) * int(s["step.reps"])
    modes = str(s["step.modes"]).split(",")
    sweep_s = len(modes) * sum(sweep_steps * b * c["step_ms_per_image_w64"] * w / 64 / 1000
                               for w in ints(s["step.widths"]) for b in ints(s["step.batches"]))
    steps = [
        Step("unpack", c["unpack"] + 2, [["unpack"]],
             "DALI parts into site-packages, real pairs into one folder (in the suite's own shell)"),
        Step("env", c["cold_start"] + 5, [["environment"]],
             "nvidia-smi, first import torch, CUDA init on a cold machine"),
        Step("synth", py + synth_n / (c["synth_pairs_per_s_core"] * GPU_CORES) + 2,
             [["$PYTHON", "-m", "cityseg", "synth", "--out", "$DATA", "--train", str(s["synth.train"]), "--val",
               str(s["synth.val"]), "--size", str(s["image_size"]), "--workers", "$CORES"]],
             f"synthetic pairs: {s['synth.train']} train (one loader epoch) + {s['synth.val']} val"),
        Step("warmup", py + c["engine_compile_cold"] * c["parallel_compile_slowdown"] + 5, warm,
             f"{len(warm)} compiles at once into the shared caches: the engine test's graph, the real-data "
             f"run's, and {s['step.compiles']} train-step configs"),
        # Capped for a cold cache: the tests finish even when the warm-up failed to fill it.
        Step("tests", max(shard_estimates(warm=False)) / MARGIN * 1.1, test_commands("$WORK"),
             f"{len(TEST_SHARDS)} pytest shards at once; longest estimate {max(shard_estimates(False)):.0f}s cold, "
             f"{max(shard_estimates(True)):.0f}s warm"),
        Step("kernel", py + 6 * c["triton_compile"] + 4 * 2 * 0.5 * len(ints(s["kernel.batches"])),
             [["$PYTHON", "-m", "benchmarks.mask_kernel", "--batches", str(s["kernel.batches"]),
               *(["--cpu", "--reps", "5"] if dry else []), "--json", "$WORK/mask_kernel-$KIND.json"]],
             f"mask kernel at {s['kernel.batches']} x {s['image_size']}^2: 3 pinned blocks + uint8 + 2 SASS counts "
             "= 6 Triton compiles"),
        Step("loader", py + 3 * c["dali_pipeline"] + torch_s,
             [["$PYTHON", "-m", "benchmarks.loader", "--data", "$DATA", "--device", "$DEVICE", "--n",
               str(s["loader.n"]), "--batch-size", str(s["loader.batch"]), "--image-size", str(s["image_size"]),
               "--reps", str(s["loader.reps"]), "--workers", str(s["loader.workers"]), "--threads",
               str(s["loader.threads"]), "--augment", "standard", "--json", "$WORK/loader-$KIND.json"]],
             f"{loaders} loaders x {loader_epochs} epochs of {s['loader.n']} images"),
        Step("real_e2e", py + c["engine_compile_warm"] + float(s["real.train_s"]) * (1 + float(s["real.val_share"])),
             [["real_e2e", "$PYTHON", "-m", "cityseg", "train", "--data", "$REAL", "--out", "$WORK/real-run",
               "--target-acc", str(s["real.target_acc"]), "--time-budget", str(s["real.train_s"]),
               *real_flags(s, dry), *(["--max-steps", "3"] if dry else [])]],
             f"real pairs to pixel accuracy {s['real.target_acc']} within {s['real.train_s']}s of training "
             f"(~{max_steps} steps at {c['real_step_ms']} ms)"),
        Step("train_step", py + int(s["step.compiles"]) * c["engine_compile_warm"] + sweep_s,
             [["$PYTHON", "-m", "benchmarks.train_step", *(["--quick"] if dry else step_sweep_args(s)),
               "--device", "$DEVICE", "--json", "$WORK/train_step-$KIND.json"]],
             f"{s['step.configs']} configs ({s['step.compiles']} compiled, from the warm-up's cache)"),
        Step("report", py + 2, [["$PYTHON", "-m", "benchmarks.report", "--results", "$WORK", "--out",
                                 "$WORK/benchmarks-report.md"]],
             "benchmarks.report over the results; the suite then packs $OUT"),
    ]
    for st in steps:
        st.cap_s = dry_cap(st.name) if dry else max(10, ceil5(st.estimate_s * MARGIN))
    return steps


def dry_cap(name: str) -> int:
    """Dry-run caps: a loaded 2-core CPU, several processes at once in `warmup` and `tests`."""
    return {"env": 120, "unpack": 60, "synth": 180, "warmup": 400, "tests": 600, "real_e2e": 400,
            "report": 180}.get(name, 300)


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
    budget = DRY_BUDGET_S if dry else BUDGET_S
    total = planned_total(steps)
    if total > budget:
        errs.append(f"the plan's caps ({total}s with {KILL_GRACE_S + PACK_S}s kill grace and packing each) "
                    f"exceed the budget ({budget}s)")
    cold = max(shard_estimates(warm=False))
    if not dry and cold > COLD_TESTS_LIMIT_S:
        errs.append(f"the longest test shard is estimated at {cold:.0f}s from a cold cache "
                    f"(> {COLD_TESTS_LIMIT_S}s): rebalance TEST_SHARDS")
    return s, steps, errs


# ------------------------------------------------------------------------------------------ output


def planned_total(steps: list[Step]) -> int:
    return sum(st.cap_s + KILL_GRACE_S + PACK_S for st in steps)


def print_plan(s: dict[str, object], steps: list[Step], dry: bool) -> None:
    budget = DRY_BUDGET_S if dry else BUDGET_S
    print(f"plan ({'dry run, CPU' if dry else 'GPU'}): " + " ".join(f"{st.name}={st.cap_s}s" for st in steps)
          + f" (+{KILL_GRACE_S + PACK_S}s kill grace and packing each) = {planned_total(steps)}s of {budget}s")
    for st in steps:
        est = "" if dry else f" (estimate {st.estimate_s:.0f}s x {MARGIN})"
        print(f"  {st.name:<10} cap {st.cap_s:>4}s{est}: {st.why}")
        for cmd in st.commands:
            print("      " + " ".join(cmd))
    print("sizes: " + ", ".join(f"{k}={v}" for k, v in s.items()))
    if not dry:
        cold, warm = shard_estimates(False), shard_estimates(True)
        pairs = zip(cold, warm, strict=True)
        print("test shards (estimated s, cold / warm): " + ", ".join(f"{c:.0f}/{w:.0f}" for c, w in pairs))


def shell_word(word: str) -> str:
    """A bash word: "$VAR..." expands when the suite evals the plan, everything else is literal."""
    if word.startswith("$"):
        return '"' + word.replace('"', '\\"') + '"'
    return shlex.quote(word)


def print_shell(s: dict[str, object], steps: list[Step], dry: bool) -> None:
    print(f"BUDGET={DRY_BUDGET_S if dry else BUDGET_S} KILL_GRACE={KILL_GRACE_S} PACK={PACK_S}")
    print("STEPS=(" + " ".join(st.name for st in steps) + ")")
    print("declare -A CAP=(" + " ".join(f"[{st.name}]={st.cap_s}" for st in steps) + ")")
    print("declare -A NCMD=(" + " ".join(f"[{st.name}]={len(st.commands)}" for st in steps) + ")")
    for st in steps:
        for i, cmd in enumerate(st.commands):
            print(f"CMD_{st.name}_{i}=(" + " ".join(shell_word(w) for w in cmd) + ")")
    print(f"REAL_BATCH={s['batch']}")


# ------------------------------------------------------------------------------------------ real pairs


def pack_real(src: Path, dest: Path, part_mb: float = REAL_PART_MB) -> list[Path]:
    """Real pairs split into two tars of at most `part_mb` MB each (one per run): every val pair first
    (the accuracy target is measured on them), then train pairs in name order until both are full."""
    files = [p for split in ("val", "train") for p in sorted((src / split).glob("*.jpg"),
                                                             key=lambda p: (len(p.stem), p.stem))]
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
    return out


def transfer_check(dali_dir: Path) -> list[str]:
    """Each run's carried files against the 64 MiB a run may carry (when the parts exist here)."""
    runs = {1: ["part-0", "real-0.tar"], 2: ["part-1", "real-1.tar", "extras"]}
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
    ap.add_argument("--dry", action="store_true", help="the CPU dry run's plan")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="override a size")
    ap.add_argument("--pack-real", type=Path, metavar="DIR", help="split DIR's pairs into .dali/real-{0,1}.tar")
    ap.add_argument("--dest", type=Path, default=ROOT / ".dali", help="where --pack-real writes (default .dali/)")
    ap.add_argument("--report", type=Path, metavar="WORK", help="print REPORT.md's head for a suite's work dir")
    ap.add_argument("--status", type=Path, help="status.tsv for --report")
    args = ap.parse_args(argv)
    if args.pack_real:
        pack_real(args.pack_real, args.dest)
        return 1 if transfer_check(args.dest) else 0
    if args.report:
        sys.stdout.write(report_head(args.report, args.status or args.report / "status.tsv"))
        return 0
    s, steps, errs = plan(args.dry, parse_sets(args.set))
    if args.shell and not errs:
        print_shell(s, steps, args.dry)
    elif steps:
        print_plan(s, steps, args.dry)
        if args.plan_only and not args.dry:
            errs += transfer_check(ROOT / ".dali")
    for e in errs:
        print(f"error: {e}", file=sys.stderr)
    return 1 if errs else 0


if __name__ == "__main__":
    sys.exit(main())
