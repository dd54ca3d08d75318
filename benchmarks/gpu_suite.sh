#!/usr/bin/env bash
# The whole GPU check within 270 s on one H100/H200, from cold caches: the GPU-marked tests, then every
# benchmark (loaders, mask kernel, end to end, train step) on synthetic data generated here; JSON
# results, logs and REPORT.md under $OUT (default ./gpu-results). The plan (each step's cap) is printed
# first and must sum to at most the budget; each step is cut at its cap or at what is left of the
# budget, and every benchmark rewrites its JSON after each measurement, so a cut keeps what it measured.
#
#   bash benchmarks/gpu_suite.sh                                  # on the GPU machine
#   DRY_RUN=1 OUT=/tmp/gpu-dry bash benchmarks/gpu_suite.sh       # on a CPU: same steps, tiny sizes
#   bash benchmarks/gpu_suite.sh --dry-run                        # the same
#
# The offline GPU machine (../shared/device/README.md) has torch, triton, numpy, pillow, rich, typer,
# pytest and pynvml, but neither DALI nor cityscapesscripts. They travel with the checkout:
#   - DALI: `bash ../shared/device/pack-dali.sh` makes .dali/part-*; on the GPU machine unpack them to
#     ~/site as the README says (this script does it itself when DALI is not importable and the parts
#     are in ~/dali/ or .dali/), with ~/site on PYTHONPATH.
#   - cityscapesscripts (pure Python; cityseg/palette.py imports its label table): on the CPU machine
#     `bash benchmarks/pack_extras.sh` unpacks its wheel into .dali/extras/ (git-ignored: carry it with
#     the checkout); this script puts .dali/extras on PYTHONPATH and stops with a clear message when
#     `import cityscapesscripts` still fails.
# Env: OUT, PYTHON (default: $VIRTUAL_ENV's or .venv's python, else python3), DRY_RUN=1,
# SUITE_BUDGET_S (default 270: every step's timeout is cut to what is left of it), DATA_DIR (reuse
# a synthetic set), and the sizes below (N_TRAIN, LOADER_N, LOADER_WORKERS, THREADS, E2E_STEPS, ...).
# Exit status: 0 when every step passed, 1 otherwise ($OUT/status.tsv says which).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
for arg in "$@"; do
  case $arg in
    --dry-run) DRY_RUN=1 ;;
    *) echo "unknown argument: $arg (expected --dry-run)" >&2; exit 2 ;;
  esac
done
DRY_RUN=${DRY_RUN:-0}
OUT=${OUT:-./gpu-results}
mkdir -p "$OUT/logs"
OUT=$(cd "$OUT" && pwd)
exec > >(tee -a "$OUT/suite.log") 2>&1
START=$(date +%s)
BUDGET=${SUITE_BUDGET_S:-270}
RESERVE=5  # seconds kept for the report at the end
KILL_AFTER=2  # a step that ignores its timeout's SIGTERM is killed this much later
# Step caps in seconds, in run order (most important first). Few compiles keep them: the tests pin the
# mask kernel's block (no autotuning) and train the same model at the same shapes as the end-to-end
# benchmark, whose compile then comes from the inductor cache shared by every step.
STEPS=(env tests synth loader kernel end_to_end train_step report)
declare -A CAP=([env]=10 [tests]=95 [synth]=15 [loader]=35 [kernel]=25 [end_to_end]=40 [train_step]=25 [report]=5)
planned=0
for name in "${STEPS[@]}"; do planned=$((planned + CAP[$name] + KILL_AFTER)); done
printf 'plan:'; for name in "${STEPS[@]}"; do printf ' %s=%ss' "$name" "${CAP[$name]}"; done
echo " (+${KILL_AFTER}s kill grace each) = ${planned}s of ${BUDGET}s"
((planned <= BUDGET)) || { echo "gpu_suite: the plan (${planned}s) exceeds the budget (${BUDGET}s)" >&2; exit 1; }
CACHE=${SUITE_CACHE:-${TMPDIR:-/tmp}/cityseg-suite-cache}  # Triton and inductor caches shared by the steps
export TRITON_CACHE_DIR=$CACHE/triton TORCHINDUCTOR_CACHE_DIR=$CACHE/inductor

if [[ -z ${PYTHON:-} ]]; then
  if [[ -n ${VIRTUAL_ENV:-} && -x $VIRTUAL_ENV/bin/python ]]; then PYTHON=$VIRTUAL_ENV/bin/python
  elif [[ -x $ROOT/.venv/bin/python ]]; then PYTHON=$ROOT/.venv/bin/python
  else PYTHON=python3; fi
fi
die() { echo "gpu_suite: $*" >&2; exit 1; }
"$PYTHON" -c 'import torch' 2>/dev/null || die "$PYTHON cannot import torch: set PYTHON to the project's interpreter"

