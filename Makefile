# One entry point for local work and CI. Every install step lives here: CI runs on a clean clone.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv test lint demo bench clean promtool

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# promtool (Debian's prometheus package) checks and unit-tests the alert rules in `make test`.
promtool:
	(command -v promtool && command -v prometheus) >/dev/null || (apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus)

test: venv promtool
	$(BIN)/python -m pytest -q

lint: venv
	$(BIN)/ruff check evidence_keeper tests bench alerts
	$(BIN)/mypy

demo: venv
	$(BIN)/evidence-keeper demo

# The core run rewrites its block of docs/benchmarks.md; the S3, Kubernetes and search runs
# print their figures (copied into the same document with the date and machine).
bench: venv
	$(BIN)/python -m bench.run
	$(BIN)/python -m bench.footprint
	$(BIN)/python -m bench.s3_bench
	$(BIN)/python -m bench.kube_bench
	$(BIN)/python -m bench.search_bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info
