#!/usr/bin/env bash
# GPU validation of craft_ext in one command, on a fresh GPU machine with no internet:
#
#   bash benchmarks/gpu_check.sh [--dry-run] [--skip-build] [--stages LIST] [--tests FILES]
#                                [--out DIR] [--budget SECONDS]
#
# Needs python3 with torch (a CUDA build), pybind11, scikit-build-core, pytest; nvcc, cmake, ninja and
# compute-sanitizer on PATH. lerobot is not needed. Stages, in this order:
#   env        GPU, driver and tool versions
#   build      craft_ext with CUDA kernels for sm_90 only (CRAFT_EXT_CUDA=1, CRAFT_EXT_CUDA_ARCH=90),
#              `pip install --no-build-isolation --no-deps -e .` into a throwaway venv that sees python3's
#              packages (build tree and venv under the work dir, never in the checkout's build/)
#   tests      the op tests (their CPU and CUDA cases), tests/test_surgery.py, tests/test_build.py
#   memcheck   compute-sanitizer --tool memcheck over the op tests' CUDA cases at small sizes
#   racecheck  compute-sanitizer --tool racecheck, the same cases
#   surgery32  benchmarks/grad_surgery.py --scale 1.0 (pi0-fast's full 3.45e9 elements), float32
#   surgery16  the same in bfloat16
#   mse        benchmarks/hidden_mse.py (pooled and token shapes, eager and torch.compile baselines)
# Every stage is time-boxed (its own limit, and what is left of --budget, default 560 s, so the whole
# run fits a 10-minute call); one that fails or hangs does not stop the next. After every stage the
# summary is rewritten, so a run cut short still leaves one.
#
# Output in --out (default $OUT, else build/gpu_check): gpu_check.md (the summary: stage table, test
# counts, sanitizer verdicts, benchmark tables), the benchmarks' JSON files and gpu_check.log (every
# stage's full output). Exit status 0 when every stage that ran passed.
#
# --dry-run (or GPU_CHECK_DRY_RUN=1) proves the wiring on a machine without a GPU: CPU devices, tiny
# sizes, a CPU-only build (CRAFT_EXT_CUDA=0), and the CUDA-only stages skipped with a note that shows
# the command they would run. --skip-build uses the craft_ext already importable by $PYTHON (default
# python3). --stages takes a comma-separated subset; --tests replaces the test files of `tests`.
set -u -o pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY_BASE=${PYTHON:-python3}
DRY_RUN=${GPU_CHECK_DRY_RUN:-0}
SKIP_BUILD=0
STAGES="env,build,tests,memcheck,racecheck,surgery32,surgery16,mse"
TESTS="tests/test_grad_ops.py tests/test_hidden_mse.py tests/test_surgery.py tests/test_build.py"
OUT_DIR=${OUT:-$ROOT/build/gpu_check}
BUDGET=560

while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --skip-build) SKIP_BUILD=1 ;;
    --stages) STAGES=$2; shift ;;
    --tests) TESTS=$2; shift ;;
    --out) OUT_DIR=$2; shift ;;
    --budget) BUDGET=$2; shift ;;
    -h|--help) sed -n '2,/^set -u/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/craft_gpu_check.XXXXXX")
LOG=$OUT_DIR/gpu_check.log
STATUS=$WORK/stages.tsv
: >"$LOG"
: >"$STATUS"
TAB=$(printf '\t')
START=$(date +%s)
DEADLINE=$((START + BUDGET))
PY=$PY_BASE
cd "$ROOT" || exit 2

if [ "$DRY_RUN" = 1 ]; then
  DEVICE=cpu
  export CRAFT_EXT_CUDA=${CRAFT_EXT_CUDA:-0}
  export CRAFT_TEST_SMALL=1
  SCALE=0.0001
  MSE_ARGS="--quick --no-compile"
  REPEATS=1
else
  DEVICE=cuda
  export CRAFT_EXT_CUDA=1
  SCALE=1.0
  MSE_ARGS=""
  REPEATS=7
fi
export CRAFT_EXT_CUDA_ARCH=90 PYTHONUNBUFFERED=1

# --- bookkeeping -------------------------------------------------------------------------------
record() {  # stage status seconds note
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$STATUS"
  summarize
}

wanted() { case ",$STAGES," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }

# run_stage NAME LIMIT_SECONDS CMD...: the command's output goes to WORK/NAME.log and gpu_check.log.
run_stage() {
  local name=$1 limit=$2
  shift 2
  local left=$((DEADLINE - $(date +%s) - 10))
  if [ "$left" -lt 15 ]; then
    record "$name" skipped 0 "no time left in the ${BUDGET}s budget"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
  local t0 rc
  t0=$(date +%s)
  # through bash -c so that a stage can be one of the functions below (exported with export -f)
  timeout -k 10 "$limit" bash -c '"$@"' "$name" "$@" >"$WORK/$name.log" 2>&1
  rc=$?
  cat "$WORK/$name.log" >>"$LOG"
  local sec=$(($(date +%s) - t0))
  if [ $rc -eq 0 ]; then
    record "$name" passed "$sec" ""
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    record "$name" timeout "$sec" "killed after ${limit}s"
  else
    record "$name" failed "$sec" "exit status $rc"
  fi
}