# What the GPU machine lacks, from the checkout: cityscapesscripts (pack_extras.sh) and DALI (pack-dali.sh).
[[ -d $ROOT/.dali/extras ]] && export PYTHONPATH="$ROOT/.dali/extras${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
missing=$("$PYTHON" -c 'import importlib.util as u
need = ("torchvision", "matplotlib", "cityscapesscripts", "triton", "PIL", "numpy", "rich", "typer", "pytest")
print(" ".join(n for n in need if u.find_spec(n) is None))')
[[ -z $missing ]] || die "cannot import: $missing. On the CPU machine, 'bash benchmarks/pack_extras.sh' packs \
cityscapesscripts ('bash benchmarks/pack_extras.sh PKG ...' any other pure or cp312 wheel) into .dali/extras: carry it"
"$PYTHON" -c 'import pynvml' 2>/dev/null || echo "WARNING: pynvml is not importable: GPU utilisation reads n/a"
if ! "$PYTHON" -c 'import nvidia.dali' 2>/dev/null; then
  parts=$(ls "$HOME"/dali/part-* 2>/dev/null || ls "$ROOT"/.dali/part-* 2>/dev/null || true)
  if [[ -n $parts ]]; then
    echo "unpacking DALI from $(dirname "$(echo "$parts" | head -1)") into ~/site"
    # shellcheck disable=SC2086  # the part names hold no spaces
    cat $parts | "$PYTHON" -c "import os,sys,tarfile; tarfile.open(fileobj=sys.stdin.buffer, mode='r|xz').extractall(os.path.expanduser('~/site'))"
    rm -f "$HOME/site/nvidia/__init__.py"  # keep nvidia a namespace package: torch's nvidia.* libs stay importable
    export PYTHONPATH="$HOME/site:$PYTHONPATH"
  fi
  "$PYTHON" -c 'import nvidia.dali' 2>/dev/null ||
    echo "WARNING: nvidia.dali is not importable: DALI tests skip and the DALI loaders are left out (see ../shared/device/README.md)"
fi
if [[ $DRY_RUN == 1 ]]; then
  DEVICE=cpu
else
  "$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' ||
    die "no CUDA device visible to torch: run with DRY_RUN=1 on a CPU machine"
  DEVICE=cuda
fi

# Sizes: the GPU run (defaults) or the dry run (tiny: it checks the plumbing, not the speed).
if [[ $DRY_RUN == 1 ]]; then
  N_TRAIN=${N_TRAIN:-16}; N_VAL=${N_VAL:-4}; SYNTH_SIZE=${SYNTH_SIZE:-64}
  LOADER_ARGS=(--n "${LOADER_N:-8}" --batch-size 4 --image-size 64 --reps 1 --workers "${LOADER_WORKERS:-0}"
               --threads "${THREADS:-1}" --augment standard)
  KERNEL_ARGS=(--cpu --batches 1 --reps 5)  # batch 64 of the CPU reference takes minutes: batch 1 only
  E2E_ARGS=(--steps "${E2E_STEPS:-7}" --warm-steps 2 --width 4 --depth 2 --size 64 --batch 2 --workers 0)
  STEP_ARGS=(--quick)
else
  N_TRAIN=${N_TRAIN:-1024}; N_VAL=${N_VAL:-64}; SYNTH_SIZE=${SYNTH_SIZE:-256}
  LOADER_ARGS=(--n "${LOADER_N:-384}" --batch-size 32 --reps 3 --workers "${LOADER_WORKERS:-0,4,8,16}"
               --threads "${THREADS:-8}" --augment standard)
  KERNEL_ARGS=()
  E2E_ARGS=(--steps "${E2E_STEPS:-80}" --width 32 --size 256 --batch 16 --workers "${E2E_WORKERS:-8}" --compile)
  STEP_ARGS=(--widths 32 --batch 16 --size 256 --warmup 5 --steps 10 --reps 3)
fi

export PYTHON OUT DEVICE
echo "status	step	seconds	limit" > "$OUT/status.tsv"
FAILED=0
# step NAME MAX_SECONDS CMD...: run CMD (a command or a function of this script) under a timeout no
# longer than what is left of the budget; its output goes to $OUT/logs/NAME.log, its tail here.
step() {
  local name=$1 max=$2; shift 2
  local left=$((BUDGET - ($(date +%s) - START) - RESERVE - KILL_AFTER))
  [[ $name == report ]] && left=$((left + RESERVE))
  local limit=$((max < left ? max : left))
  if ((limit < 5)); then  # too little time left to do anything useful
    echo "== [$name] skipped: the suite's ${BUDGET}s budget is spent"
    printf 'skipped\t%s\t0\t0\n' "$name" >> "$OUT/status.tsv"
    FAILED=1
    return 0
  fi
  echo "== [$name] limit ${limit}s: $*"
  local t0 rc=0
  t0=$(date +%s)
  if declare -F "$1" >/dev/null; then
    export -f "$1"
    timeout --kill-after="$KILL_AFTER" "$limit" bash -c '"$@"' _ "$@" > "$OUT/logs/$name.log" 2>&1 || rc=$?
  else
    timeout --kill-after="$KILL_AFTER" "$limit" "$@" > "$OUT/logs/$name.log" 2>&1 || rc=$?
  fi
  tail -n 25 "$OUT/logs/$name.log"
  local status=ok
  if ((rc == 124 || rc == 137)); then status=timeout; elif ((rc != 0)); then status="failed($rc)"; fi
  [[ $status == ok ]] || FAILED=1
  printf '%s\t%s\t%s\t%s\n' "$status" "$name" "$(($(date +%s) - t0))" "$limit" >> "$OUT/status.tsv"
  echo "== [$name] $status in $(($(date +%s) - t0))s"
}

environment() {
  date -Is; uname -a; echo "cpus: $(nproc)"; free -g 2>/dev/null | head -2 || true
  echo "load: $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo n/a)"
  if command -v nvidia-smi >/dev/null; then nvidia-smi; else echo "nvidia-smi: not found"; fi
  "$PYTHON" -c 'import json, torch
from benchmarks.common import describe_device, machine, versions
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
print(json.dumps({"device": describe_device(device), "versions": versions(), "machine": machine()}, indent=1))'
  echo "PYTHONPATH=$PYTHONPATH"
}

# Only the modules that carry the gpu marker: others import test extras (hypothesis, torchmetrics) the
# GPU machine lacks, and one module failing to import stops pytest's whole run.
gpu_tests() {
  local files rc=0
  files=$(grep -l 'pytest.mark.gpu' tests/test_*.py || true)
  if [[ -z $files ]]; then echo "no GPU-marked tests found: the suite lost its GPU tests"; return 1; fi
  # shellcheck disable=SC2086  # test file names hold no spaces
  CITYSEG_KERNEL_BLOCK=1024 "$PYTHON" -m pytest -m gpu -q -p no:cacheprovider --junitxml "$OUT/pytest-gpu.xml" \
    $files || rc=$?
  # pytest's 5 (nothing collected) is a failure too; on a CPU the GPU tests are collected and skip.
  return "$rc"
}

DATA=${DATA_DIR:-}
if [[ -z $DATA ]]; then
  DATA=$(mktemp -d "${TMPDIR:-/tmp}/cityseg-suite-XXXXXX")
  trap 'rm -rf "$DATA"' EXIT  # thousands of JPEGs: never under $OUT, which travels back
fi
SYNTH_WORKERS=$(nproc)
echo "gpu_suite: dry_run=$DRY_RUN device=$DEVICE out=$OUT data=$DATA python=$PYTHON budget=${BUDGET}s"

step env "${CAP[env]}" environment
cp "$OUT/logs/env.log" "$OUT/env.txt"
# In order of what matters most: a step past the budget is cut (timeout), and the benchmarks rewrite
# their JSON after every measurement, so what they measured before the cut comes back.
step tests "${CAP[tests]}" gpu_tests
if [[ -f $DATA/synth.json ]]; then
  echo "== [synth] reusing $DATA"
else
  step synth "${CAP[synth]}" "$PYTHON" -m cityseg synth --out "$DATA" --train "$N_TRAIN" --val "$N_VAL" --size "$SYNTH_SIZE" \
    --workers "$SYNTH_WORKERS"
fi
step loader "${CAP[loader]}" "$PYTHON" benchmarks/loader.py --data "$DATA" --device "$DEVICE" "${LOADER_ARGS[@]}" \
  --json "$OUT/loader-$DEVICE.json"
step kernel "${CAP[kernel]}" "$PYTHON" benchmarks/mask_kernel.py "${KERNEL_ARGS[@]}" --json "$OUT/mask_kernel-gpu.json"
step end_to_end "${CAP[end_to_end]}" "$PYTHON" benchmarks/end_to_end.py --data "$DATA" --device "$DEVICE" "${E2E_ARGS[@]}" \
  --json "$OUT/end_to_end-$DEVICE.json"
step train_step "${CAP[train_step]}" "$PYTHON" benchmarks/train_step.py --device "$DEVICE" "${STEP_ARGS[@]}" \
  --json "$OUT/train_step-$DEVICE.json"
step report "${CAP[report]}" "$PYTHON" benchmarks/report.py --results "$OUT" --out "$OUT/REPORT.md"

echo
column -t -s $'\t' "$OUT/status.tsv" 2>/dev/null || cat "$OUT/status.tsv"
echo "gpu_suite: $(($(date +%s) - START))s in all; results in $OUT"
exit "$FAILED"
