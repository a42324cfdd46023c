"""The committed lock (requirements.lock) and the venv that must equal it; standard library only.

    python3 tools/lock.py stamp LOCK TORCH_VERSION      write the freshness line into a new lock
    python3 tools/lock.py check-fresh LOCK TORCH_VERSION fail when pyproject changed since the lock
    PYTHON tools/lock.py check-venv LOCK [--fix]        the running venv holds exactly the lock

The lock pins every package of `.venv` with its hashes except torch itself, which is installed first
(the CPU build on our machines, PyPI's CUDA build on a GPU machine) at `TORCH_VERSION`; the packages
torch alone requires (a CUDA build's nvidia-* and triton) are allowed beside the lock.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FRESH_PREFIX = "# inputs-sha256: "
# Installed by the Makefile around the lock, not by it.
TOOLING = {"pip", "uv", "tokcomp"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def inputs_digest(torch_version: str) -> str:
    """A hash of what the lock was resolved from: pyproject's requirements and the torch pin."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    inputs = {
        "requires-python": project.get("requires-python"),
        "dependencies": project.get("dependencies", []),
        "optional-dependencies": project.get("optional-dependencies", {}),
        "torch": torch_version,
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def locked_versions(lock: Path) -> dict[str, str]:
    pins = {}
    for line in lock.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s\\;]+)", line)
        if match:
            pins[canonical(match.group(1))] = match.group(2)
    return pins


def stamp(lock: Path, torch_version: str) -> None:
    text = lock.read_text()
    lock.write_text(f"{FRESH_PREFIX}{inputs_digest(torch_version)}\n{text}")


def check_fresh(lock: Path, torch_version: str) -> int:
    if not lock.is_file():
        print(f"error: {lock.name} is missing: run `make lock`", file=sys.stderr)
        return 2
    first = lock.read_text().splitlines()[:1]
    recorded = first[0][len(FRESH_PREFIX):] if first and first[0].startswith(FRESH_PREFIX) else ""
    if recorded != inputs_digest(torch_version):
        print(
            f"error: {lock.name} is out of date against pyproject.toml (or TORCH_VERSION): run `make lock`, "
            "review the diff and commit it",
            file=sys.stderr,
        )
        return 2
    return 0


def torch_requirements() -> set[str]:
    try:
        requires = metadata.requires("torch") or []
    except metadata.PackageNotFoundError:
        return set()
    return {canonical(re.split(r"[\s<>=!~;\[(]", req, maxsplit=1)[0]) for req in requires if "extra ==" not in req}


def check_venv(lock: Path, fix: bool) -> int:
    pins = locked_versions(lock)
    installed = {canonical(dist.metadata["Name"]): dist.version for dist in metadata.distributions()}
    allowed_extra = TOOLING | {"torch"} | torch_requirements()
    missing = sorted(name for name in pins if name not in installed)
    wrong = sorted(f"{name} {installed[name]} (lock: {pins[name]})" for name in pins
                   if name in installed and installed[name] != pins[name])
    extra = sorted(name for name in installed if name not in pins and name not in allowed_extra)
    if extra and fix:
        uv = str(Path(sys.executable).parent / "uv")
        subprocess.run([uv, "pip", "uninstall", "--python", sys.executable, *extra], check=True)
        extra = []
    problems = [f"missing {name}" for name in missing] + [f"differs: {w}" for w in wrong]
    problems += [f"not in the lock: {name}" for name in extra]
    if "torch" not in installed:
        problems.append("missing torch")
    if problems:
        print(f"error: the venv does not equal {lock.name}: " + "; ".join(problems), file=sys.stderr)
        return 2
    print(f"venv equals {lock.name}: {len(pins)} locked packages, torch {installed['torch']}")
    return 0


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] not in {"stamp", "check-fresh", "check-venv"}:
        print(__doc__, file=sys.stderr)
        return 2
    command, lock = argv[0], Path(argv[1])
    if command == "stamp":
        stamp(lock, argv[2])
        return 0
    if command == "check-fresh":
        return check_fresh(lock, argv[2])
    return check_venv(lock, fix="--fix" in argv[2:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
