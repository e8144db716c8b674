"""Installing a Debian package a test's real server needs (root + apt-get only), as `make test` does for
Chromium: a machine whose package lists are empty gets them first, so a missing list never turns into
a silently skipped test."""

from __future__ import annotations

import os
import shutil
import subprocess


def apt_install(package: str, timeout_s: int = 900) -> str:
    """Install ``package`` with apt-get; "" when it worked, else why not (for the skip reason)."""
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return f"{package} is not installed and cannot be (needs root and apt-get): apt-get install {package}"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-qq", package]
    done = subprocess.run(install, env=env, capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0:  # e.g. no package lists yet on a fresh machine
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=timeout_s)
        done = subprocess.run(install, env=env, capture_output=True, text=True, timeout=timeout_s)
    return "" if done.returncode == 0 else f"apt-get install {package} failed: {done.stderr.strip()[-300:]}"
