#!/usr/bin/env bash
# Make the base image of the redi containers from Debian's packages, for machines that reach Debian's
# mirror but no container registry (so `FROM python:3.11-slim` cannot be pulled).
#
#   containers/make_base_image.sh [IMAGE]      (default localhost/redi-base:bookworm; skipped when it exists)
#   REDI_BASE_REBUILD=1 containers/make_base_image.sh    to make it again
#
# The image is Debian 12 minbase + python3 (3.11.2), venv, pip, ca-certificates, git (`dvc get` of a git
# URL) and libgomp1 (torch's CPU kernels). Debian marks its python as externally managed (PEP 668); a
# container is its own environment, so the marker is removed and `pip install` works as in the official
# python images (`python` and `pip` are on PATH, too). Needs root (debootstrap) and podman
# (containers/setup_podman.sh).
set -euo pipefail

IMAGE=${1:-${REDI_BASE_IMAGE:-localhost/redi-base:bookworm}}
SUITE=bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
WORK=${REDI_CONTAINERS_DIR:-/var/tmp/redi-containers}
PACKAGES=python3,python3-venv,python3-pip,ca-certificates,git,libgomp1

if [ "${REDI_BASE_REBUILD:-0}" != 1 ] && podman image exists "$IMAGE"; then
  echo "make_base_image: $IMAGE exists ($(podman image inspect --format '{{.Size}}' "$IMAGE") bytes); REDI_BASE_REBUILD=1 makes it again"
  exit 0
fi
[ "$(id -u)" = 0 ] || { echo "make_base_image: debootstrap needs root" >&2; exit 1; }
command -v debootstrap >/dev/null || { echo "make_base_image: debootstrap is missing; run containers/setup_podman.sh" >&2; exit 1; }

start=$(date +%s)
rootfs="$WORK/rootfs-$SUITE"
rm -rf "$rootfs"
mkdir -p "$WORK"
echo "make_base_image: debootstrap --variant=minbase $SUITE from $MIRROR"
debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$rootfs" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
  || { tail -20 "$WORK/debootstrap.log" >&2; echo "make_base_image: debootstrap failed (log: $WORK/debootstrap.log)" >&2; exit 1; }

# what a container does not need: package lists and caches, docs, man pages, locales other than C
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb \
       "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* \
       "$rootfs"/var/log/*.log "$rootfs"/var/cache/debconf/*-old
find "$rootfs"/usr/share/locale -mindepth 1 -maxdepth 1 ! -name 'locale.alias' -exec rm -rf {} +
rm -f "$rootfs"/usr/lib/python3*/EXTERNALLY-MANAGED
ln -sf /usr/bin/python3 "$rootfs"/usr/local/bin/python
ln -sf /usr/bin/pip3 "$rootfs"/usr/local/bin/pip
: >"$rootfs"/etc/resolv.conf   # the runtime provides it
# the host's deb822 sources (with bookworm-updates and the security suite) replace debootstrap's one line
if cp /etc/apt/sources.list.d/debian.sources "$rootfs"/etc/apt/sources.list.d/ 2>/dev/null; then
  rm -f "$rootfs"/etc/apt/sources.list
fi

tar -C "$rootfs" -c . | podman import --quiet \
  --change 'ENV LANG=C.UTF-8' \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'CMD ["python3"]' \
  --message "redi base: Debian $SUITE minbase + $PACKAGES" - "$IMAGE" >/dev/null
rm -rf "$rootfs"
podman run --rm "$IMAGE" python -c 'import sys, ssl, venv; print("python", sys.version.split()[0])'
echo "make_base_image: $IMAGE made in $(( $(date +%s) - start )) s, $(podman image inspect --format '{{.Size}}' "$IMAGE") bytes"
