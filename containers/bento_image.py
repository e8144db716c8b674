"""Build the production Bento on the local base image and containerize it with podman.

    .venv/bin/python containers/bento_image.py --store-dir DIR [--image TAG] [--bentoml-home DIR]
    .venv/bin/python containers/bento_image.py --bento redi:VERSION [--image TAG]     (a Bento built before)

1. ``redi.ops.packaging.build_production_bento``: every line's production model (``REDI_S3_*`` or
   ``--store-dir``) pinned in a Bento whose ``docker.base_image`` is ``--base-image`` (default the local
   Debian base with BentoML's build packages, made by containers/make_bento_base_image.sh when missing;
   give ``python:3.11-slim`` where a registry is reachable);
2. ``bentoml containerize`` with the podman backend (``redi.ops.packaging.containerize_bento``), the
   build's RUN steps on the host network with this machine's pip/uv settings mounted
   (containers/pip_build_config.py), so the locked packages (serving/requirements.lock.txt) install
   from the same wheels and indexes as the venv.

Prints ``{"bento_tag", "image", "seconds", "size_bytes"}`` as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCAL_BASE = "localhost/redi-bento-base:bookworm"
WORK = Path(os.environ.get("REDI_CONTAINERS_DIR", "/var/tmp/redi-containers"))


def build_mounts() -> list[str]:
    """``HOST:CONTAINER:ro`` mounts that give the build this machine's pip and uv settings."""
    done = subprocess.run([sys.executable, str(ROOT / "containers" / "pip_build_config.py"), str(WORK / "pip")],
                          capture_output=True, text=True, check=True, env={**os.environ, "REDI_PIP_PYTHON": sys.executable})
    return [line.removeprefix("-v=") for line in done.stdout.splitlines() if line.startswith("-v=")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--store-dir", default=os.environ.get("REDI_STORE_DIR"),
                        help="local store folder (default REDI_STORE_DIR; REDI_S3_* when neither is given)")
    source.add_argument("--bento", help="containerize this Bento instead of building one")
    parser.add_argument("--bentoml-home", default=os.environ.get("BENTOML_HOME"), help="BentoML's store")
    parser.add_argument("--base-image", default=os.environ.get("REDI_BENTO_BASE_IMAGE", LOCAL_BASE))
    parser.add_argument("--image", help="the image's tag (default the Bento's tag)")
    parser.add_argument("--backend", default="podman", choices=["podman", "docker", "buildah"])
    args = parser.parse_args()
    if args.bentoml_home:  # BentoML reads it once, when first imported
        os.environ["BENTOML_HOME"] = str(Path(args.bentoml_home).resolve())
    sys.path.insert(0, str(ROOT))
    from redi.ops.packaging import build_production_bento, containerize_bento

    if args.base_image == LOCAL_BASE:
        subprocess.run([str(ROOT / "containers" / "setup_podman.sh")], check=True, stdout=subprocess.DEVNULL)
        subprocess.run([str(ROOT / "containers" / "make_bento_base_image.sh"), LOCAL_BASE], check=True)
    started = time.perf_counter()
    tag = args.bento
    if not tag:
        from redi.ops.object_store import store_from_env

        built = build_production_bento(store_from_env(local_root=args.store_dir), bentoml_home=args.bentoml_home,
                                       base_image=args.base_image)
        tag = built["bento_tag"]
    image = containerize_bento(tag, args.image, args.backend, args.bentoml_home, volumes=build_mounts(),
                               network="host")
    size = subprocess.run([args.backend if args.backend != "buildah" else "podman", "image", "inspect", "--format",
                           "{{.Size}}", image], capture_output=True, text=True).stdout.strip()
    print(json.dumps({"bento_tag": tag, "image": image, "seconds": round(time.perf_counter() - started, 1),
                      "size_bytes": int(size) if size.isdigit() else None}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
