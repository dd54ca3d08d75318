"""Benchmarks: each script runs in-process at the tiniest sizes and writes the common JSON layout (its
schema is checked, never its speed); the report keeps CPU and GPU apart; `cityseg-fast bench` passes
options through; the GPU suite's plan holds (and a contradicting size fails it), its dry run passes on a
CPU, it unpacks what the two runs on the GPU machine carry, and a missing DALI fails only the DALI tests."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
import typer.main
from typer.testing import CliRunner

from benchmarks import common, end_to_end, gpu_plan, loader, report, train_step
from cityseg.cli import bench
from cityseg.cli.bench import bench_app
from cityseg.data.synth import write_dataset
from tests.cli_process import assert_one_line, run_cli
from tests.conftest import ROOT

DEVICE_KIND = "gpu" if torch.cuda.is_available() else "cpu"  # what the benchmarks pick by default


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("bench") / "data", n_train=8, n_val=2, seed=0, size=64)


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> Path:
    """One tiny run of each benchmark, written to one results folder."""
    out = tmp_path_factory.mktemp("results")
    loader.run(["--data", str(tiny_data), "--n", "8", "--batch-size", "4", "--image-size", "64", "--reps", "2",
                "--workers", "0", "--threads", "1", "--augment", "standard,none",
                "--json", str(out / "loader-cpu.json")])
    train_step.run(["--quick", "--json", str(out / "train_step-cpu.json")])
    end_to_end.run(["--data", str(tiny_data), "--steps", "7", "--warm-steps", "2", "--width", "4", "--depth", "2",
                    "--size", "64", "--batch", "1", "--workers", "0", "--json", str(out / "end_to_end-cpu.json")])
    return out


def check_layout(path: Path, benchmark: str, reps: int) -> dict:
    doc = json.loads(path.read_text())
    assert set(common.RESULT_KEYS) <= doc.keys()
    assert doc["benchmark"] == benchmark and doc["device_kind"] == DEVICE_KIND and doc["complete"] is True
    assert doc["command"].startswith(f"python -m benchmarks.{path.stem.rsplit('-', 1)[0]} ")
    assert {"torch", "python"} <= doc["versions"].keys() and doc["machine"]["cpu_count"] >= 1
    assert doc["results"]
    for row in doc["results"]:
        assert isinstance(row["unit"], str) and len(row["reps"]) == reps
        assert all(isinstance(v, float) and v > 0 for v in row["reps"])
        assert row["median"] == pytest.approx(statistics.median(row["reps"]))
    return doc


def test_loader_json(results: Path) -> None:
    doc = check_layout(results / "loader-cpu.json", "loader", reps=2)
    labels = {(r["augment"], r["label"]) for r in doc["results"]}
    expected = {"torch w0", "cache", "dali-cpu"} | ({"dali-gpu"} if torch.cuda.is_available() else set())
    assert labels == {(a, name) for a in ("standard", "none") for name in expected}
    if not torch.cuda.is_available():
        assert any("dali-gpu skipped" in n for n in doc["notes"])
    for row in doc["results"]:
        assert row["images_per_epoch"] == 8 and len(row["rep_seconds"]) == 2 and len(row["warmup_epoch_s"]) == 1
        assert row["setup_s"] >= 0 and row["time_to_first_batch_s"] > 0
        assert row["ratio_vs_torch_w2"] is None  # w2 was not measured: no ratio made up
        assert row["best_torch"] == "torch w0"
        if row["label"] == "torch w0":
            assert row["ratio_vs_best_torch"] == 1.0


def test_loader_ratios_within_one_group() -> None:
    rows = [{"loader": "torch", "workers": w, "label": f"torch w{w}", "median": m} for w, m in ((0, 10.0), (2, 40.0),
                                                                                               (4, 50.0))]
    rows.append({"loader": "dali-cpu", "workers": 2, "label": "dali-cpu", "median": 80.0})
    loader.add_ratios(rows)
    assert rows[-1]["ratio_vs_torch_w2"] == 2.0 and rows[-1]["ratio_vs_best_torch"] == 1.6
    assert rows[1]["ratio_vs_torch_w2"] == 1.0 and rows[-1]["best_torch"] == "torch w4"


def test_default_worker_list() -> None:
    assert loader.default_workers(2) == [0, 1, 2]
    assert loader.default_workers(16) == [0, 1, 2, 3, 4, 8, 16]
    assert loader.default_workers(12) == [0, 1, 2, 3, 4, 8, 12]


def test_train_step_json(results: Path) -> None:
    doc = check_layout(results / "train_step-cpu.json", "train_step", reps=1)
    assert [(r["compile_mode"], r["loss"]) for r in doc["results"]] == [
        ("off", "ce"), ("off", "ce+dice"), ("default", "ce"), ("default", "ce+dice")]
    for row in doc["results"]:
        assert row["unit"] == "ms/step" and row["images_per_s"] > 0 and len(row["first_steps_s"]) == 1
        assert (row["compile_s"] is not None) == (row["compile_mode"] != "off")
        assert row["gflop_per_step"] > 0 and row["tflops"] > 0 and row["vs_ce"] > 0
    assert doc["config"]["compile_backend"] == "eager" and doc["config"]["upsample"] == "bilinear"
    assert doc["config"]["precision"] == ("bf16-mixed" if common.cpu_bf16_native() else "32")


def test_train_step_times_an_encoder_with_its_depthwise_convs_both_ways(tmp_path: Path) -> None:
    """--encoders adds a timm backbone beside our U-Net; --depthwise fp32,bf16 really builds both steps
    (the depthwise convs in fp32 under CPU autocast, as training runs them, and left as timm has them)."""
    doc = train_step.run(["--encoders", "unet,tf_efficientnet_lite0", "--widths", "4", "--batches", "2", "--size", "32",
                          "--depth", "2", "--losses", "ce", "--depthwise", "fp32,bf16", "--compile-modes", "off",
                          "--reps", "1", "--warmup", "1", "--threads", "1", "--json", str(tmp_path / "ts.json")])
    rows = [(r["encoder"], r["depthwise"], r["variant"]) for r in doc["results"]]
    assert rows == [("unet", None, "off ce"), ("tf_efficientnet_lite0", "fp32", "off ce dw-fp32"),
                    ("tf_efficientnet_lite0", "bf16", "off ce dw-bf16")]
    assert doc["results"][1]["vs_depthwise_fp32"] == 1.0 and doc["results"][2]["vs_depthwise_fp32"] > 0
    assert doc["config"]["threads"] == 1 and doc["config"]["encoders"] == ["unet", "tf_efficientnet_lite0"]
    cell = train_step.Cell(4, 2, 2, 32, "tf_efficientnet_lite0")
    for depthwise in ("fp32", "bf16"):
        step, _ = train_step.build_step(train_step.product_config(cell, "ce"), torch.device("cpu"), "off", "inductor",
                                        depthwise)
        convs = [m for m in step.model.encoder.modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            dtypes = {conv(torch.randn(1, conv.in_channels, 8, 8, dtype=torch.bfloat16)).dtype for conv in convs}
        assert len(convs) == 16 and dtypes == {torch.float32 if depthwise == "fp32" else torch.bfloat16}


def test_end_to_end_json(results: Path) -> None:
    doc = check_layout(results / "end_to_end-cpu.json", "end_to_end", reps=1)
    loaders = [r["loader"] for r in doc["results"]]
    assert loaders[0] == "torch" and "dali" in loaders
    for row in doc["results"]:
        assert 0 <= row["data_wait_share"] <= 1 and row["time_to_first_batch_s"] > 0
        assert (row["gpu_util"] is None) == (DEVICE_KIND == "cpu")
        run = row["runs"][0]
        assert run["steps"] == 7 and len(run["warm_steps_s"]) == 2 and run["images_per_s_warmup_excluded"]
        assert row["compile_s"] is None  # compile is off on CPU by default


def test_report_keeps_cpu_and_gpu_apart(results: Path, tmp_path: Path) -> None:
    folder = tmp_path / "results"
    folder.mkdir()
    for p in results.glob("*.json"):
        (folder / p.name).write_text(p.read_text())
    gpu = json.loads((results / "loader-cpu.json").read_text())
    gpu.update(device="NVIDIA H100 80GB HBM3", device_kind="gpu", complete=False)
    (folder / "loader-gpu.json").write_text(json.dumps(gpu))
    (folder / "mask_kernel-cpu.json").write_text((ROOT / "benchmarks/results/mask_kernel-cpu.json").read_text())
    (folder / "junk.json").write_text("[1, 2]")
    text = report.build(folder, folder / "REPORT.md")
    cpu_part, gpu_part = text.split("\n## CPU\n")[1].split("\n## GPU\n")
    assert "H100" not in cpu_part and "H100" in gpu_part
    for name in ("loader", "train_step", "end_to_end", "mask_kernel"):
        assert f"### {report.TITLES[name]} — cpu" in cpu_part
    assert gpu_part.count("### ") == 1 and "Incomplete run" in gpu_part
    assert "| standard | torch w0 | cpu |" in cpu_part
    assert "Not read (unknown layout): junk.json" in text
    assert (folder / report.PNG_NAME).stat().st_size > 0 and f"]({report.PNG_NAME})" in text


# The smallest loader run there is: 2 synthetic 32 px pairs, one batch, the plain loader only.
TINY_LOADER = ["--n", "2", "--batch-size", "2", "--reps", "1", "--loaders", "torch", "--workers", "0", "--synth-size",
               "32", "--image-size", "32", "--augment", "none"]
BENCH_DEADLINE_S = 180  # one benchmark process at its smallest, on a loaded 2-core machine: never a speed check


def checkout_results() -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in common.RESULTS.iterdir() if p.is_file()}


def test_bench_help_is_the_modules_own(tmp_path: Path) -> None:
    """`cityseg-fast bench loader --help` (the installed command) is the module's own argparse help,
    under the command's name: the options `python -m benchmarks.loader --help` lists from the
    checkout's root, flags bench.py never declared included."""
    env = {"COLUMNS": "100"}
    # Outside the checkout: were --help lost on the way, the benchmark run would not touch its results.
    done = run_cli(["bench", "loader", "--help"], cwd=tmp_path, env=env, timeout=BENCH_DEADLINE_S)
    assert done.returncode == 0, done.output
    assert done.stdout.startswith("usage: cityseg-fast bench loader [-h]"), done.stdout
    assert all(flag in done.stdout for flag in ("--synth-size", "--max-workers", "--overwrite")), done.stdout
    direct = subprocess.run([sys.executable, "-m", "benchmarks.loader", "--help"], cwd=ROOT, capture_output=True,
                            text=True, timeout=BENCH_DEADLINE_S, env={**os.environ, **env})
    assert direct.returncode == 0, direct.stderr
    assert direct.stdout.startswith("usage: python -m benchmarks.loader [-h]")
    assert "╭─ Options" in done.stdout  # drawn like every other `cityseg-fast --help`
    assert direct.stdout.split("╭─ Options")[1] == done.stdout.split("╭─ Options")[1]


