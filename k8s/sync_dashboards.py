"""Copy the generated Grafana dashboards into the kustomize base.

kustomize refuses to read files outside a kustomization's directory (its
default load restrictor), so the dashboards ConfigMap is generated from copies
in k8s/base/dashboards/. Run this after regenerating dashboards/*.json;
`--check` exits 1 when a copy differs from its source (tests run it).

    python k8s/sync_dashboards.py [--check]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE_DIR = ROOT / "dashboards"
COPY_DIR = ROOT / "k8s" / "base" / "dashboards"
# The names the configMapGenerator in k8s/base/kustomization.yaml lists.
DASHBOARDS = ("training.json", "fleet.json")


def stale_copies() -> list[str]:
    """Names whose copy is missing or differs from dashboards/<name>; sources must exist."""
    missing = [n for n in DASHBOARDS if not (SOURCE_DIR / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{', '.join(str(SOURCE_DIR / n) for n in missing)} not found: "
            "generate the dashboards first (see dashboards/)"
        )
    stale = []
    for name in DASHBOARDS:
        copy = COPY_DIR / name
        if not copy.is_file() or copy.read_bytes() != (SOURCE_DIR / name).read_bytes():
            stale.append(name)
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report stale copies")
    args = parser.parse_args(argv)
    try:
        stale = stale_copies()
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.check:
        for name in stale:
            print(f"stale: k8s/base/dashboards/{name} differs from dashboards/{name}; "
                  "run python k8s/sync_dashboards.py", file=sys.stderr)
        return 1 if stale else 0
    COPY_DIR.mkdir(parents=True, exist_ok=True)
    for name in stale:
        (COPY_DIR / name).write_bytes((SOURCE_DIR / name).read_bytes())
        print(f"copied dashboards/{name} -> k8s/base/dashboards/{name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
