#!/usr/bin/env bash
# `make demo`: the main job on a local cluster.
#
# Builds a six-language corpus from Debian's fortunes (scripts/demo_corpus.sh)
# and trains examples/demo.yaml with `switchyard up`: a coordinator, 2 expert
# workers and 2 trainers, each its own process, talking over loopback (UCX
# data plane, authenticated control plane). Trainer 0 prints the loss falling
# from ln 256 = 5.5, the validation loss, a text sample, and which experts
# each language routes to. Set DEMO_STEPS to train longer or shorter (default 600, about 5 min on
# 2 cores).
set -euo pipefail
build_dir=${1:-build}
run_dir=$(mktemp -d -t switchyard-demo.XXXXXX)
trap 'rm -rf "$run_dir"' EXIT
corpus="$build_dir/demo-corpus"
scripts/demo_corpus.sh "$corpus"
exec_bin="$build_dir/bin/switchyard"
echo "demo: training on $(du -sh "$corpus" | cut -f1) of text in $(ls "$corpus" | wc -l) languages"
# Info-level log lines of the members are left out; warnings and errors stay.
"$exec_bin" up --workers 2 --trainers 2 --config examples/demo.yaml \
  --data "$corpus" --run-dir "$run_dir" \
  --set "training.steps=${DEMO_STEPS:-600}" \
  | grep --line-buffered -a -v -E '^\[(coordinator|worker-[0-9]+|trainer-[0-9]+)\] I'
