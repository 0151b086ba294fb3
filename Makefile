# One entry point for local work and CI. Every install step lives here: CI runs on a clean clone.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv test lint demo bench clean promtool kubectl revision lock lockcheck image image-tools image-test chart-readme

venv: $(STAMP)

# Exactly the hash-locked versions (requirements-dev.lock, which pins requirements.lock's runtime
# versions too: tests run what the image ships), then the project itself without dependencies.
# tools/lockcheck.py stops here with one line per dependency pyproject.toml asks for and the lock
# lacks: run `make lock` after adding one.
$(STAMP): pyproject.toml requirements.lock requirements-dev.lock
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --require-hashes -r requirements-dev.lock
	$(BIN)/python tools/lockcheck.py
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(STAMP)

# ---------------------------------------------------------------------------------------------
# Dependency lock: hashes for every file of every pinned release (all platforms and
# architectures: the same lock builds amd64 and arm64 images). Re-run after changing
# dependencies in pyproject.toml: existing pins are kept (uv reads them back from the output
# files), new dependencies are added. `make lock LOCK_FLAGS=--upgrade` takes every upgrade,
# `LOCK_FLAGS='--upgrade-package boto3'` one. `make venv` then reinstalls.
UV_VERSION := 0.13.8
LOCK_FLAGS ?=
UV_COMPILE = $(VENV)/bin/uv pip compile --quiet --generate-hashes --universal \
	--python-version 3.11 --custom-compile-command 'make lock' $(LOCK_FLAGS)

lock:
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	test -x $(BIN)/uv || $(BIN)/pip install --quiet uv==$(UV_VERSION)
	$(UV_COMPILE) pyproject.toml -o requirements.lock
	$(UV_COMPILE) pyproject.toml --extra dev -c requirements.lock -o requirements-dev.lock
	$(UV_COMPILE) image/build-requirements.in -o image/build-requirements.lock
	$(BIN)/python tools/lockcheck.py

lockcheck: venv
	$(BIN)/python tools/lockcheck.py

# Generated files: the chart README's values table (from values.yaml's `# --` comments), the
# alert manifests (alerts/build.py) and the Grafana dashboard (dashboards/build.py). Tests fail
# when one of them is stale.
chart-readme: venv
	$(BIN)/python helm/readme.py
	$(BIN)/python alerts/build.py
	$(BIN)/python dashboards/build.py

# promtool (Debian's prometheus package) checks and unit-tests the alert rules in `make test`.
promtool:
	(command -v promtool && command -v prometheus) >/dev/null || (apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus)

# kubectl runs the kubectl-evidence plugin in tests/cluster/test_kubectl_plugin.py (Debian's package
# when none is installed).
kubectl:
	command -v kubectl >/dev/null || (apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends kubernetes-client)

# The source revision for --version and evidence_keeper_build_info in a wheel or an image built
# from this checkout (an installed package has no .git to ask).
revision:
	git rev-parse --short=12 HEAD > evidence_keeper/REVISION

# One worker per core (pytest-xdist): most tests wait on real agents, servers and clocks, not
# on the CPU. Each worker runs whole tests with its own fixtures (loopback ports from the OS,
# temporary directories), so nothing is shared between them. `pytest tests/x.py` runs serially.
test: venv promtool kubectl
	$(BIN)/python -m pytest -q -n auto --dist worksteal

lint: venv
	$(BIN)/ruff check evidence_keeper tests bench alerts dashboards tools helm/readme.py image/slim.py
	$(BIN)/mypy
	$(BIN)/lint-imports

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
	$(BIN)/python -m bench.ledger_bench
	$(BIN)/python -m bench.replay_bench

# ---------------------------------------------------------------------------------------------
# The OCI image, built and tested without a Docker engine (image/build.sh: mmdebstrap + buildah,
# vfs storage, chroot isolation). ARCH=arm64 builds the other architecture with the same recipe
# (on an arm64 machine, or here with qemu-user-static: docs/operations.md#the-image).
ARCH ?= $(shell dpkg --print-architecture 2>/dev/null || echo amd64)
IMAGE := build/image/evidence-keeper-$(ARCH).oci.tar

image-tools:
	(command -v buildah && command -v mmdebstrap && command -v unshare) >/dev/null || (apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends buildah mmdebstrap util-linux)

image: venv image-tools
	ARCH=$(ARCH) image/build.sh $(IMAGE)

image-test: venv image-tools
	test -f $(IMAGE) || $(MAKE) image
	EK_IMAGE=$(IMAGE) $(BIN)/python -m pytest tests/operate/test_image.py -v -p no:cacheprovider

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info
