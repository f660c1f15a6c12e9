"""Lines of the largest class and the largest function in a package's modules.

    .venv/bin/python bench/code_size.py [launcher]
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path


def sizes(root: Path) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    classes, functions = [], []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            n = node.end_lineno - node.lineno + 1 if hasattr(node, "end_lineno") else 0
            if isinstance(node, ast.ClassDef):
                classes.append((n, f"{path}:{node.name}"))
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                functions.append((n, f"{path}:{node.name}"))
    return sorted(classes, reverse=True), sorted(functions, reverse=True)


def main() -> int:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "launcher")
    classes, functions = sizes(root)
    for title, rows in (("classes", classes), ("functions", functions)):
        print(title)
        for n, name in rows[:3]:
            print(f"  {n:5d}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
