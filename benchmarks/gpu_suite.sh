#!/usr/bin/env bash
# The whole GPU check in two runs of one 15-minute lease on one H100/H200 (../shared/device/README.md):
# run 1 has no DALI on board and does everything that needs none (a compile warm-up that fills the shared
# inductor/Triton cache for every later graph, the GPU-marked tests in shards at once, the mask kernel,
# the train-step sweep, `--batch-size auto`); run 2 unpacks DALI and does what needs it (DALI's tests,
# the loaders, real pairs trained to a pixel-accuracy target). The plan (steps, runs, commands, sizes,
# caps, the lease's free time) comes from benchmarks/gpu_plan.py, printed first and checked there.
#
#   bash benchmarks/gpu_suite.sh --run 1                          # GPU machine, run 1 (part-0, real-0.tar, extras)
#   bash benchmarks/gpu_suite.sh --run 2                          # GPU machine, run 2 (part-1, extras, real-1.tar)
#   DRY_RUN=1 OUT=/tmp/gpu-dry bash benchmarks/gpu_suite.sh       # on a CPU: both runs' steps, tiny sizes
#   bash benchmarks/gpu_suite.sh --dry-run                        # the same
#   bash benchmarks/gpu_suite.sh                                  # both runs' steps at once (DALI installed)
#   bash benchmarks/gpu_suite.sh --prepare-only                   # unpack DALI and real pairs, then stop
#
# The offline GPU machine lacks DALI and cityscapesscripts, and a run carries at most 64 MiB; files
# carried by one run are gone at the next, /tmp survives while the machine stays up (~30 s after a run).
#   On the CPU machine: bash ../shared/device/pack-dali.sh; bash benchmarks/pack_extras.sh;
#     python -m benchmarks.gpu_plan --pack-real DIR (.dali/real-0.tar: every val pair + some train pairs)
#   Run 1: its `stash` step keeps .dali/part-0 and .dali/real-0.tar in /tmp/keep; its compile cache and
#     lookup tables stay in /tmp (SUITE_CACHE); its results in /tmp/keep/run-1 (run 2's archive has them).
#   Run 2: `unpack` joins /tmp/keep/part-0 + .dali/part-1 into the interpreter's site-packages with
#     LD_LIBRARY_PATH set, and real-0.tar + real-1.tar into one pair folder (unless REAL_DATA=DIR).
#
# $OUT (default ./gpu-results) ends with at most 4 files, rewritten after every step so a run cut
# anywhere still returns them (8 files come back at most): gpu-results.tar.gz (every JSON, log, junit
# XML, the real run's summary.json and metrics), REPORT.md, status.tsv, suite.log. Every step's log is
# written as it goes (PYTHONUNBUFFERED=1, pytest -s -v), its tail printed after the step.
# Each step's failure is recorded in status.tsv and the suite goes on; exit status 1 if any failed.
# Env: OUT, RUN (1, 2 or all), PYTHON (default: $VIRTUAL_ENV's or .venv's python, else python3),
# DRY_RUN=1, REAL_DATA, KEEP_DIR (/tmp/keep), DALI_DIR (.dali), DALI_SITE (site-packages),
# PLAN_SET ("loader.n=512 ..."), SUITE_CACHE (compile caches, lookup tables; default
# ${TMPDIR:-/tmp}/cityseg-suite-cache).
set -uo pipefail  # no -e: a failing step is recorded, the next one runs

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PREPARE_ONLY=0
RUN=${RUN:-all}
while (($#)); do
  case $1 in
    --dry-run) DRY_RUN=1 ;;
    --prepare-only) PREPARE_ONLY=1 ;;
    --run) RUN=${2:-}; shift ;;
    --run=*) RUN=${1#--run=} ;;
    *) echo "error: unknown argument: $1 (expected --run 1|2|all, --dry-run or --prepare-only)" >&2; exit 2 ;;
  esac
  shift
