#!/usr/bin/env bash
# Install and configure podman (with buildah, runc and debootstrap) so containers run on this kind of
# build machine: Debian 12, root, no Docker engine (see ../shared/STACK.md, "Containers").
#
#   containers/setup_podman.sh          install when missing (root + apt-get only), then configure
#   containers/setup_podman.sh --check  exit 0 when podman runs a container, else print why and exit 1
#
# The two settings STACK.md found necessary go into /etc/containers/containers.conf:
#   default_ulimits  - podman's defaults exceed the machine's hard limits (setrlimit: Operation not permitted)
#   runc + cgroupfs  - crun refuses the machine's hybrid cgroup layout; there is no systemd to manage cgroups
set -euo pipefail

CONF=/etc/containers/containers.conf
PACKAGES="podman buildah runc debootstrap"

missing() {
  local tool
  for tool in podman buildah runc debootstrap; do
    command -v "$tool" >/dev/null 2>&1 || { echo "$tool"; return 0; }
  done
  return 1
}

install_packages() {
  if [ "$(id -u)" != 0 ]; then
    echo "setup_podman: $(missing) is not installed and installing needs root (apt-get); run this script as root" >&2
    return 1
  fi
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "setup_podman: $(missing) is not installed and there is no apt-get here; install $PACKAGES yourself" >&2
    return 1
  fi
  echo "setup_podman: installing $PACKAGES with apt-get"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $PACKAGES >/dev/null
}

configure() {
  [ "$(id -u)" = 0 ] || { echo "setup_podman: not root, leaving $CONF as it is"; return 0; }
  if grep -q '^# redi: container settings' "$CONF" 2>/dev/null; then
    return 0
  fi
  mkdir -p "$(dirname "$CONF")"
  if [ -s "$CONF" ] && grep -Eq '^\[(containers|engine)\]' "$CONF"; then
    echo "setup_podman: $CONF already has [containers]/[engine] sections; check it holds default_ulimits, runtime = \"runc\" and cgroup_manager = \"cgroupfs\"" >&2
    return 0
  fi
  cat >>"$CONF" <<'CONFEOF'
# redi: container settings (containers/setup_podman.sh; see STACK.md "Containers")
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
CONFEOF
  echo "setup_podman: wrote $CONF"
}

check() {
  local out
  if ! command -v podman >/dev/null 2>&1; then
    echo "podman is not installed (containers/setup_podman.sh installs it as root with apt-get)"
    return 1
  fi
  if ! out=$(podman info --format '{{.Host.OCIRuntime.Name}} {{.Host.CgroupManager}}' 2>&1); then
    echo "podman does not work here: ${out##*$'\n'}"
    return 1
  fi
  echo "podman $(podman --version | awk '{print $3}') ($out)"
}

if [ "${1:-}" = "--check" ]; then
  check
  exit $?
fi
if missing >/dev/null; then
  install_packages
fi
configure
check
