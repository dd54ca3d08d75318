#!/usr/bin/env bash
# The whole GPU check in one run of at most 9 minutes on one H100/H200, cold machine included: unpack
# DALI and real pairs, environment, synthetic pairs, a compile warm-up that fills the shared
# inductor/Triton caches, the GPU-marked tests (sharded, at once), the mask kernel, the loaders, real
# pairs trained to a pixel-accuracy target, the train-step sweep, a report. Its plan (steps, commands,
# sizes, caps) comes from benchmarks/gpu_plan.py, printed first and checked there.
#
#   bash benchmarks/gpu_suite.sh                                  # on the GPU machine (run 2 below)
#   DRY_RUN=1 OUT=/tmp/gpu-dry bash benchmarks/gpu_suite.sh       # on a CPU: the same steps, tiny sizes
#   bash benchmarks/gpu_suite.sh --dry-run                        # the same
#   bash benchmarks/gpu_suite.sh --prepare-only                   # unpack DALI and real pairs, then stop
#
# The offline GPU machine (../shared/device/README.md) lacks DALI and cityscapesscripts, and a run carries
# at most 64 MiB; files carried by one run are gone at the next, /tmp survives. Two runs:
#   On the CPU machine: bash ../shared/device/pack-dali.sh; bash benchmarks/pack_extras.sh;
#     python -m benchmarks.gpu_plan --pack-real DIR (optional: .dali/real-0.tar, .dali/real-1.tar)
#   Run 1 carries .dali/part-0 (+ .dali/real-0.tar):      bash benchmarks/gpu_stash.sh
#   Run 2 carries .dali/part-1, .dali/extras (+ .dali/real-1.tar): bash benchmarks/gpu_suite.sh
# The suite unpacks /tmp/keep/part-0 (or .dali/part-0) + .dali/part-1 into the interpreter's
# site-packages with LD_LIBRARY_PATH set (as ../shared/device/README.md shows), and joins real-0.tar
# (/tmp/keep or .dali) and real-1.tar into one pair folder, unless REAL_DATA=DIR names one.
#
# $OUT (default ./gpu-results) ends with at most 4 files, rewritten after every step so a run cut
# anywhere still returns them (8 files come back at most): gpu-results.tar.gz (every JSON, log, junit
# XML, the real run's summary.json and metrics), REPORT.md, status.tsv, suite.log.
# Each step's failure is recorded in status.tsv and the suite goes on; exit status 1 if any failed.
# Env: OUT, PYTHON (default: $VIRTUAL_ENV's or .venv's python, else python3), DRY_RUN=1, REAL_DATA,
# KEEP_DIR (/tmp/keep), DALI_DIR (.dali), DALI_SITE (site-packages), PLAN_SET ("loader.n=512 ..."),
# SUITE_CACHE (compile caches; default ${TMPDIR:-/tmp}/cityseg-suite-cache).
set -uo pipefail  # no -e: a failing step is recorded, the next one runs

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PREPARE_ONLY=0
for arg in "$@"; do
  case $arg in
    --dry-run) DRY_RUN=1 ;;
    --prepare-only) PREPARE_ONLY=1 ;;
    *) echo "error: unknown argument: $arg (expected --dry-run or --prepare-only)" >&2; exit 2 ;;
  esac
done
DRY_RUN=${DRY_RUN:-0}
OUT=${OUT:-./gpu-results}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
rm -f "$OUT/suite.log" "$OUT/status.tsv" "$OUT/REPORT.md" "$OUT/gpu-results.tar.gz"
exec > >(tee -a "$OUT/suite.log") 2>&1
START=$(date +%s)
KEEP=${KEEP_DIR:-/tmp/keep}
DALI_DIR=${DALI_DIR:-$ROOT/.dali}
SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/cityseg-suite-XXXXXX")  # data and results before packing: never $OUT
((PREPARE_ONLY)) || trap 'rm -rf "$SCRATCH"' EXIT  # --prepare-only leaves the pairs it unpacked
WORK=$SCRATCH/work DATA=$SCRATCH/synth
mkdir -p "$WORK/logs" "$WORK/warm"
CACHE=${SUITE_CACHE:-${TMPDIR:-/tmp}/cityseg-suite-cache}  # one inductor + Triton cache for every step
export TRITON_CACHE_DIR=$CACHE/triton TORCHINDUCTOR_CACHE_DIR=$CACHE/inductor MPLCONFIGDIR=$CACHE/matplotlib

