#!/usr/bin/env bash
# Unpacks what the offline GPU machine lacks besides DALI into .dali/extras/ (git-ignored), to travel
# with the checkout; benchmarks/gpu_suite.sh puts .dali/extras on PYTHONPATH.
#
#   bash benchmarks/pack_extras.sh                  # cityscapesscripts (cityseg/palette.py imports its labels)
#   bash benchmarks/pack_extras.sh PKG[==V] ...     # and more, if the suite's preflight names them missing
#
# Wheels are fetched for the GPU machine's Python 3.12 on x86_64 Linux, without dependencies (name
# each one needed). Offline, cityscapesscripts is copied from the installed package instead. Its GUI
# tools (annotation/, viewer/: ~10 MB) are left out: ~0.3 MB remain. PYTHON=... picks the interpreter.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
dest=$root/.dali/extras
PY=${PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# 2.3.0: the version the project is tested with. Nothing else by default: the GPU machine has matplotlib
# (../shared/device/README.md), and run 2 carries .dali/part-1 (~35 MB) and up to 22 MB of real pairs
# beside this folder within 64 MiB (python -m benchmarks.gpu_plan --plan-only checks the sum).
pkgs=("cityscapesscripts==2.3.0" "$@")
mkdir -p "$dest"
if "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$work" "${pkgs[@]}"; then
  for whl in "$work"/*.whl; do
    "$PY" -m zipfile -e "$whl" "$dest"
    echo "unpacked $(basename "$whl")"
  done
elif (($# == 0)); then
  src=$("$PY" -c 'import cityscapesscripts, os; print(os.path.dirname(cityscapesscripts.__file__))') ||
    { echo "pack_extras: pip download failed and cityscapesscripts is not installed for $PY" >&2; exit 1; }
  rm -rf "$dest/cityscapesscripts"
  cp -r "$src" "$dest/"
  echo "pip download failed (offline?): copied the installed cityscapesscripts from $src"
else
  echo "pack_extras: pip download failed for: ${pkgs[*]}" >&2
  exit 1
fi
rm -rf "$dest/cityscapesscripts/annotation" "$dest/cityscapesscripts/viewer"
find "$dest" -name __pycache__ -type d -prune -exec rm -rf {} +
PYTHONPATH=$dest "$PY" -c 'import cityscapesscripts.helpers.labels as l; print(len(l.labels), "labels from", l.__file__)'
du -sh "$dest"
