# One entry point for people and CI. `make test` is what .ci/run calls.
PY ?= python3

.PHONY: install system-deps test lint demo bench proto docs docs-gen

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

# Reference pages generated from the code (settings, metrics, CLI, policy config): rerun after
# changing any of them; tests/docs/test_reference_pages.py fails when a committed page is stale.
docs-gen:
	$(PY) -m nexus_sidecar.docs_gen

# The documentation site, offline, into site/ (open site/index.html). Installs first if the docs
# tools are missing (a fresh clone).
docs:
	@$(PY) -c "import mkdocs, material, mkdocstrings_handlers.python" 2>/dev/null || PY=$(PY) ./scripts/install.sh --quiet
	$(PY) -m nexus_sidecar.docs_gen
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict
