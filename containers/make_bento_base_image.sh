#!/usr/bin/env bash
# The base of the Bento's container image here: the local Debian base (containers/make_base_image.sh) with
# the packages BentoML's generated Dockerfile installs on every Debian base (ca-certificates gnupg2 bash
# build-essential git) already in it.
#
#   containers/make_bento_base_image.sh [IMAGE]   (default localhost/redi-bento-base:bookworm; kept once made)
#
# Why: the Bento's build gets this machine's CA bundle mounted read-only over
# /etc/ssl/certs/ca-certificates.crt (pip and uv reach the registries only through it); installing
# ca-certificates in that build would rewrite the bundle and fail on the read-only mount. Installed
# here, BentoML's apt-get step finds nothing to do. Where a registry is reachable, a Bento built on
# python:3.11-slim needs none of this.
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${1:-localhost/redi-bento-base:bookworm}
BASE=${REDI_BASE_IMAGE:-localhost/redi-base:bookworm}
# the same list as BentoML 1.4's CONTAINER_METADATA["debian"]["default_install_command"]
PACKAGES="ca-certificates gnupg2 bash build-essential git"

if [ "${REDI_BASE_REBUILD:-0}" != 1 ] && podman image exists "$IMAGE"; then
  echo "make_bento_base_image: $IMAGE exists; REDI_BASE_REBUILD=1 makes it again"
  exit 0
fi
containers/make_base_image.sh "$BASE"
start=$(date +%s)
podman build --network host --layers -t "$IMAGE" -f - . >/dev/null <<CONTAINERFILE
FROM $BASE
RUN apt-get update -qq \\
    && DEBIAN_FRONTEND=noninteractive apt-get install -q -y --no-install-recommends $PACKAGES >/dev/null \\
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin
CONTAINERFILE
echo "make_bento_base_image: $IMAGE made in $(( $(date +%s) - start )) s, $(podman image inspect --format '{{.Size}}' "$IMAGE") bytes"