if [[ -z ${PYTHON:-} ]]; then
  if [[ -n ${VIRTUAL_ENV:-} && -x $VIRTUAL_ENV/bin/python ]]; then PYTHON=$VIRTUAL_ENV/bin/python
  elif [[ -x $ROOT/.venv/bin/python ]]; then PYTHON=$ROOT/.venv/bin/python
  else PYTHON=python3; fi
fi
die() { echo "gpu_suite: error: $*" >&2; exit 1; }
# cityscapesscripts travels in .dali/extras (benchmarks/pack_extras.sh); the checkout itself is importable.
[[ -d $DALI_DIR/extras ]] && export PYTHONPATH="$DALI_DIR/extras${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

# The plan: steps, caps, commands ("$DATA", "$WORK", ... expand here). Sizes are typed only there.
plan_args=()
[[ $DRY_RUN == 1 ]] && plan_args+=(--dry)
[[ -n ${PLAN_SET:-} ]] && plan_args+=(--set "$PLAN_SET")
"$PYTHON" -m benchmarks.gpu_plan --plan-only "${plan_args[@]}" | grep -v '^      ' || die "the plan does not hold (above)"
plan_sh=$("$PYTHON" -m benchmarks.gpu_plan --shell "${plan_args[@]}") || die "python -m benchmarks.gpu_plan --shell failed"

