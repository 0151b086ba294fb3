# One entry point for local work and CI. Every install step lives here: CI runs on a clean clone.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv test lint demo bench clean promtool kubectl revision

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# promtool (Debian's prometheus package) checks and unit-tests the alert rules in `make test`.
promtool:
	(command -v promtool && command -v prometheus) >/dev/null || (apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus)

# kubectl runs the kubectl-evidence plugin in tests/test_kubectl_plugin.py (Debian's package
# when none is installed).
kubectl:
	command -v kubectl >/dev/null || (apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends kubernetes-client)

# The source revision for --version and evidence_keeper_build_info in a wheel or an image built
# from this checkout (an installed package has no .git to ask).
revision:
	git rev-parse --short=12 HEAD > evidence_keeper/REVISION

test: venv promtool kubectl
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
	$(BIN)/python -m bench.s3_bench
	$(BIN)/python -m bench.kube_bench
	$(BIN)/python -m bench.search_bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info
