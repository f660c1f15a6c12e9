"""Write (or --check) docs/spec.md, the job-spec reference, from the shipped JSON Schema.

    python docs/gen_spec.py            # rewrite docs/spec.md from launcher/schema.json
    python docs/gen_spec.py --check    # exit 1 if docs/spec.md drifted from the schema

The schema is the one `fleet schema` prints and the package ships (launcher/schema.json, kept
equal to the pydantic models by tests/test_spec_validation.py), so the reference follows the
models through it. The renderer reads only JSON Schema keywords, never model code: a keyword
it has no wording for is still shown, as `keyword: value`, so a schema change can never drop
a constraint from the page silently.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = ROOT / "launcher" / "schema.json"
OUT = ROOT / "docs" / "spec.md"
COMMAND = "python docs/gen_spec.py"

# Keywords that carry no constraint of their own, or that the type/default columns show.
SHOWN_ELSEWHERE = {
    "$ref", "$defs", "$schema", "title", "description", "default", "type", "anyOf", "oneOf",
    "allOf", "enum", "const", "items", "properties", "required", "additionalProperties",
    "discriminator", "examples",
}
BOUNDS = {
    "minimum": "≥ {}", "exclusiveMinimum": "> {}", "maximum": "≤ {}", "exclusiveMaximum": "< {}",
    "minLength": "length ≥ {}", "maxLength": "length ≤ {}", "minItems": "at least {} item(s)",
    "maxItems": "at most {} item(s)", "multipleOf": "multiple of {}", "pattern": "matches `{}`",
    "format": "format `{}`", "uniqueItems": "unique items: {}",
}

Schema = dict[str, Any]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def literal(value: Any) -> str:
    return f"`{json.dumps(value, ensure_ascii=False)}`"


def ref_name(ref: str) -> str:
    return ref.rsplit("/", 1)[-1]


def branches(s: Schema) -> list[Schema]:
    return s.get("anyOf") or s.get("oneOf") or s.get("allOf") or []


def is_null(s: Schema) -> bool:
    return s.get("type") == "null"


def type_of(s: Schema) -> str:
    if "$ref" in s:
        name = ref_name(s["$ref"])
        return f"[{name}](#{slug(name)})"
    if "const" in s:
        return f"constant {literal(s['const'])}"
    if "enum" in s:
        return "one of " + ", ".join(literal(v) for v in s["enum"])
    if branches(s):
        kinds = [type_of(b) for b in branches(s) if not is_null(b)]
        text = " or ".join(kinds) if kinds else "null"
        if any(is_null(b) for b in branches(s)):
            text += " or null"
        if "discriminator" in s:
            text += f" (chosen by `{s['discriminator'].get('propertyName', '?')}`)"
        return text
    t = s.get("type")
    if isinstance(t, list):
        return " or ".join(t)
    if t == "array":
        return "list of " + type_of(s.get("items", {}))
    if t == "object" or "additionalProperties" in s:
        extra = s.get("additionalProperties")
        if "properties" in s:
            return "object"
        if isinstance(extra, dict):
            return "map of string to " + type_of(extra)
        return "map of string to any value"
    return t or "any value"


def bounds_of(s: Schema) -> list[str]:
    out = [BOUNDS[key].format(v if isinstance(v := s[key], str) else json.dumps(v))
           for key in BOUNDS if key in s]
    out += [f"`{key}: {json.dumps(value, ensure_ascii=False)}`" for key, value in s.items()
            if key not in BOUNDS and key not in SHOWN_ELSEWHERE]
    for b in branches(s):
        out += bounds_of(b)
    if s.get("type") == "array" and isinstance(s.get("items"), dict):
        out += [f"each: {b}" for b in bounds_of(s["items"])]
    return out


def refs_in(s: Any) -> Iterator[str]:
    if isinstance(s, dict):
        if "$ref" in s:
            yield ref_name(s["$ref"])
        for value in s.values():
            yield from refs_in(value)
    elif isinstance(s, list):
        for value in s:
            yield from refs_in(value)


def hoist_inline_objects(schema: Schema) -> Schema:
    """A copy of the schema in which every object given inline (with its own `properties`)
    becomes a definition of its own, named `Parent.field`, so its fields get a table too."""
    schema = json.loads(json.dumps(schema))
    defs: dict[str, Schema] = schema.setdefault("$defs", {})

    def visit(owner: str, sub: Any) -> Any:
        if not isinstance(sub, dict):
            return sub
        if "properties" in sub:
            name = owner
            while name in defs:
                name += "_"
            defs[name] = sub
            hoist_fields(name, sub)
            return {"$ref": f"#/$defs/{name}"}
        for key in ("anyOf", "oneOf", "allOf"):
            if key in sub:
                sub[key] = [visit(owner, b) for b in sub[key]]
        for key in ("items", "additionalProperties"):
            if isinstance(sub.get(key), dict):
                sub[key] = visit(owner, sub[key])
        return sub

    def hoist_fields(name: str, d: Schema) -> None:
        for field, sub in d.get("properties", {}).items():
            d["properties"][field] = visit(f"{name}.{field}", sub)

    for name in list(defs):
        hoist_fields(name, defs[name])
    return schema


def ordered_defs(schema: Schema) -> list[str]:
    """Definitions in reading order: breadth-first from the document kinds, then the rest."""
    defs = schema.get("$defs", {})
    order: list[str] = []
    queue = [n for n in refs_in(branches(schema)) if n in defs]
    while queue:
        name = queue.pop(0)
        if name in order:
            continue
        order.append(name)
        props = defs[name].get("properties", {})
        queue += [n for key in sorted(props) for n in refs_in(props[key]) if n in defs]
    return order + sorted(set(defs) - set(order))


def used_by(defs: dict[str, Schema]) -> dict[str, list[str]]:
    users: dict[str, list[str]] = {}
    for parent in sorted(defs):
        for field, sub in sorted(defs[parent].get("properties", {}).items()):
            for name in dict.fromkeys(refs_in(sub)):
                users.setdefault(name, []).append(f"[{parent}](#{slug(parent)}).`{field}`")
    return users


def field_rows(d: Schema) -> list[str]:
    rows = ["| field | type | default | bounds | description |", "|---|---|---|---|---|"]
    required = set(d.get("required", []))
    for field, sub in sorted(d.get("properties", {}).items()):
        if field in required:
            default = "**required**"
        elif "default" in sub:
            default = literal(sub["default"])
        else:
            default = "optional"
        rows.append("| " + " | ".join([
            f"`{field}`", cell(type_of(sub)), default, cell("; ".join(bounds_of(sub))),
            cell(sub.get("description", "")),
        ]) + " |")
    return rows


def render(schema: Schema) -> str:
    schema = hoist_inline_objects(schema)
    defs: dict[str, Schema] = schema["$defs"]
    lines = [
        f"<!-- Generated by `{COMMAND}` from launcher/schema.json: do not edit by hand. -->",
        "",
        f"# {schema.get('title', 'Job spec reference')}",
        "",
        "Every field of a job spec file, as the JSON Schema that ships with the package states it",
        "(`fleet schema` prints the same schema, for an editor's completion). A field that is",
        "not listed is refused.",
        f"Regenerate this page with `{COMMAND}` after changing the spec models and",
        "`fleet schema > launcher/schema.json`; a test fails while it is out of date.",
        "",
        "## Document kinds",
        "",
    ]
    disc = schema.get("discriminator", {})
    if disc:
        lines += [f"The `{disc.get('propertyName', 'kind')}` field selects the document type.",
                  ""]
    lines += ["| document | schema |", "|---|---|"]
    for b in branches(schema):
        name = ref_name(b.get("$ref", "")) or type_of(b)
        lines.append(f"| `{name}` | {type_of(b)} |")
    if extra := bounds_of({k: v for k, v in schema.items() if k not in ("discriminator",)}):
        lines += ["", "Constraints on the document: " + cell("; ".join(extra))]
    users = used_by(defs)
    for name in ordered_defs(schema):
        d = defs[name]
        lines += ["", f"## {name}", ""]
        if d.get("description"):
            lines += [cell(d["description"]), ""]
        if users.get(name):
            lines += ["Used in: " + ", ".join(users[name]) + ".", ""]
        if "properties" in d:
            lines += field_rows(d)
            extra = d.get("additionalProperties", True)
            if extra is False:
                lines += ["", "No other fields are allowed."]
            elif isinstance(extra, dict):
                lines += ["", f"Other fields: {cell(type_of(extra))}."]
        else:
            lines.append(f"Type: {cell(type_of(d))}.")
        rest = {k: v for k, v in d.items() if k not in ("properties", "additionalProperties")}
        if other := bounds_of(rest):
            lines += ["", "Constraints: " + cell("; ".join(other))]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schema", type=Path, default=SCHEMA, help="JSON Schema to document")
    parser.add_argument("--out", type=Path, default=OUT, help="markdown file to write")
    parser.add_argument("--check", action="store_true", help="fail if the file drifted")
    args = parser.parse_args(argv)
    try:
        schema = json.loads(args.schema.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        print(f"error: cannot read the schema {args.schema}: {e}", file=sys.stderr)
        return 2
    text = render(schema)
    if undescribed := [f"{name}.{field}" for name, d in sorted(schema.get("$defs", {}).items())
                       for field, sub in sorted(d.get("properties", {}).items())
                       if not sub.get("description") and "$ref" not in sub
                       and field not in ("apiVersion", "kind")]:
        print(f"note: {len(undescribed)} field(s) have no description in the schema (add one "
              f"in launcher/spec.py): {', '.join(undescribed)}", file=sys.stderr)
    if args.check:
        current = args.out.read_text(encoding="utf-8") if args.out.exists() else None
        if current != text:
            print(f"{args.out} drifted from {args.schema}: run `{COMMAND}` and commit the "
                  "result", file=sys.stderr)
            return 1
        return 0
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
