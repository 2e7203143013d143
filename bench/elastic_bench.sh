#!/usr/bin/env bash
# bench/elastic: live moves during a run (docs/operations.md, "Scaling").
# The demo model widened so that shards weigh something (d_model 512, d_ff
# 2048: 16 expert shards of 12 MiB with their optimizer state), 2 workers
# and 2 trainers under `switchyard up`; a third worker joins at step
# JOIN_AT and worker-0 is drained (`switchyard drain`) at step DRAIN_AT.
# Prints:
#   - whether the run ended bit-identical to the same run without moves,
#     and the steps redone (target: identical, 0);
#   - the step that switched over against the median step, for each move
#     (target: <= 1.5x);
#   - the drain's transfer rate (the new homes' `took over ... MB/s`)
#     against bench/transport's shm bandwidth at 4 MiB, measured in the
#     same run (target: >= 0.5).
# Step times come from rank 0's progress lines (training.log_every=1),
# stamped as they arrive.
#
# usage: bench/elastic_bench.sh [BUILD_DIR]   (STEPS=N, default 60;
#        JOIN_AT=N, default 15; DRAIN_AT=N, default 45: moves away
#        from the checkpoints at every 20th step, whose own cost a move's step
#        would otherwise be charged with)
set -euo pipefail
build_dir=${1:-build}
steps=${STEPS:-60}
join_at=${JOIN_AT:-15}
drain_at=${DRAIN_AT:-45}
bin="$build_dir/bin/switchyard"
python=/usr/bin/python3
work=$(mktemp -d -t switchyard-elastic.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2> /dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
scripts/demo_corpus.sh "$work/corpus" > /dev/null
flags=(--config examples/demo.yaml --data "$work/corpus"
       --set "training.steps=$steps" --set training.eval_every=0
       --set training.log_every=1 --set checkpoint.every=20
       --set model.d_model=512 --set model.d_ff=2048 --set training.batch_size=4
       --set training.threads=1 --set cluster.heartbeat_ms=100)
# Each line prefixed with the wall time it arrived at.
stamp() { "$python" -u -c '
import sys, time
for line in sys.stdin:
    sys.stdout.write("%.4f %s" % (time.time(), line))
    sys.stdout.flush()'; }
wait_for() {  # wait_for FILE TEXT
  for _ in $(seq 1 6000); do
    grep -q -- "$2" "$1" 2> /dev/null && return 0
    sleep 0.05
  done
  echo "elastic: '$2' never appeared in $1" >&2
  tail -20 "$1" >&2
  exit 1
}
digests() { grep -aho 'digest [A-Z0-9.]* [0-9a-f]*' "$@" | sort -u; }

echo "elastic: widened demo model, $steps steps; a join at step $join_at, a drain at step $drain_at"
"$bin" up --workers 2 --trainers 2 --run-dir "$work/static" "${flags[@]}" \
  > "$work/static.log" 2>&1
"$bin" up --workers 2 --trainers 2 --run-dir "$work/run" "${flags[@]}" 2>&1 \
  | stamp > "$work/up.log" &
pids+=($!)
wait_for "$work/up.log" "\[trainer-0\] step $join_at/"
"$bin" worker --name worker-2 "${flags[@]}" --drain-on-stop=false \
  --set "cluster.state_dir=$work/run" --set "cluster.secret_file=$work/run/secret" \
  --set cluster.workers=2 \
  --set "cluster.coordinator_address=$(cat "$work/run/coordinator.addr")" \
  > "$work/worker-2.log" 2>&1 &
pids+=($!)
wait_for "$work/up.log" "\[trainer-0\] step $drain_at/"
"$bin" drain worker-0 --run-dir "$work/run" "${flags[@]}" > "$work/drain.log" 2>&1
wait "${pids[0]}"
kill "${pids[1]}" 2> /dev/null || true
wait "${pids[1]}" 2> /dev/null || true

if [[ "$(digests "$work/static.log")" == "$(digests "$work/up.log" "$work/worker-2.log")" ]]; then
  identical=identical
else
  identical=DIFFERENT
fi
redone=$(grep -ac 'recovery [0-9]*: epoch' "$work/up.log" || true)
echo "  end of run: $identical to the run without moves; recoveries (steps redone): $redone"
# Step durations: "T [trainer-0] step N/M ..." -> N and T - T(previous).
"$python" - "$work/drain_mbs" "$drain_at" "$work/up.log" "$work/worker-2.log" <<'EOF'
import re, statistics, sys
out, drain_at = sys.argv[1], int(sys.argv[2])
up = open(sys.argv[3], errors="replace").read().splitlines()
times = {}
for line in up:
    m = re.match(r"([0-9.]+) \[trainer-0\] step (\d+)/", line)
    if m:
        times[int(m.group(2))] = float(m.group(1))
durations = {s: times[s] - times[s - 1] for s in times if s - 1 in times}
median = statistics.median(durations.values())
moves = []
for line in up:
    m = re.search(r"trainer-0: epoch \d+ continues at step (\d+) after a pause of (\d+) ms", line)
    if m:
        moves.append((int(m.group(1)), int(m.group(2))))
for step, pause in moves:
    # The switch-over is in the step whose progress line follows the pause.
    worst = max(durations.get(step, 0), durations.get(step + 1, 0))
    ratio = worst / median
    print("  move at step %d: paused %d ms; that step %.0f ms, median step %.0f ms: %.2fx (target <= 1.5: %s)"
          % (step, pause, worst * 1e3, median * 1e3, ratio, "met" if ratio <= 1.5 else "NOT met"))
rates = []
for name in sys.argv[3:]:
    for line in open(name, errors="replace"):
        m = re.search(r"took over (\d+) shards live at step (\d+) \((\d+) bytes in ([0-9.e-]+) s", line)
        if m:
            rates.append((int(m.group(2)), int(m.group(3)), float(m.group(4))))
for step, nbytes, seconds in sorted(rates):
    print("  took over %.1f MiB at step %d in %.3f s: %.0f MB/s" % (nbytes / 2**20, step, seconds, nbytes / seconds / 1e6))
# The drain: every byte the new homes took over, in the slowest one's time.
drained = [(n, t) for step, n, t in rates if step >= drain_at]
total = sum(n for n, t in drained)
slowest = max((t for n, t in drained), default=0)
open(out, "w").write("%d\n" % (total / slowest / 1e6 if slowest > 0 else 0))
EOF
drain_mbs=$(cat "$work/drain_mbs")
transport_mbs=$("$build_dir/bench/transport_bench" --bytes 4194304 --transport shm --rounds 3 2>&1 \
  | awk '$1 == "shm" && $2 == "4194304" {print $3; exit}')
awk -v a="$drain_mbs" -v b="$transport_mbs" 'BEGIN {
  ratio = 0
  if (b > 0) ratio = a / b
  verdict = "NOT met"
  if (ratio >= 0.5) verdict = "met"
  printf "  drain: %d MB/s (bytes moved over the slowest new home'"'"'s time); bench/transport shm 4 MiB echo: %d MB/s; ratio %.2f (target >= 0.5: %s)\n", a, b, ratio, verdict
}'
