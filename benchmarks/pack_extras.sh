#!/usr/bin/env bash
# Puts cityscapesscripts (pure Python: cityseg/palette.py and cityseg/data/synth.py import its label
# table) under .dali/extras/ (git-ignored), to travel with the checkout to the offline GPU machine,
# where benchmarks/gpu_suite.sh puts .dali/extras on PYTHONPATH.
#
#   bash benchmarks/pack_extras.sh          # on the CPU machine; PYTHON=... to pick the interpreter
#
# It downloads the wheel with pip (no dependencies: the label table needs none), or, offline, copies
# the installed package; the GUI tools (annotation/, viewer/: ~10 MB) are left out. About 0.6 MB.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
dest=$root/.dali/extras
PY=${PYTHON:-python3}
VERSION=2.3.0  # the version the project is tested with
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

rm -rf "$dest/cityscapesscripts" "$dest"/cityscapesscripts-*.dist-info
mkdir -p "$dest"
if "$PY" -m pip download -q --no-deps --only-binary=:all: -d "$work" "cityscapesscripts==$VERSION" 2>/dev/null; then
  "$PY" -m zipfile -e "$work"/cityscapesscripts-*.whl "$dest"
  echo "unpacked $(basename "$work"/cityscapesscripts-*.whl) into $dest"
else
  src=$("$PY" -c 'import cityscapesscripts, os; print(os.path.dirname(cityscapesscripts.__file__))') ||
    { echo "pack_extras: pip download failed and cityscapesscripts is not installed for $PY" >&2; exit 1; }
  cp -r "$src" "$dest/"
  echo "pip download failed (offline?): copied the installed package from $src"
fi
rm -rf "$dest/cityscapesscripts/annotation" "$dest/cityscapesscripts/viewer"
find "$dest" -name __pycache__ -type d -prune -exec rm -rf {} +
PYTHONPATH=$dest "$PY" -c 'import cityscapesscripts.helpers.labels as l; print(len(l.labels), "labels from", l.__file__)'
du -sh "$dest"
