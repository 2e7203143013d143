#!/usr/bin/env bash
# `make demo`: the main job on a local cluster.
#
# Until the trainer's training loop lands, this starts a coordinator, two
# workers and two trainers with examples/tiny.yaml, prints the cluster's
# status once everyone has joined (placement of every expert shard), keeps it
# up for a few seconds and stops it. Set DEMO_SECONDS to keep it up longer.
set -euo pipefail
build_dir=${1:-build}
run_dir=$(mktemp -d -t switchyard-demo.XXXXXX)
trap 'rm -rf "$run_dir"' EXIT
exec_bin="$build_dir/bin/switchyard"
"$exec_bin" up --workers 2 --trainers 2 --config examples/tiny.yaml \
  --run-dir "$run_dir" --duration-s "${DEMO_SECONDS:-5}" \
  | grep -v -E '^\[(worker|trainer)-[0-9]+\] I'
