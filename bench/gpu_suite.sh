#!/usr/bin/env bash
# Everything a GPU host runs, in one script: GPU tests, the 1-GPU bench, the multi-GPU bench.
#
#   bench/gpu_suite.sh [OUT_DIR] [--quick]
#
# OUT_DIR defaults to $OUT, else bench/results. Installs nothing (greenlet must be importable
# and PYTHONPATH set to the repository root beforehand). Stages, chosen with STAGES (default
# "pytest 1gpu depth shapes multigpu"):
#   pytest    python3 -m pytest -q -m gpu tests/      -> OUT_DIR/pytest_gpu.log
#   1gpu      python3 -m bench.run_bench --out OUT_DIR -> OUT_DIR/bench_1gpu.log
#             (with --no-shapes when the shapes stage runs on its own)
#   depth     the DBO graph at comm = compute for deeper models (DEPTHS, default "16 32"
#             layers; DEPTH_TOKENS, default "32 64 128 256 512" tokens per microbatch;
#             DEPTH_STEPS, default "1" decode steps per graph; graphs only)
#                                                    -> OUT_DIR/bench_depth.log
#   shapes    python3 -m bench.shapes: four model shapes, schedule planned at start-up,
#             planned vs fallback DBO graph at comm = compute -> OUT_DIR/bench_shapes.log
#   profile   (not in the default) bench.probes.kernel_probe, then bench.profile_layer at
#             PROFILE_TOKENS (default "128 512")      -> OUT_DIR/profile.log
#   multigpu  torchrun --nproc_per_node=N bench/bench_multigpu.py for N in NPROCS (default:
#             2 and 4 where the host has that many GPUs) -> OUT_DIR/bench_ep<N>.log; then,
#             unless SLOWLINK=0, again with NCCL_P2P_DISABLE=1 (NCCL through host memory,
#             a stand-in for a network) at SLOWLINK_TOKENS (default 256,1024,2048), fewer
#             replays                                   -> OUT_DIR/bench_ep<N>_slowlink.log
# then prints a short summary (python3 -m bench.report OUT_DIR).
# Each stage has a time limit (seconds): PYTEST_TIMEOUT (300), BENCH_TIMEOUT (600),
# DEPTH_TIMEOUT (240 per run), SHAPES_TIMEOUT (420), PROFILE_TIMEOUT (120 per run),
# MGPU_TIMEOUT (300 per N), SLOWLINK_TIMEOUT (180 per N).
# A failing stage is reported and the next one still runs; the exit status is that of the
# first failing stage.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT_DIR="${OUT:-bench/results}"
QUICK=""
for arg in "$@"; do
  case "$arg" in
    --quick) QUICK="--quick" ;;
    -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
    *) OUT_DIR="$arg" ;;
  esac
done
mkdir -p "$OUT_DIR"
STAGES="${STAGES:-pytest 1gpu depth shapes multigpu}"
PYTHON="${PYTHON:-python3}"
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$(pwd)"
# NVLink multicast stays off on these hosts (it can take shared GPUs out of service).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

NGPU=$(nvidia-smi -L 2>/dev/null | wc -l)
echo "== gpu_suite: $NGPU GPU(s), out=$OUT_DIR, stages: $STAGES ${QUICK}"
nvidia-smi -L 2>/dev/null || true
$PYTHON -c "import torch, greenlet; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'greenlet', greenlet.__version__, 'nccl', torch.cuda.nccl.version() if torch.cuda.is_available() else None)" \
  || { echo "torch/greenlet not importable: install greenlet and set PYTHONPATH first"; exit 2; }

STATUS=0
declare -a RESULTS=()
record() {  # record NAME RC
  local name=$1 rc=$2
  if [ "$rc" -eq 0 ]; then RESULTS+=("$name: ok"); else
    RESULTS+=("$name: FAILED (exit $rc$([ "$rc" -eq 124 ] && echo ', timed out'))")
    [ "$STATUS" -eq 0 ] && STATUS=$rc
  fi
}

if [[ " $STAGES " == *" pytest "* ]]; then
  echo "== pytest -m gpu (log: $OUT_DIR/pytest_gpu.log)"
  timeout "${PYTEST_TIMEOUT:-300}" $PYTHON -m pytest -q -m gpu tests/ 2>&1 | tee "$OUT_DIR/pytest_gpu.log"
  rc=${PIPESTATUS[0]}
  [ "$rc" -eq 5 ] && rc=0  # no test selected is not a failure
  record "pytest -m gpu" "$rc"
fi

