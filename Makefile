# Switchyard top-level Makefile: a thin wrapper over CMake.
#   make              release build into build/
#   make test         bootstrap, build, format check, every test through ctest
#   make demo         bootstrap, build, run the main job on a local cluster
#   make bench        bootstrap, build, run the benchmarks (bench/)
#   make chaos        bootstrap, build, the crash tests at full size
#                     (CHAOS_ITERATIONS kill -9s of a checkpoint writer and
#                     of a training worker, default 200 each; `make test`
#                     runs 20 of each)
#   make format       rewrite sources with clang-format
#   make format-check fail if any source differs from clang-format's output
BUILD_DIR ?= build
BUILD_TYPE ?= Release
JOBS ?= $(shell nproc)
CTEST_ARGS ?=

# Tracked and new (untracked, not ignored) files alike.
SOURCES = $(shell git ls-files --cached --others --exclude-standard '*.cc' '*.h' '*.cu' '*.proto' 2>/dev/null)

CHAOS_ITERATIONS ?= 200

.PHONY: all build bootstrap test demo bench chaos format format-check clean

all: build

bootstrap:
	@bash scripts/bootstrap.sh

$(BUILD_DIR)/CMakeCache.txt:
	cmake -S . -B $(BUILD_DIR) -DCMAKE_BUILD_TYPE=$(BUILD_TYPE)

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
	bash bench/train_step_bench.sh $(BUILD_DIR)
	$(BUILD_DIR)/bench/checkpoint_bench --gib 2

chaos: bootstrap build
	SWITCHYARD_CHAOS_ITERATIONS=$(CHAOS_ITERATIONS) \
	  $(BUILD_DIR)/tests/checkpoint_store_test --gtest_filter='*KillNine*'
	SWITCHYARD_CHAOS_ITERATIONS=$(CHAOS_ITERATIONS) \
	  $(BUILD_DIR)/tests/e2e_test --gtest_filter='ChaosTest.*'

format:
	clang-format -i $(filter-out %.proto,$(SOURCES))

format-check:
	@out=$$(clang-format --dry-run --Werror $(filter-out %.proto,$(SOURCES)) 2>&1); \
	  if [ -n "$$out" ]; then echo "$$out" | head -40; \
	  echo "format-check: run 'make format'"; exit 1; fi; echo "format-check: ok"

clean:
	rm -rf $(BUILD_DIR)
