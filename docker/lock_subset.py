"""Print the part of requirements.lock that an image needs, hashes kept (stdlib only).

requirements.lock is one hash-locked file for every extra of the project (dev, ml, data, triton,
agent). An image installs only its share: the base dependencies of pyproject.toml plus the extras
it names, and everything those pull in. "Pull in" is read from uv's `# via` annotations: a package
P listed with `# via Q` is needed by Q, so the closure over them from the direct requirements is
exactly what the resolver chose for them. At worst it keeps too much (a package that Q needs only
through one of Q's own extras), never too little.

The CUDA runtime wheels (nvidia-*, about 3.3 GB) stay in every torch image, CPU ones too: torch's
PyPI build links libcudart, cuBLAS, cuDNN, NCCL ... and does not import without them (measured in
the compose smoke run: "libcudart.so.13: cannot open shared object file"); its CPU-only build lives
on download.pytorch.org, which this project's builds cannot reach. On a machine without a GPU the
same image runs on the CPU.

    python docker/lock_subset.py --extras ml,data,triton requirements.lock > req.txt
    pip install --no-deps --require-hashes -r req.txt
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path

ROOT = "rise-serve (pyproject.toml)"
# Needed to install the project itself (`pip install --no-build-isolation -e .`).
ALWAYS = {"setuptools"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(spec: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", spec)
    if not match:
        raise ValueError(f"cannot read a package name in requirement {spec!r}")
    return canonical(match.group(1))


def parse_lock(text: str) -> dict[str, tuple[str, set[str]]]:
    """name -> (the package's whole block, names it is needed by)."""
    blocks: dict[str, tuple[list[str], set[str]]] = {}
    current = None
    for line in text.splitlines():
        head = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==", line)
        if head:
            current = canonical(head.group(1))
            blocks[current] = ([line], set())
            continue
        if current is None or not line.startswith(" "):  # a comment or blank line ends a block
            current = None
            continue
        lines, parents = blocks[current]
        lines.append(line)
        note = re.match(r"^\s+#\s+(?:via\s+)?(.+?)\s*$", line)
        if note and note.group(1) != "via":
            parent = note.group(1)
            parents.add(parent if parent.startswith(ROOT) else canonical(parent))
    return {name: ("\n".join(lines), parents) for name, (lines, parents) in blocks.items()}


def direct_requirements(pyproject: dict, extras: list[str]) -> set[str]:
    project = pyproject["project"]
    optional = project.get("optional-dependencies", {})
    unknown = [e for e in extras if e not in optional]
    if unknown:
        raise SystemExit(f"unknown extra(s) {unknown}; pyproject.toml has {sorted(optional)}")
    specs = list(project.get("dependencies", []))
    for extra in extras:
        specs += optional[extra]
    return {requirement_name(s) for s in specs}


def subset(lock: dict[str, tuple[str, set[str]]], roots: set[str]) -> list[str]:
    missing = sorted(roots - lock.keys())
    if missing:
        raise SystemExit(f"requirements.lock lacks {missing}: run `make lock`")
    keep = set(roots) | (ALWAYS & lock.keys())
    changed = True
    while changed:  # the lock has ~170 packages: a fixpoint loop is instant
        changed = False
        for name, (_, parents) in lock.items():
            if name not in keep and parents & keep:
                keep.add(name)
                changed = True
    return [block for name, (block, _) in lock.items() if name in keep]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("lock", type=Path, help="requirements.lock")
    parser.add_argument("--pyproject", type=Path, default=None, help="default: pyproject.toml beside the lock")
    parser.add_argument("--extras", default="", help="comma-separated extras, e.g. ml,data,triton")
    args = parser.parse_args(argv)
    pyproject = tomllib.loads((args.pyproject or args.lock.parent / "pyproject.toml").read_text())
    extras = [e.strip() for e in args.extras.split(",") if e.strip()]
    lock = parse_lock(args.lock.read_text())
    blocks = subset(lock, direct_requirements(pyproject, extras))
    sys.stdout.write(f"# {len(blocks)} of {len(lock)} packages of {args.lock.name}: extras {extras or 'none'}\n"
                     + "\n".join(blocks) + "\n")
    print(f"lock_subset: {len(blocks)} of {len(lock)} packages (extras: {','.join(extras) or 'none'})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
