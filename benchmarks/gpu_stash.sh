#!/usr/bin/env bash
# Run 1 on the GPU machine (carry .dali/part-0 and, if made, .dali/real-0.tar): keep them in /tmp/keep,
# which outlives the run while the machine stays up; run 2's `bash benchmarks/gpu_suite.sh` finds them.
#   bash benchmarks/gpu_stash.sh          # KEEP_DIR=... to stash elsewhere (tests)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." && keep=${KEEP_DIR:-/tmp/keep} && mkdir -p "$keep" && cp -r .dali/part-0 $(ls .dali/real-0.tar 2>/dev/null) "$keep/" && ls -l "$keep"
