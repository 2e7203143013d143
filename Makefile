# Switchyard top-level Makefile: a thin wrapper over CMake.
#   make              release build into build/
#   make test         bootstrap, build, format check, every test through ctest
#   make demo         bootstrap, build, run the main job on a local cluster
#   make bench        bootstrap, build, run the benchmarks (bench/)
#   make chaos        bootstrap, build, the crash tests at full size:
#                     CHAOS_ITERATIONS (default 200) kill -9s of a checkpoint
#                     writer, and the chaos harness on the demo model with
#                     CHAOS_FAULTS (default 13) faults of each of 5 kinds
#                     (65 in all; 4 kinds without root, no partitions;
#                     `make test` runs 20 kill -9s and 5 faults of each
#                     kind on the tiny model)
#   make thread-safety  every source through clang's -Wthread-safety
#                     analysis and our warnings, as errors (needs `build`)
#   make asan         ASan+UBSan build in build-asan/, then the whole suite
#   make tsan         TSan build in build-tsan/, then TSAN_TESTS (the
#                     transport, storage, worker and common unit tests)
#   make fuzz         libFuzzer build (clang, ASan+UBSan) in build-fuzz/, then
#                     every fuzzer of fuzz/ for FUZZ_SECONDS (default 600)
#                     each from a copy of its seed corpus; fails on any
#                     finding (scripts/fuzz.sh)
#   make soak-tests   SOAK_PASSES (default 10) full ctest passes beside two
#                     busy loops; prints the failures per test
#   make format       rewrite sources with clang-format
#   make format-check fail if any source differs from clang-format's output
BUILD_DIR ?= build
BUILD_TYPE ?= Release
JOBS ?= $(shell nproc)
CTEST_ARGS ?=

# Tracked and new (untracked, not ignored) files alike.
SOURCES = $(shell git ls-files --cached --others --exclude-standard '*.cc' '*.h' '*.cu' '*.proto' 2>/dev/null)

CHAOS_ITERATIONS ?= 200
# The chaos harness (tests/e2e/chaos_test.cc): faults of each kind, the
# seed of their schedule, the model, steps and checkpoint interval.
CHAOS_FAULTS ?= 13
CHAOS_SEED ?= 1
CHAOS_CONFIG ?= examples/demo.yaml
CHAOS_STEPS ?= 1500
CHAOS_EVERY ?= 20

.PHONY: all build bootstrap test demo bench chaos format format-check clean \
        thread-safety asan tsan soak-tests fuzz

SOAK_PASSES ?= 10
# Sanitizer builds: no CUDA (nvcc's host pass takes no sanitizer flags).
SANITIZER_CMAKE = -DCMAKE_BUILD_TYPE=Release -DSWITCHYARD_CUDA=OFF \
                  -DSWITCHYARD_PYTHON_PACKAGE=ON
# The tests TSan runs: everything below the multi-process tests.
TSAN_TESTS ?= common_test transport_test data_plane_test \
              checkpoint_store_test expert_worker_test coordinator_test \
              trainer_test
SUPPRESSIONS = $(CURDIR)/tests/sanitizers
# Left out of the TSan run: a timing test whose 4096-token forward of a
# 1024 x 4096 expert takes minutes under TSan's instrumentation on one
# OpenMP thread (it runs in `make test` and `make asan`).
TSAN_GTEST_FILTER ?= -WorkerServiceTest.HandleNeverWaitsForComputation

# Fuzzing: seconds per fuzzer, and which fuzzers (default: every one with
# a corpus in fuzz/corpus/).
FUZZ_SECONDS ?= 600
FUZZERS ?=
FUZZ_CMAKE = -DCMAKE_BUILD_TYPE=Release -DSWITCHYARD_CUDA=OFF \
             -DSWITCHYARD_FUZZ=ON -DCMAKE_C_COMPILER=clang \
             -DCMAKE_CXX_COMPILER=clang++

all: build

bootstrap:
	@bash scripts/bootstrap.sh

$(BUILD_DIR)/CMakeCache.txt:
	cmake -S . -B $(BUILD_DIR) -DCMAKE_BUILD_TYPE=$(BUILD_TYPE) \
	  -DSWITCHYARD_PYTHON_PACKAGE=ON

build: $(BUILD_DIR)/CMakeCache.txt
	cmake --build $(BUILD_DIR) -j $(JOBS)

test: bootstrap format-check build
	cd $(BUILD_DIR) && ctest --output-on-failure --timeout 300 -j $(JOBS) $(CTEST_ARGS)

