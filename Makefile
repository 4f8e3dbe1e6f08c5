# Cairn: `make demo` shows a crash and a resume; `make test` runs every test.
CARGO ?= cargo
WASM_TARGET := wasm32-wasip1
GUESTS := ecommerce onboarding crashtest divergent misbehave timers signals branches benchflow effects

.PHONY: all build host guests setup test test-with-pg demo demo-ecommerce bench torture clean

all: build

# Install what the build needs (the wasm target) when it is missing.
setup:
	@command -v $(CARGO) >/dev/null || { echo "cargo is required: install Rust from https://rustup.rs"; exit 1; }
	@rustup target list --installed 2>/dev/null | grep -qx $(WASM_TARGET) || rustup target add $(WASM_TARGET)

# The workspace's default members (host, the tests' helpers, the bench) in
# one build: one feature set, so `make test` and `make bench` reuse it.
TARGET_DIR := $(or $(CARGO_TARGET_DIR),target)
host: setup
	$(CARGO) build --release --locked

guests: setup
	$(CARGO) build --release --locked --target $(WASM_TARGET) $(addprefix -p ,$(GUESTS))

# target/release/cairn and target/wasm32-wasip1/release/<guest>.wasm
build: host guests

# Unit tests of the shared ABI crate and the host, then end-to-end tests
# that drive the built binary on the built guests.
# The browser test needs Chromium and chromedriver: installed when missing.
# The PostgreSQL tests need a server: CAIRN_TEST_PG, or a throwaway cluster
# (Debian's postgresql, installed when missing) for the length of the tests.
test: build
	./scripts/ensure-chromium.sh
	./scripts/with-pg.sh $(MAKE) --no-print-directory test-with-pg

# The end-to-end suites that are not about SQLite itself (its file, its
# locks, its disk), run a second time on PostgreSQL: the test matrix.
PG_MATRIX := branches cli crash_replay effects limits nondeterminism serve signals_cancel timers_retries tokens worker

# Inside scripts/with-pg.sh (CAIRN_TEST_PG is set).
test-with-pg:
	$(CARGO) test --release --locked
	# (No -p: the same packages as above, so the same features and no rebuild.)
	CAIRN_E2E_BACKEND=postgres $(CARGO) test --release --locked $(addprefix --test ,$(PG_MATRIX))
	# The benchmarks once at tiny sizes, so they cannot rot (figures meaningless).
	$(TARGET_DIR)/release/cairn-bench --quick

# Every workload of BENCHMARKS.md; writes target/bench/results.json.
bench: build
	$(TARGET_DIR)/release/cairn-bench

# The kill -9 campaign, long form (make test runs 50 kills of it).
KILLS ?= 1000
torture: build
	$(TARGET_DIR)/release/torture --kills $(KILLS)

demo: build
	./scripts/demo.sh

# Real effects: inventory in the key-value store, a charge over HTTP to the
# fake payment service killed mid-step and taken once, compensations.
demo-ecommerce: build
	./scripts/demo-ecommerce.sh

clean:
	$(CARGO) clean
