#!/usr/bin/env bash
# Multi-GPU correctness and benchmarks in one call (2 and 4 ranks where the host has them).
#   bench/mgpu_suite.sh OUT_DIR [REPLAYS]
# Each stage logs to OUT_DIR/<stage>.log; bench outputs (JSON, PNG, traces, calibration)
# go to OUT_DIR/work and are packed into OUT_DIR/mgpu_bench.tar.gz after each bench run,
# so whatever finished comes back even if a later stage runs out of time. The bench runs
# twice per rank count: over NVLink, then with NCCL_P2P_DISABLE=1 (NCCL through host
# memory, a stand-in for a network between nodes) at 256, 1024 and 2048 tokens per
# microbatch with fewer replays (bench_ep<N>_slowlink.log).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-bench/results}; REPLAYS=${2:-100}
W="$OUT_DIR/work"; mkdir -p "$W"
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$(pwd)" PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
NGPU=$(nvidia-smi -L | wc -l)
timeout 60 python3 -m pytest -q -p no:cacheprovider -m gpu -k graph_path tests/test_hf_models.py \
  > "$OUT_DIR/hf_graph.log" 2>&1; echo "hf graph path (1 GPU) rc=$?"; tail -2 "$OUT_DIR/hf_graph.log"
for n in 2 4; do
  [ "$n" -le "$NGPU" ] || continue
  timeout 100 python3 -m torch.distributed.run --standalone --nproc_per_node=$n \
    tests/mgpu_worker.py --replays "$REPLAYS" > "$OUT_DIR/mgpu_ep$n.log" 2>&1
  echo "mgpu_worker ep$n rc=$?"; grep -E "^RESULT|^FAIL" "$OUT_DIR/mgpu_ep$n.log" | head -12
done
timeout 100 python3 -m pytest -q -p no:cacheprovider -m multigpu tests/test_hf_models.py \
  > "$OUT_DIR/hf_multigpu.log" 2>&1; echo "hf multigpu rc=$?"; tail -3 "$OUT_DIR/hf_multigpu.log"
for n in 2 4; do
  [ "$n" -le "$NGPU" ] || continue
  timeout 140 python3 -m torch.distributed.run --standalone --nproc_per_node=$n \
    bench/bench_multigpu.py --out "$W" > "$OUT_DIR/bench_ep$n.log" 2>&1
  echo "bench ep$n rc=$?"; tail -22 "$OUT_DIR/bench_ep$n.log"
  tar czf "$OUT_DIR/mgpu_bench.tar.gz" -C "$W" .
done
for n in 2 4; do
  [ "$n" -le "$NGPU" ] || continue
  NCCL_P2P_DISABLE=1 timeout 150 python3 -m torch.distributed.run --standalone --nproc_per_node=$n \
    bench/bench_multigpu.py --out "$W" --slow-link --tokens 256,1024,2048 --quick --no-trace \
    > "$OUT_DIR/bench_ep${n}_slowlink.log" 2>&1
  echo "bench ep$n slow link rc=$?"; tail -20 "$OUT_DIR/bench_ep${n}_slowlink.log"
  tar czf "$OUT_DIR/mgpu_bench.tar.gz" -C "$W" .
done