def test_every_bench_subcommand_is_its_modules_command_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each `bench NAME --help` is the help of NAME's module (its argparse, given the arguments as
    typed), with a help text for every option; bench.py declares no option of its own (a second
    definition of a benchmark's flag or default would drift from the module's), and no benchmark
    edits sys.path."""
    helped: list[argparse.ArgumentParser] = []
    draw = common.BenchParser.format_help

    def recording(parser: common.BenchParser) -> str:
        helped.append(parser)
        return draw(parser)

    monkeypatch.setattr(common.BenchParser, "format_help", recording)
    group = typer.main.get_command(bench_app)
    assert set(group.commands) == set(bench.BENCHMARKS)
    for name, (module, _) in bench.BENCHMARKS.items():
        command = group.commands[name]
        assert not command.params and not command.add_help_option, f"bench {name} declares options of its own"
        result = CliRunner().invoke(bench_app, [name, "--help"])
        assert result.exit_code == 0, result.output
        own = io.StringIO()
        with contextlib.redirect_stdout(own), pytest.raises(SystemExit):
            importlib.import_module(f"benchmarks.{module}").main(["--help"], prog=f"cityseg-fast bench {name}")
        assert result.output == own.getvalue()
        for action in helped[-1]._actions:  # the parser that drew this help: every option explained
            assert action.help, f"bench {name}: {'/'.join(action.option_strings) or action.dest} has no help text"
    assert "typer.Option" not in Path(bench.__file__).read_text()
    assert not [p.name for p in (ROOT / "benchmarks").glob("*.py") if "sys.path" in p.read_text()]


@pytest.mark.timeout(4 * BENCH_DEADLINE_S + 60)
def test_bench_passes_arguments_through_and_keeps_the_output_policy(tmp_path: Path) -> None:
    """As a user runs it from their own folder: every argument reaches the loader benchmark, the
    relative --json lands in that folder, a second run refuses to replace it (one line) unless
    --overwrite, and without --json the result goes to that folder too, never into the checkout."""
    before = checkout_results()
    args = [*TINY_LOADER, "--json", "rel/out.json"]
    done = run_cli(["bench", "loader", *args], cwd=tmp_path, timeout=BENCH_DEADLINE_S)
    assert done.returncode == 0, done.output
    doc = json.loads((tmp_path / "rel" / "out.json").read_text())
    assert doc["command"] == shlex.join(["python", "-m", "benchmarks.loader", *args])
    assert doc["config"]["n_images"] == 2 and doc["config"]["image_size"] == 32
    assert [r["label"] for r in doc["results"]] == ["torch w0"]
    assert_one_line(run_cli(["bench", "loader", *args], cwd=tmp_path, timeout=BENCH_DEADLINE_S),
                    str(tmp_path / "rel" / "out.json"), "already exists", "--overwrite")
    done = run_cli(["bench", "loader", *args, "--overwrite"], cwd=tmp_path, timeout=BENCH_DEADLINE_S)
    assert done.returncode == 0, done.output
    done = run_cli(["bench", "loader", *TINY_LOADER], cwd=tmp_path, timeout=BENCH_DEADLINE_S)
    assert done.returncode == 0, done.output
    assert json.loads((tmp_path / f"loader-{DEVICE_KIND}.json").read_text())["complete"] is True
    assert checkout_results() == before


def test_bench_all_runs_each_benchmark_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`bench all --data D --json DIR`: loader, kernel, train step, end to end, then the report of DIR,
    each with its result file in DIR; every file already in DIR is refused before the first runs."""
    from benchmarks import mask_kernel

    calls: list[tuple[str, list[str]]] = []
    for module in (loader, mask_kernel, train_step, end_to_end, report):
        monkeypatch.setattr(module, "main", lambda argv, prog=None, m=module: calls.append((m.__name__, argv)) or 0)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(bench_app, ["all", "--data", "D", "--json", "out"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    assert calls == [
        ("benchmarks.loader", ["--data", "D", "--json", str(out / f"loader-{DEVICE_KIND}.json")]),
        ("benchmarks.mask_kernel", ["--json", str(out / f"mask_kernel-{DEVICE_KIND}.json")]),
        ("benchmarks.train_step", ["--json", str(out / f"train_step-{DEVICE_KIND}.json")]),
        ("benchmarks.end_to_end", ["--data", "D", "--json", str(out / f"end_to_end-{DEVICE_KIND}.json")]),
        ("benchmarks.report", ["--results", str(out)]),
    ]
    calls.clear()
    (out / "REPORT.md").write_text("the user's report")
    result = CliRunner().invoke(bench_app, ["all", "--json", "out"])
    assert result.exit_code != 0 and "REPORT.md: already exists" in str(result.exception) and not calls


SUITE_DEADLINE_S = gpu_plan.DRY_BUDGET_S + 300  # the dry run's own budget plus start-up: never a speed check


def suite_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    # The compile caches and scratch space go under tmp_path: a test never touches ~/.cache.
    return {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "out"), "TMPDIR": str(tmp_path),
            "SUITE_CACHE": str(tmp_path / "cache"), "KEEP_DIR": str(tmp_path / "keep"), **extra}


@pytest.mark.slow
@pytest.mark.timeout(SUITE_DEADLINE_S + 120)  # its subprocess has its own, shorter deadline
def test_gpu_suite_dry_run(tmp_path: Path) -> None:
    """The suite's every step on a CPU at tiny sizes, from its own plan: only the GPU parts are left
    untested. $OUT ends with the few files a GPU run returns, everything else in one archive."""
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_suite.sh")], env=suite_env(tmp_path, DRY_RUN="1"),
                          capture_output=True, text=True, timeout=SUITE_DEADLINE_S)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    _, steps, errors = gpu_plan.plan(dry=True, overrides={})
    assert not errors
    status = [line.split("\t") for line in (out / "status.tsv").read_text().splitlines()[1:]]
    assert [row[:2] for row in status] == [["ok", st.name] for st in steps]
    assert all(int(row[3]) <= st.cap_s for row, st in zip(status, steps, strict=True))  # each under its planned cap
    assert sorted(p.name for p in out.iterdir()) == ["REPORT.md", "gpu-results.tar.gz", "status.tsv", "suite.log"]
    with tarfile.open(out / "gpu-results.tar.gz") as tar:
        names = {Path(n).name for n in tar.getnames()}
        docs = {n: json.load(tar.extractfile(m)) for m in tar.getmembers() if (n := Path(m.name).name) in
                ("loader-cpu.json", "train_step-cpu.json", "mask_kernel-cpu.json", "real-summary.json")}
    assert {f"pytest-gpu-{i}.xml" for i in range(len(gpu_plan.TEST_SHARDS))} <= names
    assert {"env.txt", "suite.log", "benchmarks-report.md"} <= names and not any(n.endswith(".pt") for n in names)
    for name in ("loader-cpu.json", "train_step-cpu.json", "mask_kernel-cpu.json"):
        assert docs[name]["complete"] is True
    assert docs["real-summary.json"]["steps"] == 3  # the real-data run ran (cut at --max-steps in the dry run)
    report_text = (out / "REPORT.md").read_text()
    assert "| ok | real_e2e |" in report_text and "## CPU" in report_text
    assert re.search(rf"^plan \(dry run, CPU\): .* = (\d+)s of {gpu_plan.DRY_BUDGET_S}s$", proc.stdout, re.M)


