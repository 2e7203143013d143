#!/usr/bin/env bash
# Builds the demo's multilingual corpus from Debian's fortunes packages
# (installed by scripts/bootstrap.sh): one file per language, each the first
# BYTES_PER_LANGUAGE bytes of that package's fortune files in path order
# (index .dat files and the offensive set left out).
#
# usage: scripts/demo_corpus.sh OUT_DIR
set -euo pipefail
out=${1:?usage: $0 OUT_DIR}
bytes=${BYTES_PER_LANGUAGE:-300000}
mkdir -p "$out"
for pair in english:fortunes german:fortunes-de spanish:fortunes-es \
            italian:fortunes-it russian:fortunes-ru chinese:fortunes-zh; do
  lang=${pair%%:*}
  pkg=${pair#*:}
  if ! dpkg -L "$pkg" >/dev/null 2>&1; then
    echo "demo_corpus: package $pkg is not installed (run scripts/bootstrap.sh)" >&2
    exit 1
  fi
  dpkg -L "$pkg" | grep '^/usr/share/games/fortunes/' | grep -v -e '\.dat$' \
    -e '\.u8$' -e '/off/' | sort | while read -r f; do
      if [[ -f $f && ! -L $f ]]; then cat "$f"; fi
    done > "$out/$lang.all"
  head -c "$bytes" "$out/$lang.all" > "$out/$lang.txt"
  rm -f "$out/$lang.all"
  if [[ ! -s $out/$lang.txt ]]; then
    echo "demo_corpus: no text for $lang from $pkg" >&2
    exit 1
  fi
done
