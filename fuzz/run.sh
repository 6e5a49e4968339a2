#!/usr/bin/env bash
# Fuzz the compiled kernels against their pure twins with atheris/libFuzzer.
#
#   fuzz/run.sh [SECONDS]      default 60
#
# A crash, a hang (10 s on one input), running out of memory or any
# disagreement between the kernels ends the run with a non-zero status and
# leaves the input in fuzz/regressions/, which tests/test_fuzz_regressions.py
# replays from then on. FUZZ_WORK=dir keeps the growing corpus between runs
# (default: a temporary directory); fuzz/corpus/ holds the seeds and is never
# written to.
set -euo pipefail
cd "$(dirname "$0")/.."
TIME=${1:-60}
PY=${PYTHON:-python3}

if [ -n "${FUZZ_WORK:-}" ]; then
    WORK=$FUZZ_WORK
    mkdir -p "$WORK"
else
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/fastnet-fuzz.XXXXXX")
    trap 'rm -rf "$WORK"' EXIT
fi
mkdir -p fuzz/regressions

# the harness imports fastnet._c directly and refuses anything but the built extension
"$PY" fuzz/fuzz_kernels.py "$WORK" fuzz/corpus \
    -max_total_time="$TIME" -timeout=10 -rss_limit_mb=4096 -max_len=8192 \
    -artifact_prefix=fuzz/regressions/ -print_final_stats=1
