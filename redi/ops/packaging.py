"""BentoML packaging of the production detectors (see "Packaging and serving contract" in
docs/architecture.md).

- :func:`save_to_bentoml` puts a ``detector.pt`` into the BentoML model store as model
  ``redi-<line>:<model version>`` with labels ``{"redi": "detector", "line": <line>}`` and its
  sha256 in the metadata (the service checks it when it loads the model);
- :func:`build_production_bento` takes every line's PRODUCTION version from the object store (the
  production pointer: the one place that decides what a line serves), stores each in BentoML and
  runs ``bentoml build`` with those models pinned (the bentofile's ``models:``, BentoML's own model
  references), so the Bento is self-contained: ``bentoml containerize`` packs exactly those models.

BentoML reads ``BENTOML_HOME`` (the store's folder, default ``~/bentoml``) when it is first
imported, so callers that want another store set the variable before calling either function;
:func:`bentoml_env` gives the environment used for the ``bentoml build`` subprocess (it always sets
``BENTOML_DO_NOT_TRACK=true``: no usage reports leave the machine). ``bentoml build`` works offline
because the bentofile sets ``python.lock_packages: false`` (locking would query the package index
and pick a torch above the verified cap, see STACK.md).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Mapping

from redi.core.errors import RediError

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_BENTOFILE = PROJECT_ROOT / "serving" / "bentofile.yaml"
# BentoML's Dockerfile with a venv step that keeps a base image's /app/.venv (made by
# containers/make_bento_base_image.sh with the locked packages), relative to the build context
BENTO_DOCKERFILE_TEMPLATE = "serving/bento_dockerfile.j2"
MODEL_PREFIX = "redi-"
_NAME_OK = re.compile(r"^[a-z0-9]([a-z0-9._-]*[a-z0-9])?$")


class PackagingError(RediError):
    """The model cannot be stored in BentoML or the Bento cannot be built."""


def bentoml_env(bentoml_home: str | Path | None = None) -> dict[str, str]:
    """The environment for BentoML: no tracking, and ``BENTOML_HOME`` when one is given."""
    env = dict(os.environ)
    env["BENTOML_DO_NOT_TRACK"] = "true"
    if bentoml_home:
        env["BENTOML_HOME"] = str(Path(bentoml_home).resolve())
    return env


def model_name(line: str) -> str:
    """The BentoML model name of a line's detector: ``redi-<line>`` (lower case, '_' kept)."""
    name = f"{MODEL_PREFIX}{line}".lower()
    if not _NAME_OK.match(name):
        raise PackagingError(f"product line {line!r} gives the BentoML model name {name!r}, which BentoML refuses; "
                             f"use letters, digits, '_', '-' or '.' in line names")
    return name


def _plain(values: Mapping[str, Any] | None) -> dict[str, Any]:
    """Only the scalar entries (BentoML metadata must be simple JSON values)."""
    return {k: v for k, v in (values or {}).items() if isinstance(v, (str, int, float, bool))}


def save_to_bentoml(detector_path: str | Path, line: str, metrics: Mapping[str, Any] | None = None,
                    version: str | None = None, extra: Mapping[str, Any] | None = None) -> str:
    """Put a ``detector.pt`` into the BentoML model store as ``redi-<line>:<version>``; return the tag.

    Idempotent: when that tag is already stored with the same sha256, nothing is written again.

    Args:
        version: the tag's version (default: BentoML generates one); a production model uses its
            store version so the Bento names what the pointer named.
        extra: further scalar metadata (e.g. ``promoted``, ``promoted_by``).
    """
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
    import bentoml

    from redi.methods.base import read_artifact
    from redi.core.utils import sha256_file

    detector_path = Path(detector_path)
    digest = sha256_file(detector_path)
    name = model_name(line)
    tag = f"{name}:{version.lower()}" if version else None
    if tag:
        try:
            existing = bentoml.models.get(tag)
        except bentoml.exceptions.NotFound:
            existing = None
        if existing is not None:
            if (existing.info.metadata or {}).get("sha256") != digest:
                raise PackagingError(f"BentoML model {tag} exists with other content than {detector_path}; "
                                     f"delete it (`bentoml models delete {tag}`) or use another version")
            return str(existing.tag)
    payload = read_artifact(detector_path)
    meta = payload.get("metadata", {})
    config = payload.get("config", {})
    metadata = {"model_version": str(version or meta.get("version", "")), "profile": str(meta.get("profile", "")),
                "backbone": str(meta.get("backbone", "")), "line": line, "sha256": digest,
                "image_size": int(config.get("data", {}).get("image_size", 0)),
                "created": str(meta.get("created", "")), "metrics": _plain(metrics), **_plain(extra)}
    with bentoml.models.create(tag or name, labels={"redi": "detector", "line": line},
                               metadata=metadata) as model:
        shutil.copyfile(detector_path, model.path_of("detector.pt"))
    return str(model.tag)


