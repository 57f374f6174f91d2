# One entry point for people and CI. `make test` is what .ci/run calls.
PY ?= python3

.PHONY: install system-deps test lint demo bench proto

system-deps:
	./scripts/install_system_deps.sh

install:
	PY=$(PY) ./scripts/install.sh

lint:
	$(PY) -m ruff check service client tests benchmarks scripts

test: install lint
	$(PY) -m pytest -q

# The install's output goes to .cache/install.log (one progress line per step), so what the
# terminal ends with is the demo's own explained table.
demo:
	PY=$(PY) ./scripts/install.sh --quiet
	$(PY) -m nexus_sidecar.cli demo

proto:
	./scripts/gen_proto.sh
