"""The mutation check: plant realistic bugs, one at a time, in a temporary copy of the repository, run
the tests that cover each, and report whether the tests caught it, let it escape, or hung.

    python tests/mutations.py                   # every bug in MUTATIONS, a table at the end
    python tests/mutations.py dali-flip clock   # only these (names, or a prefix of them)
    python tests/mutations.py --list            # the bugs and their tests
    python tests/mutations.py --timeout 600     # seconds each bug's tests may take (default 420)

Each bug is the smallest slip that changes behaviour: a text replacement in one file (its target text
must exist exactly once: tests/test_mutations.py checks every entry still applies, so the list does not
rot as the code moves). The copy holds the tracked and untracked-but-not-ignored files of this checkout
and is imported instead of it (PYTHONPATH, checked); the worktree itself is never touched. The tests run
with `-x` under a hard timeout (their process group is killed). Verdicts: caught (a test failed),
ESCAPED (all passed: a test is missing), HUNG (the timeout), broken (pytest could not run the tests:
collection or usage error, the mutation is not a behaviour change). Exit status 0 when every bug is
caught. Runs one bug at a time: the machine's other users keep their cores.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    name: str
    area: str  # the stage of the data path or the loop it breaks
    bug: str  # what the slip does, in a user's words
    path: str  # the file, relative to the repository root
    edits: tuple[tuple[str, str], ...]  # (old text, new text): each old text occurs exactly once
    tests: tuple[str, ...]  # pytest arguments: files, node ids, -k expressions

    def apply(self, text: str) -> str:
        for old, new in self.edits:
            if text.count(old) != 1:
                raise ValueError(f"{self.name}: {self.path} holds {text.count(old)} copies of {old!r}, expected 1")
            text = text.replace(old, new)
        return text


def m(name: str, area: str, bug: str, path: str, old: str, new: str, *tests: str,
      more: tuple[tuple[str, str], ...] = ()) -> Mutation:
    return Mutation(name, area, bug, path, ((old, new), *more), tests)


MUTATIONS: list[Mutation] = [
    # ---- the five areas of issue 36 (each escaped the suite before it)
    m("dali-flip", "augmentation: DALI, default flip", "the photo is mirrored, its mask not",
      "cityseg/data/dali_loader.py",
      "return photo, fn.flip(mask, horizontal=flip), flip", "return photo, mask, flip",
      "tests/test_alignment.py", "-k", "dali"),
    m("cache-flip", "augmentation: cache, default flip", "the photo is mirrored, its mask not",
      "cityseg/data/cache_loader.py",
      "return photo, torch.where(flip[:, None, None], target.flip(-1), target)", "return photo, target",
      "tests/test_alignment.py", "-k", "cache"),
    m("clock", "loop: training clock", "validation and checkpoint time counted as training (the clock keeps "
      "running between epochs)", "cityseg/training/synced_clock.py",
      "        \"\"\"Training (re)starts now: what passed since the last step is not training.\"\"\"\n"
      "        self.last = self.tick()",
      "        \"\"\"Training (re)starts now: what passed since the last step is not training.\"\"\"\n"
      "        self.last = self.last or self.tick()",
      "tests/test_clock.py"),
    m("lut-pin", "palette: lookup-table cache", "a cached table with a few wrong entries and a rewritten header "
      "is accepted (only the random spot check)", "cityseg/palette.py",
      "if pinned is not None and digest != pinned", "if False and digest != pinned",
      "tests/test_lut_cache.py", "-k", "single or pinned"),
    m("decay-norms", "optimizer: parameter groups", "weight decay on norms and biases",
      "cityseg/training/setup.py",
      "\"params\": [p for p in params if (p.ndim > 1) == decay]",
      "\"params\": [p for p in params if (p.ndim >= 1) == decay]",
      "tests/test_optimizer.py"),
    m("predict-resize", "predict: photo resize", "predict shrinks photos without antialiasing, unlike the "
      "validation loader", "cityseg/inference/predict.py",
      "x = F.resize(x, [size, size], antialias=True)", "x = F.resize(x, [size, size], antialias=False)",
      "tests/test_sizes_agree.py", "tests/test_predict.py"),
    # ---- palette and mask kernel
    m("kernel-ties", "palette: Triton mask kernel", "ties between two centres go to the last one",
      "kernels/mask_to_class.py", "closer = dk < best", "closer = dk <= best",
      "tests/test_mask_kernel.py"),
    m("kernel-max-dist", "palette: mask kernel threshold", "--max-color-dist compared with the distance, not "
      "its square", "kernels/mask_to_class.py",
      "return 0.0 if max_dist is None else float(np.float32(float(max_dist) ** 2))",
      "return 0.0 if max_dist is None else float(np.float32(float(max_dist)))",
      "tests/test_mask_kernel.py"),
    m("lut-codes", "palette: lookup-table gather", "colour codes built in BGR order on the torch path",
      "kernels/mask_to_class.py",
      "return (x[..., 0].to(torch.int32) << 16) | (x[..., 1].to(torch.int32) << 8) | x[..., 2].to(torch.int32)",
      "return (x[..., 2].to(torch.int32) << 16) | (x[..., 1].to(torch.int32) << 8) | x[..., 0].to(torch.int32)",
      "tests/test_mask_kernel.py"),
    # ---- each loader's augmentation and processing
    m("torch-flip", "augmentation: plain loader", "the transform gets the photo only; the mask is never moved",
      "cityseg/data/torch_loader.py",
      "photo, mask = self.transform(tv_tensors.Image(photo), tv_tensors.Mask(target[None]))",
      "photo, mask = self.transform(tv_tensors.Image(photo)), tv_tensors.Mask(target[None])",
      "tests/test_alignment.py", "-k", "torch"),
    m("torch-mask-resize", "decode: plain loader mask resize", "masks resized bilinearly (blended class ids)",
      "cityseg/data/torch_loader.py",
      "nearest = v2.InterpolationMode.NEAREST_EXACT", "nearest = v2.InterpolationMode.BILINEAR",
      "tests/test_torch_loader.py", "tests/test_loader_contract.py"),
    m("dali-warp-mask", "augmentation: DALI warp", "the mask is warped with linear interpolation",
      "cityseg/data/dali_loader.py",
      "mask = fn.warp_affine(mask, interp_type=types.INTERP_NN, **warp)",
      "mask = fn.warp_affine(mask, interp_type=types.INTERP_LINEAR, **warp)",
      "tests/test_alignment.py", "-k", "dali"),
    m("cache-warp-fill", "augmentation: cache warp", "the warp's fill maps to class 0 instead of 255",
      "cityseg/data/cache_loader.py",
      "return photo, torch.where(ids == 0, IGNORE_INDEX, ids - 1)", "return photo, (ids - 1).clamp(min=0)",
      "tests/test_cache_loader.py"),
    m("val-augmented", "loaders: validation", "validation loaders augment too",
      "cityseg/data/loaders.py",
      "augment = cfg.augment if train and cfg.augment != NO_AUGMENT else None",
      "augment = cfg.augment if cfg.augment != NO_AUGMENT else None",
      "tests/test_sizes_agree.py", "tests/test_loader_contract.py"),
    m("normalize-bgr", "batching: normalisation", "ImageNet mean in BGR order",
      "cityseg/data/contract.py",
      "mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255",
      "mean = torch.tensor(IMAGENET_MEAN[::-1], device=device).view(1, 3, 1, 1) * 255",
      "tests/test_torch_loader.py", "-k", "contract"),
    m("sampler-shards", "batching: shard sampler", "every shard reads the first shard's samples",
      "cityseg/data/sampler.py",
      "return order[self.shard_id :: self.num_shards]", "return order[0 :: self.num_shards]",
      "tests/test_torch_loader.py", "-k", "shards"),
    # ---- metrics and loss
    m("metrics-union", "metrics: IoU", "union counts the true positives twice",
      "cityseg/metrics.py",
      "union = m.sum(1) + m.sum(0) - tp", "union = m.sum(1) + m.sum(0)",
      "tests/test_metrics.py"),
    m("metrics-absent", "metrics: mIoU", "classes absent from truth and prediction count as IoU 0",
      "cityseg/metrics.py",
      "miou=iou[present].mean().item() if present.any() else math.nan",
      "miou=iou.nan_to_num(0.0).mean().item() if present.any() else math.nan",
      "tests/test_metrics.py"),
    m("loss-ignore", "loss: CE + Dice", "void pixels (255) counted in the Dice denominators' probabilities",
      "cityseg/training/losses.py",
      "prob_sum = (probs * valid).sum(dims)", "prob_sum = probs.sum(dims)",
      "tests/test_losses.py"),
    m("loss-ce-ignore", "loss: cross-entropy", "the plain CE loss forgets ignore_index",
      "cityseg/training/losses.py",
      "return nn.CrossEntropyLoss(weight=weight, ignore_index=IGNORE_INDEX)",
      "return nn.CrossEntropyLoss(weight=weight)",
      "tests/test_losses.py"),
    # ---- the loop: schedule, checkpoint/resume, stopping
    m("schedule-warmup", "loop: LR schedule", "the warm-up starts at lr 0 and peaks a step late",
      "cityseg/training/schedule.py",
      "        return (step + 1) / warmup", "        return step / warmup",
      "tests/test_engine.py", "-k", "schedule"),
    m("schedule-cosine", "loop: LR schedule", "the cosine ends at the peak again (a full period)",
      "cityseg/training/schedule.py",
      "    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))",
      "    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(2 * math.pi * progress))",
      "tests/test_engine.py", "-k", "schedule"),
    m("resume-scheduler", "checkpoint/resume", "resume does not restore the LR schedule's position",
      "cityseg/training/loop.py",
      "        p.scheduler.load_state_dict(state[\"scheduler\"])\n", "",
      "tests/test_engine.py", "-k", "resume_continues"),
    m("resume-position", "checkpoint/resume", "a mid-epoch resume starts its epoch again from batch 0",
      "cityseg/training/loop.py",
      "self.epoch, self.step_in_epoch = state[\"epoch\"], state[\"step_in_epoch\"]",
      "self.epoch, self.step_in_epoch = state[\"epoch\"], 0",
      "tests/test_engine.py", "-k", "resume_continues"),
    m("resume-optimizer", "checkpoint/resume", "resume starts AdamW's moments afresh",
      "cityseg/training/loop.py",
      "        p.optimizer.load_state_dict(state[\"optimizer\"])\n", "",
      "tests/test_engine.py", "-k", "resume_continues"),
    m("target-acc", "loop: --target-acc", "the target is compared with mIoU, not pixel accuracy",
      "cityseg/training/hooks/target_accuracy.py",
      "if (record.get(\"pixel_acc\") or 0.0) >= self.target:", "if (record.get(\"miou\") or 0.0) >= self.target:",
      "tests/test_recipe.py", "-k", "target_accuracy"),
    m("tta-unflipped", "inference: flip TTA", "the flipped pass's logits are not flipped back",
      "cityseg/inference/tta.py",
      "b = self.model(x.flip(-1)).float().flip(-1)", "b = self.model(x.flip(-1)).float()",
      "tests/test_predict.py", "-k", "tta"),
    m("eval-resize", "eval: native-size scoring", "validation logits resized without antialiasing when shrinking",
      "cityseg/metrics.py",
      "return torch.nn.functional.interpolate(logits, size=(h, w), mode=\"bilinear\", align_corners=False,\n"
      "                                           antialias=shrinks)",
      "return torch.nn.functional.interpolate(logits, size=(h, w), mode=\"bilinear\", align_corners=False)",
      "tests/test_sizes_agree.py"),
    m("dw-fp32", "model: encoder depthwise convs on CPU", "depthwise convs left in bf16 under CPU autocast (the "
      "slow oneDNN path)", "cityseg/model.py",
      "        depthwise_in_fp32_on_cpu(encoder)\n", "",
      "tests/test_encoders.py", "-k", "depthwise"),
    m("encoder-skips", "export: TorchScript of an encoder model", "the decoder finds its skips by feature size "
      "(a traced size is a tensor: no skip found, the export fails)", "cityseg/model.py",
      "by_stride = dict(zip(self.feature_strides, features, strict=True))",
      "by_stride = {x.shape[-1] // f.shape[-1]: f for f in features}",
      "tests/test_encoders.py", "-k", "export_parity"),
]


def copy_checkout(dest: Path) -> None:
    """The tracked and untracked-but-not-ignored files of this checkout (no .venv, no caches)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def seed_cache(dest: Path) -> None:
    """Lookup tables of the unmutated code, so each bug's run does not rebuild them (~35 CPU-s each):
    the tables verify themselves on load, so a mutated builder or palette still gets its own."""
    dest.mkdir(parents=True, exist_ok=True)
    for table in sorted((ROOT / ".pytest_cache" / "cityseg").glob("*/cityseg/lut-*.bin"),
                        key=lambda p: p.stat().st_mtime)[-4:]:
        shutil.copy2(table, dest / table.name)


def run_tests(copy: Path, tests: tuple[str, ...], timeout: float, cache: Path) -> tuple[str, float, str]:
    """(verdict, seconds, last output lines) of the tests in `copy`."""
    env = {**os.environ, "PYTHONPATH": str(copy), "CITYSEG_CACHE": str(cache), "OMP_NUM_THREADS": "1",
           "PYTHONDONTWRITEBYTECODE": "1"}
    # -n 0: one process (no xdist workers), so -x stops at the first failure with exit status 1.
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-n", "0", "-m", "not slow and not gpu", *tests]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=copy, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return "HUNG", time.monotonic() - start, tail(out)
    seconds = time.monotonic() - start
    verdict = {0: "ESCAPED", 1: "caught"}.get(proc.returncode, "broken")
    return verdict, seconds, tail(out)


def tail(out: bytes, lines: int = 6) -> str:
    return "\n".join(out.decode(errors="replace").rstrip().splitlines()[-lines:])


def check_imports_the_copy(copy: Path, cache: Path) -> None:
    """The copy's package is the one imported (not the editable install's worktree)."""
    env = {**os.environ, "PYTHONPATH": str(copy), "CITYSEG_CACHE": str(cache)}
    found = subprocess.run([sys.executable, "-c", "import cityseg, kernels; print(cityseg.__file__, kernels.__file__)"],
                           cwd=copy, env=env, capture_output=True, text=True, check=True).stdout.split()
    if not all(Path(f).resolve().is_relative_to(copy.resolve()) for f in found):
        raise SystemExit(f"the copy is not what gets imported: {found}")


