#!/usr/bin/env bash
# Build the component image (components/Dockerfile) with podman on this machine, from the repository root.
#
#   containers/build_image.sh [TAG]       (default $REDI_IMAGE or localhost/redi:0.1.0)
#
# - installs/configures podman when missing and allowed (containers/setup_podman.sh);
# - builds on the local base made from Debian's packages with the Bento's locked packages in /app/.venv
#   (containers/make_bento_base_image.sh), because no container registry is reachable here, and so the
#   component image and the Bento's share the multi-GB package layer; set
#   REDI_BASE_IMAGE=python:3.11-slim where a registry is reachable;
# - gives the build this machine's pip settings (containers/pip_build_config.py): the RUN steps see the
#   same indexes, wheel folders, constraints and CA bundle as the venv, so pip resolves the same torch;
# - uses the host's network for the RUN steps (the package registries).
# Prints the image's size and the build time at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

TAG=${1:-${REDI_IMAGE:-localhost/redi:0.1.0}}
BASE=${REDI_BASE_IMAGE:-localhost/redi-bento-base:bookworm}
WORK=${REDI_CONTAINERS_DIR:-/var/tmp/redi-containers}
PY=${REDI_PIP_PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3

containers/setup_podman.sh >/dev/null
if [ "$BASE" = localhost/redi-bento-base:bookworm ]; then
  containers/make_bento_base_image.sh "$BASE"
fi

mkdir -p "$WORK"
mapfile -t PIP_MOUNTS < <(REDI_PIP_PYTHON="$PY" python3 containers/pip_build_config.py "$WORK/pip")
start=$(date +%s)
podman build --network host --layers "${PIP_MOUNTS[@]}" \
  --build-arg BASE_IMAGE="$BASE" -f components/Dockerfile -t "$TAG" .
took=$(( $(date +%s) - start ))
size=$(podman image inspect --format '{{.Size}}' "$TAG")
echo "build_image: $TAG built in $took s; $(( size / 1000000 )) MB ($size bytes, uncompressed)"