if [[ " $STAGES " == *" 1gpu "* ]]; then
  echo "== 1-GPU bench (log: $OUT_DIR/bench_1gpu.log)"
  NO_SHAPES=""; [[ " $STAGES " == *" shapes "* ]] && NO_SHAPES="--no-shapes"
  timeout "${BENCH_TIMEOUT:-600}" $PYTHON -m bench.run_bench --out "$OUT_DIR" $QUICK $NO_SHAPES 2>&1 | tee "$OUT_DIR/bench_1gpu.log"
  record "1-GPU bench" "${PIPESTATUS[0]}"
fi

if [[ " $STAGES " == *" depth "* ]]; then
  echo "== depth: DBO graph at comm = compute, deeper models (log: $OUT_DIR/bench_depth.log)"
  rc=0
  for layers in ${DEPTHS:-16 32}; do
    for steps in ${DEPTH_STEPS:-1}; do
      timeout "${DEPTH_TIMEOUT:-240}" $PYTHON -m bench.gpu_bench --graphs-only --ratios 1 \
        --tokens ${DEPTH_TOKENS:-32 64 128 256 512} --layers "$layers" --steps "$steps" \
        --out "$OUT_DIR/depth" 2>&1 | tee -a "$OUT_DIR/bench_depth.log"
      r=${PIPESTATUS[0]}; [ "$r" -ne 0 ] && rc=$r
    done
  done
  record "depth" "$rc"
fi

if [[ " $STAGES " == *" shapes "* ]]; then
  echo "== shapes: planned schedule per model shape (log: $OUT_DIR/bench_shapes.log)"
  timeout "${SHAPES_TIMEOUT:-420}" $PYTHON -m bench.shapes --out "$OUT_DIR" $QUICK 2>&1 | tee "$OUT_DIR/bench_shapes.log"
  record "shapes" "${PIPESTATUS[0]}"
fi

if [[ " $STAGES " == *" profile "* ]]; then
  echo "== profile: kernel probe and per-stretch profile (log: $OUT_DIR/profile.log)"
  rc=0
  timeout "${PROFILE_TIMEOUT:-120}" $PYTHON -m bench.probes.kernel_probe 2>&1 | tee -a "$OUT_DIR/profile.log"
  r=${PIPESTATUS[0]}; [ "$r" -ne 0 ] && rc=$r
  for tokens in ${PROFILE_TOKENS:-128 512}; do
    timeout "${PROFILE_TIMEOUT:-120}" $PYTHON -m bench.profile_layer --tokens "$tokens" 2>&1 \
      | grep -v -i "warn" | tee -a "$OUT_DIR/profile.log"
    r=${PIPESTATUS[0]}; [ "$r" -ne 0 ] && rc=$r
  done
  record "profile" "$rc"
fi

if [[ " $STAGES " == *" multigpu "* ]]; then
  if [ "$NGPU" -ge 2 ]; then
    NPROCS="${NPROCS:-$(for n in 2 4 8; do [ "$n" -le "$NGPU" ] && [ "$n" -le 4 ] && printf '%s ' "$n"; done)}"
    for n in $NPROCS; do
      echo "== multi-GPU bench, $n ranks (log: $OUT_DIR/bench_ep$n.log)"
      timeout "${MGPU_TIMEOUT:-300}" $PYTHON -m torch.distributed.run --standalone --nproc_per_node="$n" \
        bench/bench_multigpu.py --out "$OUT_DIR" $QUICK 2>&1 | tee "$OUT_DIR/bench_ep$n.log"
      record "multi-GPU bench ep$n" "${PIPESTATUS[0]}"
      if [ "${SLOWLINK:-1}" != 0 ]; then
        echo "== multi-GPU bench, $n ranks, slow link (log: $OUT_DIR/bench_ep${n}_slowlink.log)"
        NCCL_P2P_DISABLE=1 timeout "${SLOWLINK_TIMEOUT:-180}" $PYTHON -m torch.distributed.run \
          --standalone --nproc_per_node="$n" bench/bench_multigpu.py --out "$OUT_DIR" \
          --slow-link --tokens "${SLOWLINK_TOKENS:-256,1024,2048}" --quick --no-trace 2>&1 \
          | tee "$OUT_DIR/bench_ep${n}_slowlink.log"
        record "multi-GPU bench ep$n slow link" "${PIPESTATUS[0]}"
      fi
    done
  else
    RESULTS+=("multi-GPU bench: skipped ($NGPU GPU)")
  fi
fi

echo "== summary"
$PYTHON -m bench.report "$OUT_DIR" 2>&1 | tee "$OUT_DIR/summary.log"
for line in "${RESULTS[@]}"; do echo "  $line"; done
exit "$STATUS"