def build_production_bento(store: Any, lines: list[str] | None = None, bentoml_home: str | Path | None = None,
                           version: str | None = None, timeout_s: float = 900.0,
                           base_image: str | None = None) -> dict[str, Any]:
    """Build a Bento that pins every line's production model (from the store's production pointers).

    Args:
        store: a ``redi.ops.object_store.ObjectStore``.
        lines: the lines to include (default: every line with a production pointer).
        base_image: the image ``bentoml containerize`` builds on (the bentofile's ``docker.base_image``;
            default BentoML's python:3.11-slim). Any Debian-like image with python3.11 and pip, e.g. the
            local base made by ``containers/make_bento_base_image.sh`` where no registry is reachable,
            whose venv ``/app/.venv`` already holds the locked packages: with a base image the Bento's
            Dockerfile keeps that venv (``BENTO_DOCKERFILE_TEMPLATE``) and installs only what is missing.

    Returns:
        ``{"bento_tag": ..., "models": {line: model tag}, "versions": {line: version}}``.

    Raises:
        PackagingError: no line has a production model, or ``bentoml build`` failed.
    """
    import yaml

    from redi.ops.model_registry import fetch_production_detector, production_lines

    lines = lines or production_lines(store)
    if not lines:
        raise PackagingError(f"{store!r} holds no production model; nothing to put into a Bento")
    models, versions = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for line in lines:
            fetched = fetch_production_detector(store, line, Path(tmp) / f"{line}.pt")  # hash checked
            if fetched is None:
                raise PackagingError(f"line {line!r} has no production model in {store!r}")
            path, pointer = fetched
            models[line] = save_to_bentoml(path, line, pointer.get("metrics"), version=str(pointer["version"]),
                                           extra={"promoted": pointer.get("promoted", ""),
                                                  "promoted_by": pointer.get("by", "")})
            versions[line] = str(pointer["version"])
        spec = yaml.safe_load(DEFAULT_BENTOFILE.read_text())
        spec["models"] = [models[line] for line in sorted(models)]
        spec.setdefault("labels", {}).update({f"line.{line}": versions[line][:63] for line in versions})
        if base_image:
            spec.setdefault("docker", {}).update(base_image=base_image,
                                                 dockerfile_template=BENTO_DOCKERFILE_TEMPLATE)
        bentofile = Path(tmp) / "bentofile.yaml"
        bentofile.write_text(yaml.safe_dump(spec, sort_keys=False))
        bento_tag = build_bento(bentofile, PROJECT_ROOT, version, bentoml_home, timeout_s)
    return {"bento_tag": bento_tag, "models": models, "versions": versions}


def _bentoml_command() -> list[str]:
    beside = Path(sys.executable).parent / "bentoml"
    return [str(beside)] if beside.is_file() else [sys.executable, "-m", "bentoml"]


