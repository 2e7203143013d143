#!/usr/bin/env bash
# Installs every Debian package that Switchyard's build, tests, demo and
# benchmarks need. Idempotent: packages already installed are skipped, and a
# second run makes no apt-get call at all.
#
# Environment:
#   SWITCHYARD_SKIP_BOOTSTRAP=1  do nothing (for machines provisioned otherwise)
set -euo pipefail

if [[ "${SWITCHYARD_SKIP_BOOTSTRAP:-0}" == "1" ]]; then
  exit 0
fi

packages=(
  # Toolchain.
  build-essential cmake pkg-config git clang-format procps iproute2
  # clang for `make thread-safety` (-Wthread-safety) and `make fuzz`;
  # libFuzzer and the sanitizers' runtimes for clang (only recommended by
  # clang, which --no-install-recommends skips).
  clang libclang-rt-14-dev
  # Control plane, config, logging, tests.
  libboost-dev libboost-system-dev
  libprotobuf-dev protobuf-compiler
  libgoogle-glog-dev libgflags-dev
  libgtest-dev libgmock-dev
  # The independent safetensors reader in the export test; the PyTorch
  # front end (python/switchyard) and its binding.
  python3 python3-dev python3-torch pybind11-dev
  libyaml-cpp-dev libssl-dev libxxhash-dev
  # Storage, data plane, compute.
  librocksdb-dev libucx-dev ucx-utils libopenblas-dev libopenblas0-openmp
  libdnnl-dev
  # Demo corpus: multilingual text in several scripts.
  fortunes fortunes-de fortunes-es fortunes-it fortunes-ru fortunes-zh
)

missing=()
for pkg in "${packages[@]}"; do
  status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
  if [[ "$status" != "install ok installed" ]]; then
    missing+=("$pkg")
  fi
done

if [[ ${#missing[@]} -eq 0 ]]; then
  exit 0
fi

echo "bootstrap: installing ${missing[*]}"
sudo=""
if [[ $(id -u) -ne 0 ]]; then
  sudo="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -q
$sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