demo: bootstrap build
	bash scripts/demo.sh $(BUILD_DIR)

bench: bootstrap build
	$(BUILD_DIR)/bench/placement_bench
	$(BUILD_DIR)/bench/expert_ffn_bench
	$(BUILD_DIR)/bench/transport_bench
	$(BUILD_DIR)/bench/moe_layer_bench
	$(BUILD_DIR)/bench/moe_layer_bench --dtype bf16 --skew 0.5
	bash bench/train_step_bench.sh $(BUILD_DIR)
	bash bench/recovery_overhead_bench.sh $(BUILD_DIR)
	bash bench/elastic_bench.sh $(BUILD_DIR)
	$(BUILD_DIR)/bench/control_plane_bench --members 2048
	bash bench/torch_moe_bench.sh $(BUILD_DIR)
	bash bench/demo_vs_torch.sh $(BUILD_DIR)
	$(BUILD_DIR)/bench/checkpoint_bench --gib 2

chaos: bootstrap build
	SWITCHYARD_CHAOS_ITERATIONS=$(CHAOS_ITERATIONS) \
	  $(BUILD_DIR)/tests/checkpoint_store_test --gtest_filter='*KillNine*'
	SWITCHYARD_CHAOS_FAULTS=$(CHAOS_FAULTS) SWITCHYARD_CHAOS_SEED=$(CHAOS_SEED) \
	  SWITCHYARD_CHAOS_CONFIG=$(CURDIR)/$(CHAOS_CONFIG) \
	  SWITCHYARD_CHAOS_STEPS=$(CHAOS_STEPS) SWITCHYARD_CHAOS_EVERY=$(CHAOS_EVERY) \
	  $(BUILD_DIR)/tests/chaos_test

thread-safety: bootstrap build
	bash scripts/thread_safety.sh $(BUILD_DIR)

asan: bootstrap
	cmake -S . -B build-asan $(SANITIZER_CMAKE) -DSWITCHYARD_SANITIZE=address
	cmake --build build-asan -j $(JOBS)
	cd build-asan && \
	  ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 \
	  LSAN_OPTIONS=suppressions=$(SUPPRESSIONS)/lsan.supp:print_suppressions=0 \
	  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	  ctest --output-on-failure --timeout 900 -j $(JOBS) $(CTEST_ARGS)

tsan: bootstrap
	cmake -S . -B build-tsan $(SANITIZER_CMAKE) -DSWITCHYARD_SANITIZE=thread
	cmake --build build-tsan -j $(JOBS) --target $(TSAN_TESTS)
	@# UCX's memory hooks (libucm's madvise) run in a dying thread's stack
	@# release, where TSan's runtime crashes on them: off under TSan. One
	@# OpenMP thread: TSan cannot see the uninstrumented libgomp's barriers
	@# (the elementwise kernels' thread counts are tested in `make test`).
	@# TZ: see tests/testing/process_setup.cc.
	@export TSAN_OPTIONS=halt_on_error=1:second_deadlock_stack=1:suppressions=$(SUPPRESSIONS)/tsan.supp \
	  UCX_MEM_MMAP_HOOK_MODE=none UCX_MEM_MALLOC_HOOKS=no OMP_THREAD_LIMIT=1 TZ=UTC; \
	  for t in $(TSAN_TESTS); do echo "tsan: $$t"; \
	    (cd build-tsan/tests && ./$$t --gtest_filter='$(TSAN_GTEST_FILTER)') \
	      > build-tsan/$$t.log 2>&1 \
	      || { tail -80 build-tsan/$$t.log; echo "tsan: $$t failed (build-tsan/$$t.log)"; exit 1; }; \
	    grep -E '^\[  PASSED  \]' build-tsan/$$t.log; done

fuzz: bootstrap
	cmake -S . -B build-fuzz $(FUZZ_CMAKE)
	cmake --build build-fuzz -j $(JOBS) --target fuzzers
	bash scripts/fuzz.sh build-fuzz $(FUZZ_SECONDS) $(FUZZERS)

soak-tests: bootstrap build
	bash scripts/soak_tests.sh $(BUILD_DIR) $(SOAK_PASSES)

format:
	clang-format -i $(filter-out %.proto,$(SOURCES))

format-check:
	@out=$$(clang-format --dry-run --Werror $(filter-out %.proto,$(SOURCES)) 2>&1); \
	  if [ -n "$$out" ]; then echo "$$out" | head -40; \
	  echo "format-check: run 'make format'"; exit 1; fi; echo "format-check: ok"

clean:
	rm -rf $(BUILD_DIR)
