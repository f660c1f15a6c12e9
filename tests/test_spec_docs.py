"""docs/spec.md is generated from launcher/schema.json and kept in step with it."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GEN = [sys.executable, str(ROOT / "docs" / "gen_spec.py")]
SCHEMA = json.loads((ROOT / "launcher" / "schema.json").read_text(encoding="utf-8"))


def gen(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*GEN, *args], cwd=ROOT, capture_output=True, text=True, timeout=60)


def sections(markdown: str) -> dict[str, dict[str, str]]:
    """{definition: {field: its table row}} from the generated page."""
    out: dict[str, dict[str, str]] = {}
    current = None
    for line in markdown.splitlines():
        if line.startswith("## "):
            current = out.setdefault(line[3:].strip(), {})
        elif current is not None and (m := re.match(r"\| `([^`]+)` \|", line)):
            current[m.group(1)] = line
    return out


def test_committed_reference_matches_the_schema():
    res = gen("--check")
    assert res.returncode == 0, res.stderr


def test_drift_check_fails_on_a_hand_edit(tmp_path):
    out = tmp_path / "spec.md"
    assert gen("--out", str(out)).returncode == 0
    out.write_text(out.read_text().replace("`maxRestarts`", "`maxRetries`"))
    res = gen("--out", str(out), "--check")
    assert res.returncode == 1
    assert str(out) in res.stderr and "gen_spec.py" in res.stderr


def test_drift_check_fails_when_the_schema_changes(tmp_path):
    schema = json.loads(json.dumps(SCHEMA))
    schema["$defs"]["Batch"]["properties"]["global"]["minimum"] = 2
    changed = tmp_path / "schema.json"
    changed.write_text(json.dumps(schema))
    res = gen("--schema", str(changed), "--check")
    assert res.returncode == 1, "the committed page must not match a changed schema"


def test_every_field_is_documented_with_type_default_bounds_and_description():
    page = sections((ROOT / "docs" / "spec.md").read_text(encoding="utf-8"))
    for name, d in SCHEMA["$defs"].items():
        assert name in page, f"definition {name} has no section"
        props = d.get("properties", {})
        assert set(page[name]) == set(props), name
        for field, sub in props.items():
            row = page[name][field]
            if field in d.get("required", []):
                assert "**required**" in row, (name, field)
            elif "default" in sub:
                assert f"`{json.dumps(sub['default'])}`" in row, (name, field)
            for key, sign in (("minimum", "≥"), ("maximum", "≤"), ("exclusiveMinimum", ">")):
                for part in [sub, *sub.get("anyOf", [])]:
                    if key in part:
                        assert f"{sign} {json.dumps(part[key])}" in row, (name, field, key)
            if sub.get("description"):
                assert " ".join(sub["description"].split()).replace("|", "\\|") in row
            for value in sub.get("enum", []):
                assert json.dumps(value) in row, (name, field, value)


def test_unknown_keywords_and_shapes_are_rendered_not_dropped(tmp_path):
    schema = {
        "title": "probe",
        "oneOf": [{"$ref": "#/$defs/Doc"}],
        "$defs": {
            "Doc": {
                "type": "object",
                "required": ["name"],
                "additionalProperties": False,
                "properties": {
                    "name": {"type": "string", "pattern": "^[a-z]+$", "maxLength": 63,
                             "description": "a | piped\ndescription"},
                    "ratio": {"anyOf": [{"type": "number", "exclusiveMaximum": 1}, {"type": "null"}],
                              "default": None},
                    "tags": {"type": "array", "items": {"type": "string", "minLength": 1},
                             "maxItems": 4},
                    "extra": {"type": "object", "additionalProperties": {"$ref": "#/$defs/Doc"}},
                    "future": {"type": "integer", "x-brand-new": {"a": 1}},
                    "loose": {},
                    "inline": {"type": "object", "properties": {"depth": {"type": "integer",
                                                                           "minimum": 0}}},
                },
            },
            "Orphan": {"type": "string", "enum": ["a"]},
        },
    }
    src, out = tmp_path / "schema.json", tmp_path / "spec.md"
    src.write_text(json.dumps(schema))
    res = gen("--schema", str(src), "--out", str(out))
    assert res.returncode == 0, res.stderr
    rows = sections(out.read_text())
    assert "matches `^[a-z]+$`" in rows["Doc"]["name"] and "length ≤ 63" in rows["Doc"]["name"]
    assert "a \\| piped description" in rows["Doc"]["name"]
    assert "number or null" in rows["Doc"]["ratio"] and "< 1" in rows["Doc"]["ratio"]
    assert "list of string" in rows["Doc"]["tags"] and "at most 4" in rows["Doc"]["tags"]
    assert "each: length ≥ 1" in rows["Doc"]["tags"]
    assert "map of string to [Doc](#doc)" in rows["Doc"]["extra"]
    assert '`x-brand-new: {"a": 1}`' in rows["Doc"]["future"]
    assert "any value" in rows["Doc"]["loose"]
    assert "Orphan" in rows, "a definition no document reaches still gets a section"
    assert "[Doc.inline](#docinline)" in rows["Doc"]["inline"]
    assert "≥ 0" in rows["Doc.inline"]["depth"], "an inline object's fields get their own table"


def test_unreadable_schema_is_a_clear_error(tmp_path):
    bad = tmp_path / "schema.json"
    bad.write_text("{not json")
    res = gen("--schema", str(bad), "--out", str(tmp_path / "spec.md"))
    assert res.returncode == 2
    assert str(bad) in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "spec.md").exists()