skip_cuda_stage() {  # name command...: dry run: what would run, and why it does not
  record "$1" skipped 0 "dry run (needs CUDA): ${*:2}"
}

summarize() {
  "$PY_BASE" - "$STATUS" "$WORK" "$OUT_DIR" "$DRY_RUN" "$START" <<'PYEOF' >"$OUT_DIR/gpu_check.md.tmp" && mv "$OUT_DIR/gpu_check.md.tmp" "$OUT_DIR/gpu_check.md"
import json, re, subprocess, sys, time
from pathlib import Path

status_file, work, out, dry_run, start = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4] == "1", int(sys.argv[5])
rows = [line.split("\t") for line in status_file.read_text().splitlines() if line]

def log(name):
    p = work / f"{name}.log"
    return p.read_text(errors="replace") if p.exists() else ""

def tail(text, n=40):
    return "\n".join(text.rstrip().splitlines()[-n:])

commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
print("# craft_ext GPU check" + (" (DRY RUN: CPU, tiny sizes)" if dry_run else ""))
print()
print(f"commit {commit or '?'}, started {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(start))}, "
      f"{int(time.time()) - start} s so far. Full output: gpu_check.log.")
env = log("env").strip()
if env:
    print("\n```\n" + tail(env, 30) + "\n```")
print("\n| stage | status | seconds | note |\n|---|---|---|---|")
for name, state, sec, note in rows:
    print(f"| {name} | {'**' + state + '**' if state in ('failed', 'timeout') else state} | {sec} | {note} |")

def pytest_line(text):
    found = re.findall(r"^=*\s*(\d+ (?:passed|failed|error).*?)\s*=*$", text, re.M)
    return found[-1] if found else "no pytest summary line (see gpu_check.log)"

for name, state, _sec, _note in rows:
    text = log(name)
    if name == "tests" and text:
        print(f"\n## tests\n\n{pytest_line(text)}")
        outcomes = re.findall(r"^(PASSED|FAILED|SKIPPED|ERROR) \S*cuda", text, re.M)
        if outcomes:
            print("CUDA cases: " + ", ".join(f"{outcomes.count(k)} {k.lower()}" for k in ("PASSED", "FAILED", "ERROR", "SKIPPED")))
        bad = [l for l in text.splitlines() if l.startswith(("FAILED", "ERROR"))]
        if bad:
            print("\n```\n" + "\n".join(bad[:40]) + "\n```")
    if name in ("memcheck", "racecheck") and text:
        verdict = [l for l in text.splitlines() if "SUMMARY" in l]
        print(f"\n## {name}\n\npytest: {pytest_line(text)}; sanitizer: {verdict[-1].strip() if verdict else 'no summary line'}")
        hazards = [l for l in text.splitlines() if l.startswith("=========") and "SUMMARY" not in l]
        if hazards:
            print("\n```\n" + "\n".join(hazards[:60]) + "\n```")
    if state in ("failed", "timeout") and name not in ("tests",) and text:
        print(f"\n<details><summary>{name}: last lines</summary>\n\n```\n{tail(text)}\n```\n</details>")

for name in ("surgery32", "surgery16"):
    p = out / f"grad_surgery_{'float32' if name == 'surgery32' else 'bfloat16'}.json"
    if not p.exists():
        continue
    r = json.loads(p.read_text())
    c = r["config"]
    print(f"\n## grad_surgery.py: {c['layout']} x{c['scale']}, {c['elements']:.3g} {c['dtype']} elements, {c['device']}"
          f" ({r['machine'].get('gpu') or r['machine']['processor']})\n")
    print("| impl | median ms | GB/s | of copy | time vs ours | peak extra MiB |\n|---|---|---|---|---|---|")
    for impl, row in r["results"].items():
        if "skipped" in row:
            print(f"| {impl} | skipped: {row['skipped']} | | | | |")
        else:
            print(f"| {impl} | {row['median_s'] * 1e3:.2f} | {row['gbps']:.1f} | {row['bandwidth_vs_copy']:.0%} | "
                  f"{row['ratio_to_ours']:.2f} | {row['peak_extra_bytes'] / 2**20:.0f} |")
    ours = r["results"]["ours"]
    if c["elements"] >= 1e8:
        print(f"\nTarget >= 85% of the copy's bandwidth at N >= 1e8: ours {ours['bandwidth_vs_copy']:.0%} "
              f"({'met' if ours['bandwidth_vs_copy'] >= 0.85 else 'NOT met'}).")

p = out / "hidden_mse.json"
if p.exists():
    r = json.loads(p.read_text())
    c = r["config"]
    print(f"\n## hidden_mse.py: forward + backward, student {c['student']}, {c['device']} "
          f"({r['machine'].get('gpu') or r['machine']['processor']})\n")
    print("| shape | teacher | impl | median ms | GB/s | time vs ours |\n|---|---|---|---|---|---|")
    for case in r["cases"]:
        for impl, row in case["results"].items():
            print(f"| {'tokens' if case['masked'] else 'pooled'} {case['shape']} | {case['teacher']} | {impl} | "
                  f"{row['median_s'] * 1e3:.3f} | {row['gbps']:.1f} | {row['ratio_to_ours']:.2f} |")
