#!/usr/bin/env bash
# bench/train_step: tokens/s of full training steps of the demo model
# (examples/demo.yaml) in the distributed setting, 2 workers and 2 trainers
# as processes on loopback (`switchyard up`), against the single-process
# reference (`switchyard train --reference`) on the same data and steps.
# Prints both, their ratio (target >= 0.7; every process shares the same
# cores), and where a step's time goes on trainer 0 and in the reference.
#
# usage: bench/train_step_bench.sh [BUILD_DIR]   (STEPS=N, default 60)
set -euo pipefail
build_dir=${1:-build}
steps=${STEPS:-60}
bin="$build_dir/bin/switchyard"
work=$(mktemp -d -t switchyard-train-step.XXXXXX)
trap 'rm -rf "$work"' EXIT
scripts/demo_corpus.sh "$work/corpus"
flags=(--config examples/demo.yaml --data "$work/corpus"
       --set "training.steps=$steps" --set training.eval_every=0
       --set "training.log_every=$steps")

"$bin" train --reference --sample-bytes 0 "${flags[@]}" > "$work/reference.log" 2>&1
"$bin" up --workers 2 --trainers 2 --run-dir "$work/run" "${flags[@]}" \
  > "$work/distributed.log" 2>&1

# "done: ... 1234 tok/s" -> 1234
rate() { grep -a 'done:' "$1" | sed -E 's/.* ([0-9]+) tok\/s.*/\1/'; }
breakdown() { grep -a 'per step (ms)' "$1" | sed -E 's/.*per step \(ms\): //'; }
ref=$(rate "$work/reference.log")
dist=$(rate "$work/distributed.log")
if [[ -z $ref || -z $dist ]]; then
  echo "train_step: a run failed; logs:" >&2
  tail -20 "$work/reference.log" "$work/distributed.log" >&2
  exit 1
fi
echo "train_step: demo model, $steps steps, 2 trainers"
echo "  reference (1 process):              $ref tokens/s"
echo "    per step (ms): $(breakdown "$work/reference.log")"
echo "  distributed (2 workers, 2 trainers): $dist tokens/s"
echo "    trainer 0 per step (ms): $(breakdown "$work/distributed.log")"
awk -v d="$dist" -v r="$ref" 'BEGIN {
  ratio = d / r
  verdict = "NOT met"
  if (ratio >= 0.7) verdict = "met"
  printf "  distributed / reference = %.2f (target >= 0.7: %s)\n", ratio, verdict
}'
