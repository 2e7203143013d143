#!/usr/bin/env bash
# `make thread-safety`: every Switchyard C++ source through clang's front end
# with its thread-safety analysis (-Wthread-safety) and our warnings, all of
# them errors. The GCC build's compile_commands.json gives each file's
# include paths and definitions (and the generated protobuf headers), so
# this checks exactly what the build compiles, without a second full build.
#
# Usage: scripts/thread_safety.sh [BUILD_DIR]   (default: build)
# Environment: JOBS (default: nproc) files checked at a time; CLANGXX
# (default: clang++).
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build}
clangxx=${CLANGXX:-clang++}
if [[ ! -f "$build/compile_commands.json" ]]; then
  echo "thread-safety: $build/compile_commands.json is missing: build first" >&2
  exit 2
fi
list=$(mktemp)
trap 'rm -f "$list"' EXIT
# One line per source of ours: the flags clang needs, then the file. Our
# sources are those of the project tree outside build folders (not the
# generated protobuf code, not CUDA).
python3 - "$build/compile_commands.json" "$PWD" > "$list" <<'PY'
import json, shlex, sys
root = sys.argv[2] + "/"
for entry in json.load(open(sys.argv[1])):
    f = entry["file"]
    if not f.startswith(root) or not f.endswith(".cc"):
        continue
    if f[len(root):].startswith("build"):
        continue
    args = shlex.split(entry["command"]) if "command" in entry else entry["arguments"]
    keep, take_next = [], False
    for a in args[1:]:
        if take_next:
            keep.append(a)
            take_next = False
        elif a in ("-isystem", "-I", "-D", "-include"):
            keep.append(a)
            take_next = True
        elif a.startswith(("-I", "-D", "-std=", "-isystem", "-fopenmp")):
            keep.append(a)
    print(" ".join(shlex.quote(a) for a in keep + [f]))
PY
count=$(wc -l < "$list")
echo "thread-safety: checking $count sources with $($clangxx --version | head -1)"
# shellcheck disable=SC2016
xargs -P "${JOBS:-$(nproc)}" -L 1 sh -c '"$0" -fsyntax-only -Wall -Wextra \
  -Wno-unused-parameter -Wthread-safety -Werror "$@"' \
  "$clangxx" < "$list"
echo "thread-safety: ok ($count sources)"