PYEOF
}

# --- stages ------------------------------------------------------------------------------------
env_info() {
  echo "host: $(uname -srm), $(nproc) CPUs"
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  else
    echo "nvidia-smi: not found"
  fi
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, '| CUDA', torch.version.cuda, '| GPU visible:', torch.cuda.is_available())"
  for tool in nvcc cmake ninja compute-sanitizer; do
    if command -v $tool >/dev/null; then
      echo "$tool: $($tool --version 2>&1 | grep -iE 'release|version|^[0-9]' | tail -1)"
    else
      echo "$tool: not found"
    fi
  done
}

build() {
  local venv=$WORK/venv
  "$PY_BASE" -m venv "$venv" || return 1
  # The venv sees python3's own packages (torch, pybind11, scikit-build-core): --system-site-packages
  # would not, when python3 itself runs in a venv.
  local purelib
  purelib=$("$venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  "$PY_BASE" -c "import site; print('\n'.join(site.getsitepackages()))" >"$purelib/_parent_site.pth"
  "$venv/bin/python" -m pip install --no-build-isolation --no-deps --no-index -e . -C build-dir="$WORK/build" || return 1
  "$venv/bin/python" -c "import craft_ext; print('built:', craft_ext.build_info())" || return 1
}

run_pytest() { "$PY" -m pytest -q -rfEs -p no:cacheprovider "$@"; }

# The CUDA cases that exercise the kernels (small sizes), without the slow and kernel-free ones.
SANITIZER_K="cuda and not torch_compile and not opcheck and not deterministic"
# PYTORCH_NO_CUDA_MEMORY_CACHING: every tensor its own cudaMalloc, so memcheck sees an access past a
# tensor's end (inside the caching allocator's large blocks it would not). Options this
# compute-sanitizer does not know are dropped (each is tried on `true` first).
sanitizer() {  # tool
  local opts=(--tool "$1" --error-exitcode 9 --print-limit 50) extra
  for extra in "--kernel-name kns=craft" "--report-api-errors no"; do  # craft's kernels only; torch's API noise off
    # shellcheck disable=SC2086
    if compute-sanitizer $extra true >/dev/null 2>&1; then opts+=($extra); else echo "compute-sanitizer: no $extra"; fi
  done
  echo "compute-sanitizer ${opts[*]}"
  CRAFT_TEST_SMALL=1 PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer "${opts[@]}" \
    "$PY" -m pytest -q -rfEs -p no:cacheprovider tests/test_grad_ops.py tests/test_hidden_mse.py -k "$SANITIZER_K"
}

export PY PY_BASE WORK SANITIZER_K
export -f env_info build run_pytest sanitizer

for stage in ${STAGES//,/ }; do
  case "$stage" in
    env) run_stage env 60 env_info ;;
    build)
      if [ "$SKIP_BUILD" = 1 ]; then
        record build skipped 0 "--skip-build: using the craft_ext importable by $PY_BASE"
      else
        run_stage build 330 build
        # later stages use the venv only if the build passed: a half-made venv would test whatever
        # craft_ext python3 can import instead
        grep -q "^build${TAB}passed" "$STATUS" && PY=$WORK/venv/bin/python
      fi
      ;;
    tests)
      # shellcheck disable=SC2086
      if [ "$DRY_RUN" = 1 ]; then
        run_stage tests 240 run_pytest $TESTS -k "not torch_compile"
      else
        run_stage tests 240 run_pytest -rA $TESTS
      fi
      ;;
    memcheck|racecheck)
      if [ "$DRY_RUN" = 1 ]; then
        skip_cuda_stage "$stage" "compute-sanitizer --tool $stage ... pytest tests/test_grad_ops.py tests/test_hidden_mse.py -k '$SANITIZER_K'"
      else
        run_stage "$stage" 150 sanitizer "$stage"
      fi
      ;;
    surgery32|surgery16)
      dtype=$([ "$stage" = surgery32 ] && echo float32 || echo bfloat16)
      run_stage "$stage" 150 "$PY" benchmarks/grad_surgery.py --layout pi0fast --scale "$SCALE" --dtype "$dtype" \
        --device "$DEVICE" --repeats "$REPEATS" --json "$OUT_DIR/grad_surgery_$dtype.json"
      ;;
    mse)
      run_stage mse 200 "$PY" benchmarks/hidden_mse.py --device "$DEVICE" $MSE_ARGS --json "$OUT_DIR/hidden_mse.json"
      ;;
    *) record "$stage" failed 0 "unknown stage (known: env,build,tests,memcheck,racecheck,surgery32,surgery16,mse)" ;;
  esac
done

summarize
echo "summary: $OUT_DIR/gpu_check.md ($(($(date +%s) - START)) s)"
rc=0
grep -qE "${TAB}(failed|timeout)${TAB}" "$STATUS" && rc=1
rm -rf "$WORK"
exit $rc