def build_bento(bentofile: str | Path | None = None, build_ctx: str | Path | None = None,
                version: str | None = None, bentoml_home: str | Path | None = None,
                timeout_s: float = 900.0) -> str:
    """Run ``bentoml build`` on ``serving/bentofile.yaml`` and return the Bento's tag.

    Args:
        bentofile: default ``serving/bentofile.yaml`` of this project.
        build_ctx: the folder the bentofile's paths are relative to (default: the project root).
        version: the Bento's version (default: BentoML generates one).
        bentoml_home: BentoML's store (default: ``BENTOML_HOME`` or ``~/bentoml``).
    """
    bentofile = Path(bentofile or DEFAULT_BENTOFILE)
    if not bentofile.is_file():
        raise PackagingError(f"bentofile {bentofile} does not exist; the serving package (serving/) is missing "
                             f"from this install")
    build_ctx = Path(build_ctx or PROJECT_ROOT)
    command = [*_bentoml_command(), "build", str(build_ctx), "-f", str(bentofile), "-o", "tag"]
    if version:
        command += ["--version", version]
    try:
        done = subprocess.run(command, env=bentoml_env(bentoml_home), capture_output=True, text=True,
                              timeout=timeout_s, cwd=build_ctx)
    except subprocess.TimeoutExpired as exc:
        raise PackagingError(f"`bentoml build` took over {timeout_s:.0f} s and was stopped") from exc
    match = re.search(r"__tag__:(\S+)", done.stdout)
    if done.returncode != 0 or not match:
        tail = (done.stderr or done.stdout)[-2000:]
        raise PackagingError(f"`{' '.join(command)}` failed (exit {done.returncode}):\n{tail}")
    return match.group(1)


CONTAINER_BACKENDS = ("podman", "docker", "buildah")


def containerize_bento(bento_tag: str, image_tag: str | None = None, backend: str = "podman",
                       bentoml_home: str | Path | None = None, volumes: list[str] | None = None,
                       network: str | None = None, timeout_s: float = 3600.0) -> str:
    """``bentoml containerize`` a Bento into an image; return the image's tag.

    Runs BentoML's container build API in a subprocess (BentoML reads ``BENTOML_HOME`` at import) rather
    than the CLI, whose ``--opt volume=...`` joins repeated volumes into one argument.

    Args:
        image_tag: default the Bento's tag.
        backend: the builder BentoML drives (``podman``, ``docker`` or ``buildah``).
        volumes: ``HOST:CONTAINER[:ro]`` mounts for the build's RUN steps (e.g. a pip/uv configuration
            and the wheel folders it names: ``containers/pip_build_config.py``).
        network: the RUN steps' network (``host`` where the package registries are reached through the host).

    Raises:
        PackagingError: unknown backend, or the build failed (BentoML only logs a failed build: the image
            is looked up afterwards).
    """
    import json

    if backend not in CONTAINER_BACKENDS:
        raise PackagingError(f"container backend {backend!r} is not one of {CONTAINER_BACKENDS}")
    if shutil.which(backend) is None:
        raise PackagingError(f"`{backend}` is not installed; install it (here: containers/setup_podman.sh) or pick "
                             f"another backend")
    image_tag = image_tag or bento_tag
    options: dict[str, Any] = {"image_tag": [image_tag]}
    if volumes:
        options["volume"] = list(volumes)  # a list: one --volume each (a tuple would be joined with ':')
    if network:
        options["network"] = network
    script = ("import json, sys, bentoml; a = json.loads(sys.argv[1]); o = a['options']; "
              "o['image_tag'] = tuple(o['image_tag']); "  # BentoML asserts a tuple (JSON gives a list)
              "bentoml.container.build(a['tag'], backend=a['backend'], **o)")
    payload = json.dumps({"tag": bento_tag, "backend": backend, "options": options})
    try:
        # cwd: BentoML 1.4.40 re-reads a Bento's Dockerfile template from a temporary copy of the Bento and
        # refuses any file outside the working directory (BentoML issue #5566), so work from that copy's parent
        done = subprocess.run([sys.executable, "-c", script, payload], env=bentoml_env(bentoml_home),
                              capture_output=True, text=True, timeout=timeout_s, cwd=tempfile.gettempdir())
    except subprocess.TimeoutExpired as exc:
        raise PackagingError(f"`bentoml containerize {bento_tag}` took over {timeout_s:.0f} s and was stopped") from exc
    inspect = ["buildah", "inspect", "--type", "image"] if backend == "buildah" else [backend, "image", "inspect"]
    found = subprocess.run([*inspect, image_tag], capture_output=True, text=True)
    if done.returncode != 0 or found.returncode != 0:
        tail = (done.stderr + done.stdout)[-3000:]
        raise PackagingError(f"`bentoml containerize {bento_tag} --backend {backend}` built no image {image_tag} "
                             f"(exit {done.returncode}):\n{tail}")
    return image_tag
