#!/usr/bin/env bash
# Build the compiled kernels with AddressSanitizer and UndefinedBehaviorSanitizer
# (or plain, for valgrind) into a throwaway copy of the tree and run the tests
# there; the working tree and its installed build are left alone.
#
#   tools/sanitize.sh                 ASan + UBSan, the whole suite on the compiled kernels
#   tools/sanitize.sh asan tests/test_framing.py tests/test_fuzz_stateful.py
#   tools/sanitize.sh valgrind        memcheck over the kernels' fuzz tests (slow: many minutes)
#
# Any sanitizer report or memcheck error fails the run (exit status != 0).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
MODE=${1:-asan}
[ $# -gt 0 ] && shift
# the interpreter itself, not a wrapper script (pyenv's shims): valgrind must run it
PY=$("${PYTHON:-python3}" -c 'import sys; print(sys.executable)')

case "$MODE" in
    asan|valgrind) ;;
    *) echo "usage: $0 [asan|valgrind] [pytest args...]" >&2; exit 2 ;;
esac

WORK=$(mktemp -d "${TMPDIR:-/tmp}/fastnet-$MODE.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# the sources as they are now, committed or not, without any build products
tar -C "$ROOT" --exclude=./.git --exclude=./build --exclude='*.so' --exclude='./src_c/*.c' \
    --exclude=__pycache__ --exclude=.hypothesis --exclude='*.egg-info' -cf - . | tar -C "$WORK" -xf -
cd "$WORK"

if [ "$MODE" = asan ]; then
    # setup.py's -O3 stays (the code under test is the optimised one); the runtimes abort on the first report
    export CFLAGS="-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer -g"
    export LDFLAGS="-fsanitize=address,undefined"
else
    export CFLAGS="-g"
fi
"$PY" setup.py build_ext --inplace -q --build-temp "$WORK/build-temp" >/dev/null 2>&1 ||
    { echo "the sanitized build failed:" >&2; "$PY" setup.py build_ext --inplace -q --build-temp "$WORK/build-temp"; exit 1; }
for so in fastnet/_c/*.so; do
    if [ "$MODE" = asan ] && ! nm -D "$so" | grep __asan_init >/dev/null; then
        echo "$so was not built with ASan" >&2; exit 1
    fi
done

if [ $# -eq 0 ]; then
    if [ "$MODE" = asan ]; then
        set -- tests
    else
        # the kernels' own fuzz tests: test_framing.py's watchdogs are too short for memcheck's pace
        set -- tests/test_fuzz_stateful.py tests/test_fuzz_regressions.py
    fi
fi

unset FASTNET_PURE
# pymalloc would hide small-object overruns inside its arenas: every object goes through malloc
export PYTHONMALLOC=malloc
export PYTHONDONTWRITEBYTECODE=1

if [ "$MODE" = asan ]; then
    # CPython is not built with ASan: its runtime must be loaded before anything else.
    # Leak checking is off because the interpreter keeps its own objects until exit;
    # a huge header's allocation attempt must fail as it does without ASan, not abort.
    LD_PRELOAD="$(${CC:-gcc} -print-file-name=libasan.so):$(${CC:-gcc} -print-file-name=libubsan.so)" \
    ASAN_OPTIONS="detect_leaks=0:allocator_may_return_null=1:abort_on_error=1:halt_on_error=1:detect_stack_use_after_return=1:strict_string_checks=1:check_initialization_order=1" \
    UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1" \
        "$PY" -m pytest -q -p no:cacheprovider "$@"
else
    # the interpreter runs some 30 times slower under memcheck: fewer hypothesis examples
    export FASTNET_FUZZ_SCALE=${FASTNET_FUZZ_SCALE:-0.1}
    status=0
    valgrind --tool=memcheck --leak-check=no --track-origins=yes \
        --trace-children=no --xml=yes --xml-file="$WORK/memcheck.%p.xml" \
        "$PY" -m pytest -q -p no:cacheprovider "$@" || status=$?
    # CPython and glibc have memcheck reports of their own (vectorised string
    # compares reading past the end, and the like); the run fails on any report
    # with a frame in one of fastnet's extensions, and lists the others' count.
    "$PY" - "$WORK"/memcheck.*.xml <<'PYEOF' || status=1
import re
import sys
import xml.etree.ElementTree as ET

# One file per process (tests fork), some cut short where a child was killed:
# the reports are read one by one. Leaks are not looked for: the interpreter
# keeps its objects until exit.
errors = []
for path in sys.argv[1:]:
    with open(path, encoding="utf-8", errors="replace") as f:
        for block in re.findall(r"<error>.*?</error>", f.read(), re.S):
            e = ET.fromstring(block)
            if not (e.findtext("kind") or "").startswith("Leak_"):
                errors.append(e)
ours = [e for e in errors
        if any("/fastnet/_c/" in (f.findtext("obj") or "") for f in e.iter("frame"))]
for e in ours:
    print("memcheck:", e.findtext("kind"), e.findtext("what") or e.findtext("xwhat/text"))
    for f in e.iter("frame"):
        print("   ", f.findtext("fn"), f.findtext("file") or f.findtext("obj"), f.findtext("line") or "")
print(f"memcheck: {len(ours)} reports in fastnet's extensions, {len(errors) - len(ours)} in the interpreter and libc")
sys.exit(1 if ours else 0)
PYEOF
    [ "$status" -eq 0 ] || exit "$status"
fi
echo "$MODE: no errors reported"
