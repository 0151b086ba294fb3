#!/usr/bin/env bash
# Build the evidence-keeper OCI image without a Docker engine: `make image` runs this.
#
#   image/build.sh [OUT]          OUT defaults to build/image/evidence-keeper-<arch>.oci.tar
#
#   ARCH=arm64 image/build.sh     another architecture: same recipe (docs/operations.md#the-image)
#
# The recipe, and why:
#   1. wheels: every dependency of requirements.lock, downloaded for the target's CPython 3.11
#      and architecture with --require-hashes (a file whose hash is not in the lock is refused),
#      plus pip (image/build-requirements.lock) and a wheel of the project itself;
#   2. root file system: Debian bookworm by mmdebstrap (variant essential + python3 +
#      ca-certificates, so every maintainer script runs as Debian intends), then image/slim.py
#      deletes every package python3 does not need - shells, dpkg, perl, coreutils - keeps
#      /var/lib/dpkg/status true for scanners and adds uid/gid 65532;
#   3. buildah (vfs storage, chroot isolation: no daemon, no overlay, no user namespaces):
#      from scratch, add the root file system, create /opt/evidence-keeper as a venv of Debian's
#      python3, install the wheels into it with pip run from its own wheel (--no-index,
#      --require-hashes, byte-compiled), then remove pip and the wheels;
#   4. OCI config: entrypoint, user 65532:65532, env, port, OCI labels; commit as an
#      oci-archive (timestamps from SOURCE_DATE_EPOCH: the last commit's time by default).
#
# Needs (the Makefile installs them): buildah, mmdebstrap, python3 (with .venv's pip), root.
set -euo pipefail
cd "$(dirname "$0")/.."

ARCH="${ARCH:-$(dpkg --print-architecture)}"
SUITE=bookworm
MIRROR="${MIRROR:-http://deb.debian.org/debian}"
SECURITY_MIRROR="${SECURITY_MIRROR:-http://deb.debian.org/debian-security}"
VERSION="${VERSION:-$(.venv/bin/python -c 'import tomllib;print(tomllib.load(open("pyproject.toml","rb"))["project"]["version"])')}"
REVISION="${REVISION:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}"
export SOURCE_DATE_EPOCH
SOURCE_URL=https://github.com/evidence-keeper/evidence-keeper
WORK="build/image/$ARCH"
OUT="${1:-build/image/evidence-keeper-$ARCH.oci.tar}"
PREFIX=/opt/evidence-keeper

case "$ARCH" in
  amd64) PY_ARCH=x86_64 ;;
  arm64) PY_ARCH=aarch64 ;;
  *) echo "build.sh: unsupported ARCH=$ARCH (amd64 or arm64)" >&2; exit 2 ;;
esac

