#!/usr/bin/env bash
# bench/torch_moe: what the PyTorch front end costs (issue 24's target:
# >= 0.8). moe_layer_bench's shape (d_model 1024, d_ff 4096, 8 experts,
# top-1, dropless, fp32, 1024 tokens per trainer per step, 2 trainers, 2
# workers of one compute thread each) trained from PyTorch: two processes
# of bench/torch_moe_bench.py (switchyard.torch.MoE: router in PyTorch,
# forward, backward, step_done through switchyard._core) against `switchyard
# up --trainers 0`, then moe_layer_bench itself (C++ trainers, the same
# client code) in the same run. Prints both tokens/s and their ratio.
#
# usage: bench/torch_moe_bench.sh [BUILD_DIR]    (STEPS=N, default 10;
#        SWITCHYARD_PYTHON=interpreter with torch, default /usr/bin/python3)
set -euo pipefail
build_dir=${1:-build}
steps=${STEPS:-10}
bin="$build_dir/bin/switchyard"
python=${SWITCHYARD_PYTHON:-/usr/bin/python3}
work=$(mktemp -d -t switchyard-torch-moe.XXXXXX)
up_pid=
cleanup() {
  if [[ -n $up_pid ]]; then kill "$up_pid" 2>/dev/null || true; wait "$up_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT
cat > "$work/moe.yaml" <<YAML
cluster:
  workers: 2
  trainers: 2
model:
  num_layers: 1
  moe_every: 1
  d_model: 1024
  d_ff: 4096
  num_heads: 8
  num_experts: 8
  top_k: 1
  capacity_factor: 0
training:
  steps: 1000000
  threads: 1
  compute_dtype: fp32
  wire_dtype: fp32
YAML

"$bin" up --workers 2 --trainers 0 --run-dir "$work/run" \
  --config "$work/moe.yaml" > "$work/up.log" 2>&1 &
up_pid=$!
for _ in $(seq 600); do
  grep -q '\[up\] cluster ready' "$work/up.log" && break
  if ! kill -0 "$up_pid" 2>/dev/null; then
    echo "torch_moe: the cluster did not start:" >&2; tail -20 "$work/up.log" >&2; exit 1
  fi
  sleep 0.1
done
pids=()
for rank in 0 1; do
  PYTHONPATH="$build_dir/python" "$python" bench/torch_moe_bench.py \
    "$work/run" "$work/moe.yaml" "$rank" "$steps" "$work/rank$rank.result" \
    > "$work/rank$rank.log" 2>&1 &
  pids+=($!)
done
for rank in 0 1; do
  if ! wait "${pids[$rank]}"; then
    echo "torch_moe: rank $rank failed:" >&2; tail -20 "$work/rank$rank.log" >&2; exit 1
  fi
done
kill "$up_pid"; wait "$up_pid" 2>/dev/null || true; up_pid=
slowest=$(cat "$work"/rank*.result | sort -g | tail -1)
torch=$(awk -v s="$slowest" -v n="$steps" 'BEGIN { printf "%.0f", 2 * 1024 * n / s }')
echo "torch_moe: PyTorch (switchyard.torch.MoE): $torch tokens/s"

native=$("$build_dir/bench/moe_layer_bench" --dtype fp32 --steps "$steps" |
  tee "$work/native.log" | sed -nE 's/^ *system: *([0-9]+) tokens\/s.*/\1/p')
if [[ -z $native ]]; then
  echo "torch_moe: moe_layer_bench failed:" >&2; cat "$work/native.log" >&2; exit 1
fi
echo "torch_moe: C++ trainers (moe_layer_bench): $native tokens/s"
awk -v a="$torch" -v b="$native" \
  'BEGIN { r = a / b; printf "torch_moe: PyTorch / C++ = %.2f (target >= 0.8: %s)\n", r, (r >= 0.8 ? "met" : "NOT met") }'
