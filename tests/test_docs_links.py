"""Every link in README.md and docs/*.md resolves to a file in the repository, anchors included.

A reader of a clone (or of the repository on a forge) has only what is committed: a link to a
sibling checkout, an absolute path on some machine or an ignored build output is a dead link
for them. Paths quoted in code spans that name a repository file are held to the same rule.
"""

from __future__ import annotations

import re
import subprocess
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
WEB = ("http://", "https://", "mailto:")

FENCE = re.compile(r"^ {0,3}(```|~~~).*?^ {0,3}\1", re.S | re.M)
INLINE = re.compile(r"!?\[(?:[^\]\\]|\\.)*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
REFDEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s.*)?$", re.M)
HTML = re.compile(r"""\b(?:href|src)\s*=\s*["']([^"']+)["']""")
CODE = re.compile(r"(`+)(.+?)\1")
HEADING = re.compile(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$", re.M)


def prose(text: str) -> str:
    return FENCE.sub("", text)


@cache
def tracked() -> frozenset[str] | None:
    """Files a clone would have: committed, staged, or new and not ignored."""
    try:
        res = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             cwd=ROOT, capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return None  # not a git checkout (an sdist): existence is all that can be checked
    return frozenset(res.stdout.split("\0")) - {""}


def in_repo(path: Path) -> bool:
    """A repository file, or a directory holding one (so not an ignored build output)."""
    files = tracked()
    if files is None:
        return path.exists()
    rel = path.resolve().relative_to(ROOT).as_posix()
    return rel in files or any(f.startswith(f"{rel}/") for f in files)


def slug(heading: str) -> str:
    text = re.sub(r"`|\*\*|__|!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


@cache
def anchors(path: Path) -> frozenset[str]:
    seen: dict[str, int] = {}
    out = set()
    for heading in HEADING.findall(prose(path.read_text(encoding="utf-8"))):
        base = slug(heading)
        n = seen.get(base, 0)
        out.add(base if n == 0 else f"{base}-{n}")
        seen[base] = n + 1
    return frozenset(out)


def links(text: str) -> list[str]:
    body = prose(text)
    spans = CODE.sub("", body)  # a `[x](y)` inside a code span is not a link
    return INLINE.findall(spans) + REFDEF.findall(spans) + HTML.findall(spans)


def problem(doc: Path, target: str) -> str | None:
    if not target or target.startswith(WEB):
        return None
    if re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*:", target):
        return f"{target!r}: only http(s) and mailto links may leave the repository"
    path_part, _, anchor = target.partition("#")
    if path_part.startswith("/"):
        return f"{target!r}: an absolute path exists on one machine only"
    dest = (doc.parent / path_part).resolve() if path_part else doc
    if not dest.is_relative_to(ROOT):
        return f"{target!r} points outside the repository"
    if dest.relative_to(ROOT).parts[:1] == ("shared",):
        return f"{target!r} points into shared/, which is not part of the repository"
    if not in_repo(dest):
        return f"{target!r}: no such file in the repository"
    if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
        return f"{target!r}: {dest.name} has no heading with anchor #{anchor}"
    return None


def quoted_paths(text: str) -> list[str]:
    """Code spans that name a repository path: `launcher/spec.py`, `../x`, `docs/`. Only the
    repository's own top-level entries count, not outputs a run left beside them (`out/`)."""
    files = tracked()
    top = ({f.split("/", 1)[0] for f in files} if files is not None else
           {p.name for p in ROOT.iterdir()} - {".git"})
    out = []
    for _, span in CODE.findall(prose(text)):
        span = re.sub(r":\d+$", "", span.strip())
        if re.search(r"[\s<>*$~{}()\[\]|,=]", span) or "/" not in span:
            continue
        if span.startswith("../") or span.split("/", 1)[0] in top:
            out.append(span)
    return out


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve_inside_the_repository(doc):
    text = doc.read_text(encoding="utf-8")
    problems = [p for t in links(text) if (p := problem(doc, t))]
    assert not problems, f"{doc.relative_to(ROOT)}:\n  " + "\n  ".join(problems)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_quoted_repository_paths_exist(doc):
    text = doc.read_text(encoding="utf-8")
    # Quoted paths are from the repository root, the way a reader types them in a shell.
    problems = [p for span in quoted_paths(text)
                if (p := problem(ROOT / "README.md", span.rstrip("/")))]
    assert not problems, f"{doc.relative_to(ROOT)}:\n  " + "\n  ".join(problems)


def test_the_checks_catch_what_they_are_for():
    doc = ROOT / "docs" / "probe.md"  # never written: problem() only reads the target
    assert problem(doc, "../../shared/DESIGN.md") == \
        "'../../shared/DESIGN.md' points outside the repository"
    assert "no such file" in problem(doc, "missing.md")
    assert "absolute path" in problem(doc, "/etc/passwd")
    assert "only http(s)" in problem(doc, "file:///etc/passwd")
    assert "no heading with anchor" in problem(doc, "../README.md#no-such-heading")
    assert problem(doc, "../README.md") is None and problem(doc, "https://example.org") is None
    assert links("see [a](x.md#y), ![i](img.png) and `[not](a-link)`\n\n"
                 "```\n[in](fence)\n```\n[r]: ref.md\n") == ["x.md#y", "img.png", "ref.md"]
    assert quoted_paths("`../shared/DESIGN.md`, `launcher/spec.py:12`, `fleet up`, `a/b`") == \
        ["../shared/DESIGN.md", "launcher/spec.py"]
    assert slug("The `fleet` CLI, at a glance") == "the-fleet-cli-at-a-glance"