# A private container storage under build/: never touches the machine's own (or another build's).
BUILDAH=(buildah --root "$PWD/$WORK/storage" --runroot "$PWD/$WORK/run" --storage-driver vfs)
step() { printf '==> [%s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

rm -rf "$WORK/wheels" "$WORK/rootfs.tar"
mkdir -p "$WORK/wheels" "$(dirname "$OUT")"

step "wheels for cp311 $PY_ARCH (hash-checked against requirements.lock)"
platforms=()
for tag in manylinux_2_36 manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_27 \
           manylinux_2_24 manylinux_2_17 manylinux2014 manylinux_2_12 manylinux2010 \
           manylinux_2_5 manylinux1; do
  platforms+=(--platform "${tag}_${PY_ARCH}")
done
# PIP_CONFIG_FILE=/dev/null: the index only, never a machine's local wheel cache or constraints.
pipdl() {
  env -u PIP_FIND_LINKS -u PIP_CONSTRAINT PIP_CONFIG_FILE=/dev/null \
    .venv/bin/pip download --quiet --disable-pip-version-check --no-deps --require-hashes \
    --only-binary=:all: --implementation cp --python-version 3.11 --abi cp311 \
    "${platforms[@]}" --dest "$WORK/wheels" "$@"
}
pipdl -r requirements.lock
pipdl -r image/build-requirements.lock
env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null \
  .venv/bin/pip wheel --quiet --disable-pip-version-check --no-deps --wheel-dir "$WORK/wheels" .
cp requirements.lock "$WORK/wheels/requirements.lock"
PIP_WHEEL="$(cd "$WORK/wheels" && ls pip-*.whl)"

step "root file system: Debian $SUITE $ARCH by mmdebstrap, slimmed by image/slim.py"
mmdebstrap --quiet --variant=essential --arch="$ARCH" \
  --include=python3,ca-certificates,netbase,tzdata \
  --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
  --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/info/*' \
  --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/lintian/*' \
  --customize-hook="python3 '$PWD/image/slim.py' \"\$1\"" \
  "$SUITE" "$WORK/rootfs.tar" \
  "deb $MIRROR $SUITE main" "deb $MIRROR $SUITE-updates main" \
  "deb $SECURITY_MIRROR $SUITE-security main"

step "buildah: venv from the locked wheels"
"${BUILDAH[@]}" rm --all >/dev/null 2>&1 || true
ctr="$("${BUILDAH[@]}" from --arch "$ARCH" scratch)"
trap '"${BUILDAH[@]}" rm "$ctr" >/dev/null 2>&1 || true' EXIT
"${BUILDAH[@]}" add "$ctr" "$WORK/rootfs.tar" /
"${BUILDAH[@]}" copy "$ctr" "$WORK/wheels" /tmp/wheels
run() { "${BUILDAH[@]}" run --isolation chroot --network host "$ctr" -- "$@"; }
run /usr/bin/python3 -m venv --without-pip "$PREFIX"
pip_in_image=("$PREFIX/bin/python" "/tmp/wheels/$PIP_WHEEL/pip" --disable-pip-version-check
              --no-cache-dir --quiet install --no-index --find-links /tmp/wheels --no-deps --compile)
run "${pip_in_image[@]}" --require-hashes -r /tmp/wheels/requirements.lock
run "${pip_in_image[@]}" "/tmp/wheels/$(cd "$WORK/wheels" && ls evidence_keeper-*.whl)"
mnt="$("${BUILDAH[@]}" mount "$ctr")"
rm -rf "$mnt/tmp/wheels"
# Nothing may write into the image at run time (read-only root): compile what pip did not.
run "$PREFIX/bin/python" -m compileall -q -j 0 "$PREFIX/lib"
# The agent's own self-check, inside the image, before anything is labelled.
run "$PREFIX/bin/evidence-keeper" --help >/dev/null
"${BUILDAH[@]}" umount "$ctr" >/dev/null

step "OCI config and labels; commit $OUT"
created="$(date -u -d "@$SOURCE_DATE_EPOCH" +%Y-%m-%dT%H:%M:%SZ)"
"${BUILDAH[@]}" config \
  --entrypoint "[\"$PREFIX/bin/evidence-keeper\"]" --cmd run \
  --user 65532:65532 --workingdir / --port 9095/tcp --stop-signal SIGTERM \
  --env "PATH=$PREFIX/bin:/usr/bin:/bin" --env PYTHONDONTWRITEBYTECODE=1 \
  --env PYTHONUNBUFFERED=1 --env HOME=/tmp \
  --env SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
  --label org.opencontainers.image.title=evidence-keeper \
  --label "org.opencontainers.image.description=Log-evidence preservation agent for Kubernetes: nothing the agent could see is lost silently." \
  --label "org.opencontainers.image.version=$VERSION" \
  --label "org.opencontainers.image.revision=$REVISION" \
  --label "org.opencontainers.image.created=$created" \
  --label "org.opencontainers.image.source=$SOURCE_URL" \
  --label "org.opencontainers.image.url=$SOURCE_URL" \
  --label "org.opencontainers.image.documentation=$SOURCE_URL/blob/main/docs/operations.md" \
  --label org.opencontainers.image.licenses=Apache-2.0 \
  --label "org.opencontainers.image.base.name=debian:$SUITE (mmdebstrap, slimmed)" \
  --author evidence-keeper "$ctr"
rm -f "$OUT"
"${BUILDAH[@]}" commit --quiet --format oci --timestamp "$SOURCE_DATE_EPOCH" --rm "$ctr" \
  "oci-archive:$OUT:evidence-keeper:$VERSION" >/dev/null
trap - EXIT
step "done: $OUT ($(du -h "$OUT" | cut -f1))"
