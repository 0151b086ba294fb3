# syntax=docker/dockerfile:1
#
# evidence-keeper agent image.
#
#   docker build -t ghcr.io/evidence-keeper/evidence-keeper:0.1.0 \
#     --build-arg VERSION=0.1.0 --build-arg REVISION="$(git rev-parse HEAD)" \
#     --build-arg CREATED="$(date -u +%Y-%m-%dT%H:%M:%SZ)" .
#
# Stage 1 builds wheels of the agent and of every dependency and installs them into a virtual
# environment; the runtime stage copies only that environment onto the same pinned base, so the
# venv's interpreter path stays valid. The agent runs as uid 65532 with a read-only root file
# system (the DaemonSet adds a tmpfs /tmp): nothing is written into the image at run time and
# no shell is involved (exec-form ENTRYPOINT). Pin the base by digest as well in your registry
# mirror if your policy requires it: PYTHON_IMAGE=python:3.11.14-slim-bookworm@sha256:...

ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src
# Only what the wheel needs (.dockerignore keeps the rest of the tree out of the context).
COPY pyproject.toml README.md ./
COPY evidence_keeper ./evidence_keeper

# Wheels for the agent and all its dependencies, then an isolated environment from those wheels
# alone (--no-index: what was built is exactly what is installed). Byte-code is compiled here,
# because the root file system is read-only at run time.
RUN python -m pip wheel --wheel-dir /wheels . \
 && python -m venv --without-pip /opt/evidence-keeper \
 && python -m pip --python /opt/evidence-keeper/bin/python install \
        --no-index --find-links /wheels --compile evidence-keeper \
 && /opt/evidence-keeper/bin/evidence-keeper --help > /dev/null

# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
ARG SOURCE=https://github.com/evidence-keeper/evidence-keeper
ARG PYTHON_IMAGE

LABEL org.opencontainers.image.title="evidence-keeper" \
      org.opencontainers.image.description="Log-evidence preservation agent for Kubernetes: nothing the agent could see is lost silently." \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.url="${SOURCE}" \
      org.opencontainers.image.documentation="${SOURCE}/blob/main/docs/operations.md" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${PYTHON_IMAGE}"

# A named user for tools that look the uid up; the DaemonSet sets the same numeric ids.
RUN groupadd --system --gid 65532 evidence-keeper \
 && useradd --system --uid 65532 --gid 65532 --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin evidence-keeper

COPY --from=build /opt/evidence-keeper /opt/evidence-keeper

ENV PATH=/opt/evidence-keeper/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp

USER 65532:65532
EXPOSE 9095
STOPSIGNAL SIGTERM
ENTRYPOINT ["evidence-keeper"]
CMD ["run"]