# --------------------------------------------------------------------- unpack: DALI and real pairs
# In this shell (not a step's subprocess): PYTHONPATH, LD_LIBRARY_PATH and REAL must reach every step.
find_file() {  # the first of $KEEP/NAME, $DALI_DIR/NAME that exists
  local d
  for d in "$KEEP" "$DALI_DIR"; do [[ -e $d/$1 ]] && { echo "$d/$1"; return 0; }; done
  return 1
}
unpack_dali() {
  if [[ ${DALI_FORCE_UNPACK:-0} != 1 ]] && "$PYTHON" -c 'import nvidia.dali' 2>/dev/null; then
    echo "DALI: importable already"; return 0
  fi
  local p0 p1 site
  p0=$(find_file part-0) || { echo "DALI: no part-0 in $KEEP or $DALI_DIR (run 1: bash benchmarks/gpu_stash.sh)"; return 1; }
  p1=$(find_file part-1) || { echo "DALI: no part-1 in $DALI_DIR or $KEEP (carry .dali/part-1)"; return 1; }
  site=${DALI_SITE:-$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')}
  mkdir -p "$site"
  echo "DALI: unpacking $p0 + $p1 into $site"
  cat "$p0" "$p1" | xz -dc -T0 | tar -x -C "$site" || { echo "DALI: unpacking failed"; return 1; }
  export LD_LIBRARY_PATH="$site/nvidia/nvjpeg/lib:$site/nvidia/nvimgcodec${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  [[ -n ${DALI_SITE:-} ]] && export PYTHONPATH="$PYTHONPATH:$site"
  return 0
}
find_real() {  # REAL: REAL_DATA, else real-0.tar + real-1.tar joined, else (dry run) the local sample
  REAL=""
  if [[ -n ${REAL_DATA:-} ]]; then REAL=$REAL_DATA
  else
    local i part found=0
    for i in 0 1; do
      part=$(find_file "real-$i.tar") || continue
      mkdir -p "$SCRATCH/real" && tar -xf "$part" -C "$SCRATCH/real" || { echo "real pairs: cannot read $part"; return 1; }
      echo "real pairs: unpacked $part"; found=1
    done
    if ((found)); then REAL=$SCRATCH/real
    elif [[ $DRY_RUN == 1 ]]; then
      REAL=${CITYSEG_REAL_SAMPLE:-$ROOT/../shared/data/cityscapes_pairs_sample}
      [[ -d $REAL/train ]] || REAL=$DATA  # no real pairs here: the synthetic set stands in (plumbing only)
    fi
  fi
  if [[ -z $REAL ]]; then echo "real pairs: none (REAL_DATA unset, no real-0.tar/real-1.tar): real_e2e will fail"; return 1; fi
  if [[ $REAL == "$DATA" ]]; then echo "real pairs: none here; the synthetic set stands in (dry run)"
  else
    [[ -d $REAL/train && -d $REAL/val ]] || { echo "real pairs: $REAL has no train/ and val/"; return 1; }
    local n_train
    n_train=$(find "$REAL/train" -name '*.jpg' | wc -l)
    echo "real pairs: $REAL: $n_train train, $(find "$REAL/val" -name '*.jpg' | wc -l) val:" \
      "$((n_train / REAL_BATCH)) steps per epoch at batch $REAL_BATCH"
    ((n_train >= REAL_BATCH)) || { echo "real pairs: fewer train pairs than one batch of $REAL_BATCH"; return 1; }
  fi
  export CITYSEG_REAL_SAMPLE=$REAL  # the real-sample tests run on them too
}
unpack() {
  local rc=0
  unpack_dali || rc=1
  find_real || rc=1
  "$PYTHON" -c 'import nvidia.dali as d; print("DALI", d.__version__, "importable")' ||
    { echo "DALI: not importable: the DALI tests fail, the DALI loaders are left out"; rc=1; }
  return $rc
}

if [[ $DRY_RUN == 1 ]]; then DEVICE=cpu KIND=cpu
else
  DEVICE=cuda KIND=gpu
fi
CORES=$(nproc)
export PYTHON OUT WORK DATA DEVICE KIND CORES ROOT
REAL=""  # set by the unpack step; the plan is evaluated again after it, so "$REAL" expands to it
eval "$plan_sh"

if [[ $PREPARE_ONLY == 1 ]]; then
  unpack; rc=$?
  echo "PYTHONPATH=$PYTHONPATH"; echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"; echo "REAL=$REAL"
  exit $rc
fi
RESERVE=$((CAP[report] + KILL_GRACE + PACK))  # kept for the report and the last packing
printf 'status\tstep\tseconds\tlimit\n' > "$OUT/status.tsv"
FAILED=0

# --------------------------------------------------------------------- step functions
environment() {
  date -Is; uname -a; echo "cpus: $(nproc)"; free -g 2>/dev/null | head -2 || true
  echo "load: $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo n/a)"
  if command -v nvidia-smi >/dev/null; then nvidia-smi; else echo "nvidia-smi: not found"; fi
  "$PYTHON" -c 'import json, torch
from benchmarks.common import describe_device, machine, versions
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
print(json.dumps({"device": describe_device(device), "versions": versions(), "machine": machine()}, indent=1))'
  echo "PYTHONPATH=$PYTHONPATH"; echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
  "$PYTHON" -c 'import importlib.util as u
need = ("nvidia.dali", "cityscapesscripts", "triton", "pynvml", "matplotlib", "torchvision", "pytest", "typer")
def found(name):
    try:
        return u.find_spec(name) is not None
    except ImportError:  # its parent package is missing
        return False
missing = [n for n in need if not found(n)]
print("cannot import: " + ", ".join(missing) if missing else "every module the suite needs imports")'
  if [[ $DEVICE == cuda ]]; then
    "$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' ||
      { echo "no CUDA device visible to torch: run with DRY_RUN=1 on a CPU machine"; return 1; }
  fi
}
real_e2e() {  # the real-data run; its summary.json (timings, time to the target) joins the results
  [[ -n ${CITYSEG_REAL_SAMPLE:-} ]] || { echo "no real pairs on board (see unpack)"; return 1; }
  local rc=0
  "$@" || rc=$?
  cp "$WORK/real-run/summary.json" "$WORK/real-summary.json" 2>/dev/null || echo "no summary.json written"
  return $rc
}
export -f environment real_e2e

pack() {  # $OUT: the archive, REPORT.md, status.tsv, suite.log; rewritten after every step
  "$PYTHON" -m benchmarks.gpu_plan --report "$WORK" --status "$OUT/status.tsv" > "$OUT/REPORT.md" 2>/dev/null
  [[ -f $WORK/benchmarks-report.md ]] && cat "$WORK/benchmarks-report.md" >> "$OUT/REPORT.md"
  cp "$OUT/REPORT.md" "$OUT/status.tsv" "$WORK/" 2>/dev/null
  tar -czf "$OUT/gpu-results.tar.gz.tmp" -C "$WORK" --exclude='*.pt' --exclude='events.out.tfevents*' \
    --exclude='./warm/*.png' --exclude='./warm/*/*.png' . &&
    mv "$OUT/gpu-results.tar.gz.tmp" "$OUT/gpu-results.tar.gz"
}

# step NAME: the plan's commands for NAME, at once, each under a timeout no longer than what is left of
# the budget; logs in $WORK/logs/NAME[.i].log, their tails here, one line in status.tsv.
step() {
  local name=$1 n=${NCMD[$1]} cap=${CAP[$1]}
  local left=$((BUDGET - ($(date +%s) - START) - KILL_GRACE - PACK))
  [[ $name == report ]] || left=$((left - RESERVE))
  local limit=$((cap < left ? cap : left))
  if ((limit < 5)); then
    echo "== [$name] skipped: the suite's ${BUDGET}s budget is spent"
    printf 'skipped\t%s\t0\t0\n' "$name" >> "$OUT/status.tsv"; FAILED=1; return 0
  fi
  local t0 i rcs=() pids=() logs=()
  t0=$(date +%s)
  for ((i = 0; i < n; i++)); do
    local cmd
    eval "cmd=(\"\${CMD_${name}_$i[@]}\")"
    local log=$WORK/logs/$name.log
    ((n > 1)) && log=$WORK/logs/$name.$i.log
    logs+=("$log")
    echo "== [$name] limit ${limit}s: ${cmd[*]}"
    if [[ $name == unpack ]]; then  # in this shell: what it exports must reach the later steps
      "${cmd[@]}" > "$log" 2>&1; rcs+=($?)
      continue
    fi
    local run=(timeout --kill-after="$KILL_GRACE" "$limit")
    declare -F "${cmd[0]}" >/dev/null && run+=(bash -c '"$@"' _)
    # Tests pin the kernel's block (no autotuning: fewer Triton compiles).
    (if [[ $name == tests ]]; then export CITYSEG_KERNEL_BLOCK=1024; fi; exec "${run[@]}" "${cmd[@]}") > "$log" 2>&1 &
    pids+=($!)
  done
  for i in "${pids[@]}"; do wait "$i"; rcs+=($?); done
  for i in "${logs[@]}"; do echo "-- $(basename "$i")"; tail -n 15 "$i"; done
  local status=ok rc
  for rc in "${rcs[@]}"; do
    if ((rc == 124 || rc == 137)); then status=timeout; elif ((rc != 0)) && [[ $status == ok ]]; then status="failed($rc)"; fi
  done
  [[ $status == ok ]] || FAILED=1
  printf '%s\t%s\t%s\t%s\n' "$status" "$name" "$(($(date +%s) - t0))" "$limit" >> "$OUT/status.tsv"
  echo "== [$name] $status in $(($(date +%s) - t0))s (exit ${rcs[*]})"
  pack
}

echo "gpu_suite: dry_run=$DRY_RUN device=$DEVICE out=$OUT work=$WORK python=$PYTHON budget=${BUDGET}s"
for name in "${STEPS[@]}"; do
  step "$name"
  [[ $name == unpack ]] && eval "$plan_sh"
  [[ $name == env ]] && cp "$WORK/logs/env.log" "$WORK/env.txt"
done
echo
column -t -s $'\t' "$OUT/status.tsv" 2>/dev/null || cat "$OUT/status.tsv"
echo "gpu_suite: $(($(date +%s) - START))s in all; $OUT: $(cd "$OUT" && echo *)"
cp "$OUT/suite.log" "$WORK/" && pack
exit "$FAILED"