def test_gpu_plan_only_checks_its_relations() -> None:
    """`--plan-only` as a user runs it: the GPU plan holds and leaves >= 150 s of the lease free; a
    contradicting size (fewer synthetic pairs than the loader's epoch reads, more warm-up steps than one
    epoch has, a real-data run too long for the lease) fails it."""
    cmd = [sys.executable, "-m", "benchmarks.gpu_plan", "--plan-only"]
    ok = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    used, lease, free = map(int, re.search(r"^plan \(GPU\): .* = (\d+)s of the (\d+)s lease: (\d+)s free",
                                           ok.stdout, re.M).groups())
    assert lease == 900 and free == lease - used >= 150
    sizes, steps, _ = gpu_plan.plan(dry=False, overrides={})
    assert sizes["synth.train"] == sizes["loader.n"]  # derived, not typed
    assert sizes["warmup.steps_per_epoch"] == sizes["synth.train"] // sizes["batch"]
    assert [st.name for st in steps][:3] == ["stash", "prepare", "warmup"]  # the compile warm-up first
    bad = subprocess.run(cmd + ["--set", "synth.train=40"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1
    assert "error: loader.n=256 > synth.train=40" in bad.stderr
    assert "warmup.steps=3 > 2 steps in one epoch (synth.train 40 / batch 16)" in bad.stderr
    bad = subprocess.run(cmd + ["--set", "loader.n=300"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "loader.n=300 is not a multiple of loader.batch=32" in bad.stderr
    bad = subprocess.run(cmd + ["--set", "real.train_s=200"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "of the 900s lease free" in bad.stderr and "at least 150s must stay" in bad.stderr
    unknown = subprocess.run(cmd + ["--set", "nonsense=1"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert unknown.returncode == 1 and "error: --set nonsense: unknown size" in unknown.stderr


@pytest.mark.timeout(420)  # its subprocess has its own, shorter deadline
def test_gpu_suite_stops_on_a_contradicting_plan(tmp_path: Path) -> None:
    env = suite_env(tmp_path, DRY_RUN="1", PLAN_SET="synth.train=2")
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_suite.sh")], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 1 and "the plan does not hold" in proc.stdout + proc.stderr
    assert "loader.n=8 > synth.train=2" in proc.stdout + proc.stderr


@pytest.mark.timeout(720)  # its subprocess has its own, shorter deadline
def test_gpu_plan_fits_the_gpu_tests_in_their_window() -> None:
    """Every shard's estimate from a cold cache is within 150 s, every GPU test the plan names exists
    (a renamed test would leave its shard empty), and the last shard runs whatever the others do not."""
    assert max(gpu_plan.shard_estimates(warm=False)) <= gpu_plan.COLD_TESTS_LIMIT_S
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu", "-p",
                           "no:cacheprovider", *gpu_plan.TEST_FILES], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    collected = {ln for ln in proc.stdout.splitlines() if "::" in ln}
    named = gpu_plan.named_tests()  # both runs' shards
    assert len(named) == len(set(named))
    for t in named:
        assert any(c == t or c.startswith(t + "[") for c in collected), f"{t}: no such GPU test"
    assert {"tests/test_gpu.py", "tests/test_dali_loader.py", "tests/test_mask_kernel.py"} <= set(gpu_plan.TEST_FILES)
    unplanned = {c if c in gpu_plan.TEST_COSTS else c.split("[")[0] for c in collected} - set(gpu_plan.TEST_COSTS)
    assert not unplanned, f"GPU tests without a planned cost (add them to gpu_plan.TEST_COSTS): {unplanned}"
    last = gpu_plan.test_commands("W")[-1]
    assert [last[i + 1] for i, w in enumerate(last) if w == "--deselect"] == named


@pytest.mark.timeout(720)  # its subprocess has its own, shorter deadline
def test_missing_dali_fails_the_dali_tests_only(tmp_path: Path) -> None:
    """Without DALI, tests/test_dali_loader.py's tests fail naming it; the other modules still run (a
    module-level import error would have stopped the whole run at collection)."""
    code = ("import sys; sys.modules['nvidia.dali'] = None; import pytest; "
            "sys.exit(pytest.main(sys.argv[1:]))")
    # Its own --basetemp: a nested session in /tmp/pytest-of-USER would rotate out the outer session's folders.
    proc = subprocess.run([sys.executable, "-c", code, "-q", "-p", "no:cacheprovider", "-o", "addopts=",
                           "--basetemp", str(tmp_path / "basetemp"),
                           "tests/test_dali_loader.py::test_single_shard_epoch_length",
                           "tests/test_palette.py::test_exact_palette_colours_map_to_their_train_ids"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stdout[-3000:]
    # The DALI test fails in its setup (pytest counts an error), naming the missing module.
    assert "1 passed, 1 error" in proc.stdout and "DALI is not importable" in proc.stdout


def make_fake_dali_parts(tmp_path: Path) -> tuple[Path, Path]:
    """An xz tar cut in two, like ../shared/device/pack-dali.sh's parts, holding one marker file."""
    src = tmp_path / "src" / "nvidia" / "fake_dali"
    src.mkdir(parents=True)
    (src / "marker.txt").write_text("unpacked")
    blob = tmp_path / "dali.tar.xz"
    with tarfile.open(blob, "w:xz") as tar:
        tar.add(tmp_path / "src" / "nvidia", arcname="nvidia")
    data = blob.read_bytes()
    keep, dali = tmp_path / "keep", tmp_path / "dali"
    keep.mkdir()
    dali.mkdir()
    (keep / "part-0").write_bytes(data[: len(data) // 2])
    (dali / "part-1").write_bytes(data[len(data) // 2 :])
    return keep, dali


@pytest.mark.timeout(420)  # its subprocess has its own, shorter deadline
def test_gpu_suite_unpacks_dali_and_real_pairs_from_both_runs(tmp_path: Path, tiny_data: Path) -> None:
    """Run 1 stashed part-0 and real-0.tar in /tmp/keep; run 2 brought part-1 and real-1.tar: the suite
    joins the parts into site-packages with the library path set, and the real pairs into one folder."""
    keep, dali = make_fake_dali_parts(tmp_path)
    gpu_plan.pack_real(tiny_data, dali, part_mb=0.045, batch=4)  # tiny parts: the pairs are split across the two
    (dali / "real-0.tar").rename(keep / "real-0.tar")
    site = tmp_path / "site"
    env = suite_env(tmp_path, DALI_FORCE_UNPACK="1", DALI_SITE=str(site), DALI_DIR=str(dali), KEEP_DIR=str(keep),
                    PLAN_SET="batch=4")  # 8 train pairs: two batches
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_suite.sh"), "--prepare-only"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert (site / "nvidia" / "fake_dali" / "marker.txt").read_text() == "unpacked"
    assert f"LD_LIBRARY_PATH={site}/nvidia/nvjpeg/lib:{site}/nvidia/nvimgcodec" in proc.stdout
    assert "real pairs: " in proc.stdout and ": 8 train, 2 val: 2 steps per epoch at batch 4" in proc.stdout
    real = Path(re.search(r"^REAL=(.*)$", proc.stdout, re.M).group(1))
    for split in ("train", "val"):
        assert sorted(p.name for p in (real / split).iterdir()) == sorted(p.name for p in (tiny_data / split).iterdir())
    with tarfile.open(keep / "real-0.tar") as a, tarfile.open(dali / "real-1.tar") as b:
        assert a.getnames() and b.getnames()  # both runs carried some


def test_gpu_stash_keeps_run_1s_files(tmp_path: Path) -> None:
    root = tmp_path / "checkout"
    (root / "benchmarks").mkdir(parents=True)
    (root / ".dali").mkdir()
    (root / "benchmarks" / "gpu_stash.sh").write_text((ROOT / "benchmarks" / "gpu_stash.sh").read_text())
    (root / ".dali" / "part-0").write_bytes(b"part zero")
    (root / ".dali" / "real-0.tar").write_bytes(b"pairs")
    env = {**os.environ, "KEEP_DIR": str(tmp_path / "keep")}
    proc = subprocess.run(["bash", str(root / "benchmarks" / "gpu_stash.sh")], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "keep" / "part-0").read_bytes() == b"part zero"
    assert (tmp_path / "keep" / "real-0.tar").read_bytes() == b"pairs"


def test_pack_real_fits_each_run(tmp_path: Path, tiny_data: Path) -> None:
    parts = gpu_plan.pack_real(tiny_data, tmp_path, part_mb=0.1)
    sizes = [p.stat().st_size for p in parts]
    assert all(size <= 0.1e6 for size in sizes)
    with tarfile.open(parts[0]) as tar:
        first = tar.getnames()
    assert all(n.startswith("val/") for n in first[:2])  # validation pairs first: the target is scored on them


def test_kernel_benchmark_counts_sass_instructions() -> None:
    """The issue bound's instruction count, on both disassembly layouts, and for the real kernel compiled
    for sm_90 here (Triton's own ptxas/nvdisasm; no GPU needed): at least the packed loop's 4
    instructions per centre (3 FFMA + FMNMX) per pixel."""
    from benchmarks import mask_kernel

    new = "Function:k\n--:-:0:-:8\tLDC R1, c[0x0][0x28];\n--:-:-:-:1\tNOP;\n--:-:-:Y:4\t@P0 EXIT;\n"
    old = ("        /*0000*/                   MOV R1, c[0x0][0x28] ;   /* 0x00000a0000017a02 */\n"
           "        /*0010*/                   NOP ;\n        /*0020*/              @!P0 BRA `(.L_x_1) ;\n")
    assert mask_kernel.sass_instructions(new) == 2 and mask_kernel.sass_instructions(old) == 2
    from triton.backends.compiler import GPUTarget

    k = 34
    count = mask_kernel.kernel_instructions(1024, torch.int64, k, GPUTarget("cuda", 90, 32))
    assert 4 * k <= count["instr_per_pixel"] <= 4 * k + 200
    # 132 SMs at 1980 MHz: the H200's issue rate; 64 x 256^2 pixels in blocks of 1024.
    ms = mask_kernel.issue_bound_ms(64 * 256 * 256, 1024, count, 132, 1980.0)
    assert ms == pytest.approx(4096 * 4 * count["sass_per_warp"] / (132 * 4 * 1980e6) * 1e3)


def test_accuracy_benchmark_writes_curves_table_and_plot(tiny_data: Path, tmp_path: Path) -> None:
    from benchmarks import accuracy

    out = tmp_path / "accuracy-cpu.json"
    result = CliRunner().invoke(bench_app, ["accuracy", "--data", str(tiny_data), "--budget", "2s", "--recipes",
                                            "baseline,dice", "--clock", "cpu", "--json", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    assert doc["complete"] is True and [r["label"] for r in doc["results"]] == ["baseline", "dice"]
    for row in doc["results"]:
        assert row["curve"] and row["curve"][-1]["train_s"] >= 2.0 and row["val_scored_at_px"] == 64
        assert all(0 <= p["pixel_acc"] <= 1 for p in row["curve"])
    table = out.with_suffix(".md").read_text()
    delta = doc["results"][1]["miou"] - doc["results"][0]["miou"]
    assert "| dice | train.loss=ce+dice |" in table and f"{delta:+.4f}" in table
    assert out.with_suffix(".png").stat().st_size > 0
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / out.name).write_text(out.read_text())
    report_text = report.build(folder, folder / "REPORT.md")
    assert "### Time to accuracy — cpu" in report_text and "| dice | train.loss=ce+dice | " in report_text
    assert f"| {delta:+.4f} |" in report_text
    # `baseline` stays the pre-preset defaults although real data now gets the `real-data` preset.
    baseline = accuracy.recipe_config("baseline", tiny_data, 2.0, "cpu", tmp_path / "b", "cpu")
    improved = accuracy.recipe_config("improved", tiny_data, 2.0, "cpu", tmp_path / "i", "cpu")
    assert (baseline.config.model.upsample, baseline.config.train.loss) == ("transpose", "ce")
    assert (improved.config.model.upsample, improved.config.train.loss) == ("bilinear", "ce+dice")


def test_accuracy_recipes_take_their_own_seeds() -> None:
    from benchmarks import accuracy

    assert accuracy.recipe_seeds("a, b@0,c@1+2", [0, 1]) == {"a": [0, 1], "b": [0], "c": [1, 2]}
    # labels carry the seed as soon as one recipe has several: every arm's row is told apart
    several, one_each = accuracy.recipe_seeds("a,b@0", [0, 1]), accuracy.recipe_seeds("a@2,b@2", [0])
    labels = [accuracy.arm_label(n, s, several) for n, seeds in several.items() for s in seeds]
    assert labels == ["a s0", "a s1", "b s0"]
    assert [accuracy.arm_label(n, 2, one_each) for n in one_each] == ["a", "b"]
    assert accuracy.arm_label("a", 1, accuracy.recipe_seeds("a@0+1", [0])) == "a s1"  # was "a" twice


def test_readme_expected_results_are_the_committed_measurement() -> None:
    """README's CPU table is benchmarks/results/accuracy-cpu.json figure for figure, the recipe it
    measured as `improved` is the `real-data` preset users get with --data, and that measurement
    meets the issue's targets (native-resolution scores, one side-by-side run)."""
    from benchmarks import accuracy
    from cityseg.config import PRESETS

    doc = json.loads((ROOT / "benchmarks/results/accuracy-cpu.json").read_text())
    section = (ROOT / "README.md").read_text().split("\n## Expected results\n")[1].split("\n## ")[0]
    for row in doc["results"]:
        line = next(ln for ln in section.splitlines() if f"`{row['label']}`:" in ln)
        assert all(f in line for f in (f"{row['pixel_acc']:.4f}", f"{row['miou']:.4f}", str(row["steps"]))), line
    base, improved = doc["results"][0], doc["results"][1]
    assert (base["label"], improved["label"]) == ("baseline", "improved") and doc["complete"]
    assert improved["overrides"] == PRESETS["real-data"] == accuracy.RECIPES["improved"]
    assert all(r["val_scored_at_px"] == 256 and r["train_seconds"] >= 1200 for r in doc["results"])
    assert improved["pixel_acc"] >= 0.86 and improved["miou"] >= 0.33 and improved["miou"] - base["miou"] >= 0.03


def test_readme_encoder_table_is_the_committed_measurement() -> None:
    """README's pretrained-encoder table is benchmarks/results/accuracy-encoders-side-by-side-cpu.json,
    seed for seed, scored on val 41-500 at native size; the preset is what it says won."""
    from benchmarks import accuracy
    from cityseg.config import PRESETS

    doc = json.loads((ROOT / "benchmarks/results/accuracy-encoders-side-by-side-cpu.json").read_text())
    section = (ROOT / "README.md").read_text().split("\n## Expected results\n")[1].split("\n## ")[0]
    rows = {"improved": ("our U-Net (`--encoder unet`", 2),
            "improved+lite0": ("`--encoder tf_efficientnet_lite0`, ImageNet", 2),
            "improved+lite0-random": ("`--encoder-weights none`", 1),
            "improved+lite1": ("`--encoder tf_efficientnet_lite1`", 1)}
    assert doc["complete"] and doc["config"]["clock"] == "cpu" and doc["config"]["threads"] == 1
    for recipe, (marker, n) in rows.items():
        line = next(ln for ln in section.splitlines() if ln.startswith("|") and marker in ln)
        seeds = [r for r in doc["results"] if r["label"] in (f"{recipe} s0", f"{recipe} s1")]
        assert len(seeds) == n and all(r["val_scored_at_px"] == 256 for r in seeds)
        assert all(r["overrides"] == accuracy.RECIPES[recipe] for r in seeds)
        for key in ("pixel_acc", "miou"):
            assert " / ".join(f"{r[key]:.3f}" for r in seeds) in line, (recipe, key, line)
    assert all(r["train_seconds"] >= 1200 for r in doc["results"])  # the issue's 20 CPU-minutes
    # README's claim: Lite0's worst seed beats our best on pixel accuracy by more than either's seed spread
    acc = {recipe: [r["pixel_acc"] for r in doc["results"] if r["label"].startswith(f"{recipe} s")]
           for recipe in ("improved", "improved+lite0")}
    spread = max(max(v) - min(v) for v in acc.values())
    assert min(acc["improved+lite0"]) - max(acc["improved"]) > spread
    # the third seed's run (two arms alone): the same order, as README quotes it
    seed2 = json.loads((ROOT / "benchmarks/results/accuracy-encoders-seed2-cpu.json").read_text())
    ours, lite0 = (next(r for r in seed2["results"] if r["label"] == name) for name in ("improved", "improved+lite0"))
    assert lite0["pixel_acc"] > ours["pixel_acc"] and all(r["train_seconds"] >= 1200 for r in (ours, lite0))
    quoted = (f"Lite0 {lite0['pixel_acc']:.4f} / {lite0['miou']:.4f} "
              f"against ours {ours['pixel_acc']:.4f} / {ours['miou']:.4f}")
    assert quoted in " ".join(section.split())
    assert "model.encoder" not in PRESETS["real-data"]  # README: the preset stays our U-Net (see its text)