def select(names: list[str]) -> list[Mutation]:
    if not names:
        return MUTATIONS
    picked = [mu for mu in MUTATIONS if any(mu.name.startswith(n) for n in names)]
    if not picked:
        raise SystemExit(f"no mutation named {names}: see --list")
    return picked


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="mutations to run (names or prefixes; default all)")
    parser.add_argument("--list", action="store_true", help="list the mutations and their tests")
    parser.add_argument("--timeout", type=float, default=420.0, help="seconds each bug's tests may take")
    args = parser.parse_args()
    chosen = select(args.names)
    if args.list:
        for mu in chosen:
            print(f"{mu.name:18} {mu.area:38} {' '.join(mu.tests)}\n{'':18} {mu.bug}")
        return 0
    rows = []
    with tempfile.TemporaryDirectory(prefix="cityseg-mutations-") as tmp:
        base, cache = Path(tmp) / "repo", Path(tmp) / "cache"
        copy_checkout(base)
        seed_cache(cache)
        check_imports_the_copy(base, cache)
        for mu in chosen:
            target = base / mu.path
            original = target.read_text()
            target.write_text(mu.apply(original))
            try:
                verdict, seconds, out = run_tests(base, mu.tests, args.timeout, cache)
            finally:
                target.write_text(original)
                shutil.rmtree(base / ".pytest_cache", ignore_errors=True)
            rows.append((mu, verdict, seconds))
            print(f"{verdict:8} {mu.name:18} {seconds:6.0f} s  {mu.bug}", flush=True)
            if verdict != "caught":
                print("    " + out.replace("\n", "\n    "), flush=True)
    print_table(rows)
    return 0 if all(v == "caught" for _, v, _ in rows) else 1


def print_table(rows: list[tuple[Mutation, str, float]]) -> None:
    print("\n| bug | area | planted slip | tests run | verdict | s |\n|---|---|---|---|---|---|")
    for mu, verdict, seconds in rows:
        print(f"| {mu.name} | {mu.area} | {mu.bug} | `{' '.join(mu.tests)}` | {verdict} | {seconds:.0f} |")
    counts = {v: sum(1 for _, x, _ in rows if x == v) for v in ("caught", "ESCAPED", "HUNG", "broken")}
    print("\n" + ", ".join(f"{n} {v}" for v, n in counts.items()))


if __name__ == "__main__":
    sys.exit(main())
