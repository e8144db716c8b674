#!/usr/bin/env bash
# The local base of both redi images here (the Bento's and the component image): the Debian base
# (containers/make_base_image.sh) with
#   1. the packages BentoML's generated Dockerfile installs on every Debian base (ca-certificates gnupg2
#      bash build-essential git), and
#   2. the venv /app/.venv holding serving/requirements.lock.txt: torch 2.14.1 with its CUDA libraries and
#      everything else the service needs, owned by the Bento's user (uid 1034, BentoML's default).
#
#   containers/make_bento_base_image.sh [IMAGE]   (default localhost/redi-bento-base:bookworm; IMAGE-tools
#                                                  is the first half: the base + the build packages)
#   REDI_BASE_REBUILD=1 ...                        rebuild without podman's layer cache
#
# Why 1: the Bento's build gets this machine's CA bundle mounted read-only over
# /etc/ssl/certs/ca-certificates.crt (pip and uv reach the registries only through it); installing
# ca-certificates in that build would rewrite the bundle and fail on the read-only mount. Installed
# here, BentoML's apt-get step finds nothing to do.
# Why 2: the packages are about 6.9 GB. Installed once here, the Bento's `uv pip install` finds them
# all (serving/bento_dockerfile.j2 keeps this venv) and the component image installs only what the
# pipeline adds (components/Dockerfile uses the same venv), so the two images share one copy of the
# big layer instead of each writing its own (a build also writes the new layer once more to /var/tmp
# while committing it: two separate copies ran a CI machine out of disk).
# Podman's layer cache keeps this quick once made; a changed lock file rebuilds the package layer.
# Where a registry is reachable, a Bento built on python:3.11-slim needs none of this.
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${1:-localhost/redi-bento-base:bookworm}
BASE=${REDI_BASE_IMAGE:-localhost/redi-base:bookworm}
WORK=${REDI_CONTAINERS_DIR:-/var/tmp/redi-containers}
PY=${REDI_PIP_PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
BENTO_UID=1034   # BentoML's default bento user and group id (the Bento's Dockerfile creates that user)
# the same list as BentoML 1.4's CONTAINER_METADATA["debian"]["default_install_command"]
PACKAGES="ca-certificates gnupg2 bash build-essential git"
CACHE=()
[ "${REDI_BASE_REBUILD:-0}" = 1 ] && CACHE=(--no-cache)

# The locked packages go in as several layers, the largest packages in layers of their own: committing
# a layer costs about 3.8 times its size in free disk while it is written (measured: 27 GB for the
# 7 GB venv in one layer), so smaller layers lower the peak. Each group is installed without its
# dependencies; the last step installs the whole lock, which resolves and adds whatever the groups
# did not name (a package missing from every group only makes that last layer larger).
PACKAGE_GROUPS=(
  '^nvidia-(cublas|cufft|cusparse|cusolver|curand|nvjitlink|cuda-)'   # CUDA's maths libraries, ~1.8 GB
  '^nvidia-'                                                          # cuDNN, NCCL and the rest, ~1.5 GB
  '^torch=='                                                          # ~1.2 GB
  '^triton=='                                                         # ~0.9 GB
)
package_layers() {
  local group
  for group in "${PACKAGE_GROUPS[@]}"; do
    echo "RUN grep -E '$group' /tmp/requirements.lock.txt > /tmp/group.txt;" \
      "if [ -s /tmp/group.txt ]; then $(pip_step "--no-deps -r /tmp/group.txt"); fi"
  done
  echo "RUN $(pip_step "-r /tmp/requirements.lock.txt")"
}
# pip into the venv, then the Bento user owns the new files (only those: a chown of a lower layer's
# file would copy it into this layer)
pip_step() {
  echo "PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 /app/.venv/bin/pip install -q $1" \
    "&& find /app/.venv \\! -user $BENTO_UID -exec chown -h $BENTO_UID:$BENTO_UID {} +"
}

containers/make_base_image.sh "$BASE"
mkdir -p "$WORK"
mapfile -t PIP_MOUNTS < <(REDI_PIP_PYTHON="$PY" python3 containers/pip_build_config.py "$WORK/pip")
echo "make_bento_base_image: building $IMAGE (the package layer takes minutes when not cached;" \
  "$(df -h --output=avail /var/lib/containers 2>/dev/null | tail -1 | tr -d ' ') free for images)"
start=$(date +%s)
# two builds: apt-get must run without the pip mounts (installing ca-certificates rewrites the bundle
# that the mounts put read-only in place), the packages with them
build() {  # build TAG [podman build options...] < Containerfile
  local tag=$1; shift
  podman build --network host --layers "${CACHE[@]}" "$@" -t "$tag" -f - . >"$WORK/bento-base-build.log" 2>&1 \
    || { tail -30 "$WORK/bento-base-build.log" >&2; echo "make_bento_base_image: building $tag failed (log: $WORK/bento-base-build.log)" >&2; exit 1; }
}
build "$IMAGE-tools" <<CONTAINERFILE
FROM $BASE
RUN apt-get update -qq \\
    && DEBIAN_FRONTEND=noninteractive apt-get install -q -y --no-install-recommends $PACKAGES >/dev/null \\
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin
CONTAINERFILE
build "$IMAGE" "${PIP_MOUNTS[@]}" <<CONTAINERFILE
FROM $IMAGE-tools
COPY serving/requirements.lock.txt /tmp/requirements.lock.txt
RUN python3 -m venv /app/.venv && chown -R $BENTO_UID:$BENTO_UID /app/.venv
$(package_layers)
RUN rm -f /tmp/requirements.lock.txt /tmp/group.txt
CONTAINERFILE
echo "make_bento_base_image: $IMAGE ready in $(( $(date +%s) - start )) s, $(podman image inspect --format '{{.Size}}' "$IMAGE") bytes"
