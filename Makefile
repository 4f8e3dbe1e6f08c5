# Cairn: `make demo` shows a crash and a resume; `make test` runs every test.
CARGO ?= cargo
WASM_TARGET := wasm32-wasip1
GUESTS := ecommerce onboarding crashtest divergent misbehave timers signals branches benchflow

.PHONY: all build host guests setup test demo bench torture clean

all: build

# Install what the build needs (the wasm target) when it is missing.
setup:
	@command -v $(CARGO) >/dev/null || { echo "cargo is required: install Rust from https://rustup.rs"; exit 1; }
	@rustup target list --installed 2>/dev/null | grep -qx $(WASM_TARGET) || rustup target add $(WASM_TARGET)

host: setup
	$(CARGO) build --release --locked -p cairn

guests: setup
	$(CARGO) build --release --locked --target $(WASM_TARGET) $(addprefix -p ,$(GUESTS))

# target/release/cairn and target/wasm32-wasip1/release/<guest>.wasm
build: host guests

# Unit tests of the shared ABI crate and the host, then end-to-end tests
# that drive the built binary on the built guests.
# The browser test needs Chromium and chromedriver: installed when missing.
test: build
	./scripts/ensure-chromium.sh
	$(CARGO) test --release --locked -p cairn-abi -p cairn -p cairn-e2e
	# The benchmarks once at tiny sizes, so they cannot rot (figures meaningless).
	$(CARGO) run --release --locked -p cairn-bench -- --quick

# Every workload of BENCHMARKS.md; writes target/bench/results.json.
bench: build
	$(CARGO) run --release --locked -p cairn-bench

# The kill -9 campaign, long form (make test runs 50 kills of it).
KILLS ?= 1000
torture: build
	$(CARGO) run --release --locked -p cairn-e2e --bin torture -- --kills $(KILLS)

demo: build
	./scripts/demo.sh

clean:
	$(CARGO) clean