done
[[ $RUN == 1 || $RUN == 2 || $RUN == all ]] || { echo "error: --run $RUN: expected 1, 2 or all" >&2; exit 2; }
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
WORK=$SCRATCH/work
mkdir -p "$WORK/logs" "$WORK/warm"
# One inductor + Triton cache and one set of lookup tables for every step of both runs (tests/conftest.py
# keeps them): /tmp outlives run 1.
CACHE=${SUITE_CACHE:-${TMPDIR:-/tmp}/cityseg-suite-cache}
export TRITON_CACHE_DIR=$CACHE/triton TORCHINDUCTOR_CACHE_DIR=$CACHE/inductor MPLCONFIGDIR=$CACHE/matplotlib
export CITYSEG_CACHE=$CACHE/cityseg
DATA=$CACHE/synth  # run 1's synthetic pairs, for run 2's loaders too
export PYTHONUNBUFFERED=1  # every log as it goes: a step cut by its cap still shows how far it got

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
plan_sh=$("$PYTHON" -m benchmarks.gpu_plan --shell --run "$RUN" "${plan_args[@]}") || die "python -m benchmarks.gpu_plan --shell failed"

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
  p0=$(find_file part-0) || { echo "DALI: no part-0 in $KEEP or $DALI_DIR (run 1: bash benchmarks/gpu_suite.sh --run 1)"; return 1; }
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
stash() {  # run 1: what run 2 needs from this run's transfer, into $KEEP; then real-0's pairs for the warm-up
  local name found=0
  mkdir -p "$KEEP"
  for name in part-0 real-0.tar; do
    if [[ -e $DALI_DIR/$name ]]; then cp -r "$DALI_DIR/$name" "$KEEP/" && echo "stashed $name in $KEEP"; found=1; fi
  done
  if [[ ! -e $KEEP/part-0 && $DRY_RUN != 1 ]]; then
    echo "no .dali/part-0 carried (run 1 carries it): run 2 cannot unpack DALI"; find_real; return 1
  fi
  ((found)) || echo "nothing carried to stash (dry run)"
  find_real
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
LAST=${STEPS[${#STEPS[@]}-1]}  # this run's report
RESERVE=$((CAP[$LAST] + GRACE[$LAST] + PACK))  # kept for the report and the last packing
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
  # The cap's SIGTERM reaches the whole process group: training finishes its step, saves last.pt,
  # validates and writes summary.json (the plan's SUMMARY_GRACE_S before SIGKILL); this shell waits for
  # it (a trapped signal waits for the foreground command) and then keeps the summary.
  trap ':' TERM
  local rc=0
  "$@" || rc=$?
  cp "$WORK/real-run/summary.json" "$WORK/real-summary.json" 2>/dev/null || echo "no summary.json written"
  return $rc
}
batch_auto() {  # `--batch-size auto` on this device: what it chose (config.json) and its "batch size auto:" lines
  trap ':' TERM
  # Its own cache folder with the shared lookup tables but no remembered choice: the trial runs here.
  local cache=$WORK/../auto-cache rc=0  # beside $WORK: 32 MB of tables stay out of the archive
  mkdir -p "$cache" && cp "$CITYSEG_CACHE"/lut-*.bin "$cache/" 2>/dev/null
  # Into a file, not a pipe: the cap's SIGTERM would end a `tee` and break the run's output mid-summary.
  CITYSEG_CACHE=$cache "$@" > "$WORK/batch-auto.log" 2>&1 || rc=$?
  cat "$WORK/batch-auto.log"
  "$PYTHON" - "$WORK" "$DEVICE" <<'PY' || rc=1
import json, sys
from pathlib import Path
work, device = Path(sys.argv[1]), sys.argv[2]
lines = [ln.strip() for ln in (work / "batch-auto.log").read_text().splitlines() if ln.startswith("batch size auto:")]
config = work / "auto-run" / "config.json"
batch = json.loads(config.read_text())["data"]["batch_size"] if config.exists() else None
(work / "batch-auto.json").write_text(json.dumps({"device": device, "batch_size": batch, "lines": lines}, indent=1))
print(f"batch size chosen: {batch}; printed:", *lines, sep="\n  ")
if not isinstance(batch, int):
    sys.exit("no int batch size in auto-run/config.json")
if device == "cuda" and not lines:
    sys.exit("no 'batch size auto:' line printed on the GPU")
PY
  return $rc
}
export -f environment real_e2e batch_auto

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
  local name=$1 n=${NCMD[$1]} cap=${CAP[$1]} grace=${GRACE[$1]}
  local left=$((BUDGET - ($(date +%s) - START) - grace - PACK))
  [[ $name == "$LAST" ]] || left=$((left - RESERVE))
  local limit=$((cap < left ? cap : left))
  if ((limit < 5)); then
    echo "== [$name] skipped: the run's ${BUDGET}s budget is spent"
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
    if [[ $name == stash || $name == unpack ]]; then  # in this shell: what they export must reach later steps
      "${cmd[@]}" > "$log" 2>&1; rcs+=($?)
      continue
    fi
    # timeout signals the whole process group: SIGTERM at the cap, SIGKILL `grace` seconds later.
    local run=(timeout --kill-after="$grace" "$limit")
    declare -F "${cmd[0]}" >/dev/null && run+=(bash -c '"$@"' _)
    # Tests pin the kernel's block (no autotuning: fewer Triton compiles).
    (if [[ $name == *tests ]]; then export CITYSEG_KERNEL_BLOCK=1024; fi; exec "${run[@]}" "${cmd[@]}") > "$log" 2>&1 &
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

keep_run_1() {  # run 1's results, for run 2's archive and report (/tmp outlives the run)
  mkdir -p "$KEEP/run-1" && cp "$OUT/status.tsv" "$WORK"/*.json "$WORK"/*.txt "$WORK"/*.xml "$KEEP/run-1/" 2>/dev/null
  echo "run 1's results kept in $KEEP/run-1 for run 2"
}
if [[ $RUN == 2 && -d $KEEP/run-1 ]]; then  # run 1's results join this run's archive and report
  cp "$KEEP/run-1/"*.json "$KEEP/run-1/"*.txt "$KEEP/run-1/"*.xml "$WORK/" 2>/dev/null
  tail -n +2 "$KEEP/run-1/status.tsv" | awk -F'\t' -v OFS='\t' '{$2 = $2 " (run 1)"; print}' >> "$OUT/status.tsv"
fi

echo "gpu_suite: run=$RUN dry_run=$DRY_RUN device=$DEVICE out=$OUT work=$WORK python=$PYTHON budget=${BUDGET}s"
for name in "${STEPS[@]}"; do
  step "$name"
  [[ $name == stash || $name == unpack ]] && eval "$plan_sh"
  [[ $name == prepare ]] && cp "$WORK/logs/prepare.0.log" "$WORK/env.txt"
done
[[ $RUN == 1 ]] && keep_run_1
echo
column -t -s $'\t' "$OUT/status.tsv" 2>/dev/null || cat "$OUT/status.tsv"
echo "gpu_suite: $(($(date +%s) - START))s in all; $OUT: $(cd "$OUT" && echo *)"
cp "$OUT/suite.log" "$WORK/" && pack
exit "$FAILED"
