#!/usr/bin/env bash
# bench/demo_vs_torch: the whole demo job (examples/demo.yaml) trained by
# Switchyard (`switchyard up`: coordinator, 2 workers, 2 trainers, each its
# own process on loopback) against the same job in plain PyTorch
# (bench/torch_demo_bench.py: the same model and shapes, DDP over gloo with
# 2 ranks of 1 thread, every expert local) on the same corpus, one after
# the other in this run. Prints both tokens/s and their ratio (issue 23's
# target: >= 1, Switchyard at least as fast). Validation passes are off in
# both, so that only training is timed.
#
# usage: bench/demo_vs_torch.sh [BUILD_DIR]    (STEPS=N, default 100;
#        SWITCHYARD_PYTHON=interpreter with torch, default /usr/bin/python3)
set -euo pipefail
build_dir=${1:-build}
steps=${STEPS:-100}
bin="$build_dir/bin/switchyard"
python=${SWITCHYARD_PYTHON:-/usr/bin/python3}
work=$(mktemp -d -t switchyard-demo-vs-torch.XXXXXX)
trap 'rm -rf "$work"' EXIT
scripts/demo_corpus.sh "$work/corpus" > /dev/null

"$bin" up --workers 2 --trainers 2 --config examples/demo.yaml \
  --data "$work/corpus" --run-dir "$work/run" --set "training.steps=$steps" \
  --set training.eval_every=0 --set "training.log_every=$steps" \
  > "$work/switchyard.log" 2>&1
"$python" bench/torch_demo_bench.py examples/demo.yaml "$work/corpus" "$steps" \
  > "$work/torch.log" 2>&1

# "done: ... 1234 tok/s" -> 1234; "torch_demo: ... 1234 tokens/s" -> 1234
sy=$(grep -a 'trainer-0.*done:' "$work/switchyard.log" | sed -E 's/.* ([0-9]+) tok\/s.*/\1/')
pt=$(grep -a '^torch_demo:' "$work/torch.log" | sed -E 's/.* ([0-9]+) tokens\/s.*/\1/')
if [[ -z $sy || -z $pt ]]; then
  echo "demo_vs_torch: a run failed; logs:" >&2
  tail -20 "$work/switchyard.log" "$work/torch.log" >&2
  exit 1
fi
echo "demo_vs_torch: demo model, $steps steps, 2 trainers"
echo "  switchyard up:                  $sy tokens/s"
echo "    trainer 0 per step (ms): $(grep -a 'trainer-0.*per step (ms)' "$work/switchyard.log" | sed -E 's/.*per step \(ms\): //')"
echo "  plain PyTorch (DDP, gloo):      $pt tokens/s"
awk -v s="$sy" -v p="$pt" 'BEGIN {
  ratio = s / p
  verdict = "NOT met"
  if (ratio >= 1) verdict = "met"
  printf "  switchyard / pytorch = %.2f (target >= 1: %s)\n", ratio, verdict
}'
