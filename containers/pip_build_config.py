"""Give a container build the pip configuration of this machine, so pip in the build resolves what the
venv resolved (here: torch <= 2.14.1 from local wheel folders and file:// indexes, the registry through
the host's CA bundle).

    python3 containers/pip_build_config.py OUT_DIR

writes ``OUT_DIR/pip.conf`` (pip's effective settings: its config files and PIP_* variables, as
``pip config list`` shows them) and ``OUT_DIR/uv.toml`` (the same for uv, which BentoML's generated
Dockerfile installs with: the wheel folders as find-links, pip's index choice, the system CA bundle),
and prints one ``-v=HOST:CONTAINER:ro`` option per line: the two files at /etc/pip.conf and
/etc/uv/uv.toml, and every local file or folder the settings name (CA bundle, constraints file,
find-links folders, file:// indexes). Only the standard library is used.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

_LINE = re.compile(r"^(?P<scope>[^.]*)\.(?P<key>[^=]+)=(?P<value>.*)$")
_PATH_KEYS = {"cert", "client-cert", "constraint", "requirement", "find-links", "extra-index-url", "index-url"}


def effective_settings(python: str) -> dict[str, str]:
    """pip's settings as ``{key: value}``; environment variables win over files, as in pip."""
    done = subprocess.run([python, "-m", "pip", "config", "list"], capture_output=True, text=True, check=True)
    files: dict[str, str] = {}
    env: dict[str, str] = {}
    for line in done.stdout.splitlines():
        match = _LINE.match(line.strip())
        if not match:
            continue
        value = match["value"].strip().strip("'\"")
        (env if match["scope"] == ":env:" else files)[match["key"]] = value
    return {**files, **env}


def local_paths(settings: dict[str, str]) -> list[Path]:
    """The existing local files and folders the settings name (``file://`` URLs included)."""
    found: list[Path] = []
    for key, value in settings.items():
        if key not in _PATH_KEYS:
            continue
        for token in value.split():
            path = Path(urlparse(token).path) if token.startswith("file://") else Path(token)
            if not path.is_absolute() or not path.exists():
                continue
            # a file:// simple index links its wheels by relative paths (../../files/...): mount its parent
            if token.startswith("file://") and path.name == "simple":
                path = path.parent
            if path not in found:
                found.append(path)
    return found


def uv_settings(settings: dict[str, str]) -> str:
    """uv's configuration equivalent to pip's settings (uv reads no pip.conf).

    A file:// simple index is given to uv as its flat ``files`` folder (a find-links folder), which uv
    reads for certain; ``unsafe-best-match`` takes the best version over all indexes, as pip does (uv's
    default takes a package from the first index that has it at all).
    """
    links: list[str] = []
    for key in ("find-links", "extra-index-url"):
        for token in settings.get(key, "").split():
            path = Path(urlparse(token).path) if token.startswith("file://") else Path(token)
            if token.startswith("file://") and (path.parent / "files").is_dir():
                links.append(str(path.parent / "files"))
            elif token.startswith(("http://", "https://")) and key == "extra-index-url":
                continue  # a remote extra index: below
            elif path.is_absolute() and path.exists():
                links.append(str(path))
    remote = [t for t in settings.get("extra-index-url", "").split() if t.startswith(("http://", "https://"))]
    lines = ["native-tls = true", 'index-strategy = "unsafe-best-match"']
    if links:
        lines.append("find-links = [" + ", ".join(f'"{link}"' for link in links) + "]")
    if remote:
        lines.append("extra-index-url = [" + ", ".join(f'"{url}"' for url in remote) + "]")
    if settings.get("index-url"):
        lines.append(f'index-url = "{settings["index-url"]}"')
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    out = Path(argv[1])
    out.mkdir(parents=True, exist_ok=True)
    settings = effective_settings(os.environ.get("REDI_PIP_PYTHON", sys.executable))
    lines = ["[global]"] + [f"{key} = {value}" for key, value in sorted(settings.items()) if key != "python"]
    (out / "pip.conf").write_text("\n".join(lines) + "\n")
    (out / "uv.toml").write_text(uv_settings(settings))
    print(f"-v={out / 'pip.conf'}:/etc/pip.conf:ro")
    print(f"-v={out / 'uv.toml'}:/etc/uv/uv.toml:ro")
    for path in local_paths(settings):
        print(f"-v={path}:{path}:ro")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
