"""Validate dashboard JSON against Grafana's dashboard schema, as typed by grafana-foundation-sdk.

No Grafana server can be installed here, so the check is done with the SDK's
generated models (built from Grafana's own CUE schema for the release the SDK
targets). Two passes:

1. decode the JSON into the SDK models and encode it again: a key the schema
   does not know is dropped by the decoder, so any difference means the JSON
   holds something Grafana's schema has no field for;
2. walk the decoded models and check every value against the field's type
   annotation (str / int / float / bool, enums, literals, lists, nested models).

    python -m dashboards.validate dashboards/training.json dashboards/fleet.json
"""

from __future__ import annotations

import enum
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.cog import plugins, runtime
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import Dashboard

plugins.register_default_plugins()

_PRIMITIVES = {str: (str,), int: (int,), float: (int, float), bool: (bool,)}


def _diff(want: Any, got: Any, path: str, errors: list[str]) -> None:
    if isinstance(want, dict) and isinstance(got, dict):
        for key in want:
            if key not in got:
                errors.append(f"{path}/{key}: not a field of the Grafana schema")
            else:
                _diff(want[key], got[key], f"{path}/{key}", errors)
        for key in got:
            if key not in want:
                errors.append(f"{path}/{key}: schema requires it (default {got[key]!r})")
    elif isinstance(want, list) and isinstance(got, list):
        if len(want) != len(got):
            errors.append(f"{path}: {len(want)} items decode to {len(got)}")
        for i, (a, b) in enumerate(zip(want, got, strict=False)):
            _diff(a, b, f"{path}[{i}]", errors)
    elif want != got or type(want) is not type(got):
        errors.append(f"{path}: {want!r} decodes as {got!r}")


def _shallow_fits(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if hint is typing.Any or hint is object:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_shallow_fits(value, a) for a in typing.get_args(hint))
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if origin in (list, dict):
        return isinstance(value, origin)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return isinstance(value, hint) or value in {m.value for m in hint}
    if hint in _PRIMITIVES:
        return not (isinstance(value, bool) and hint is not bool) and isinstance(
            value, _PRIMITIVES[hint]
        )
    return isinstance(hint, type) and isinstance(value, hint)


def _matches(value: Any, hint: Any, path: str, errors: list[str]) -> bool:
    """True if value fits hint; nested model errors are appended as found."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is typing.Any or hint is object:
        if hasattr(value, "to_json") and hasattr(type(value), "__annotations__"):
            _check_model(value, path, errors)
        return True
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return type(None) in args
        # Descend into the first member whose outer shape fits, so an error deep
        # inside a list of panels names the panel field, not the whole list.
        for arg in args:
            if arg is not type(None) and _shallow_fits(value, arg):
                return _matches(value, arg, path, errors)
        return False
    if origin is typing.Literal:
        return value in args
    if origin is list:
        if not isinstance(value, list):
            return False
        (item,) = args or (typing.Any,)
        for i, v in enumerate(value):
            if not _matches(v, item, f"{path}[{i}]", errors):
                errors.append(f"{path}[{i}]: {v!r} is not a {item}")
        return True
    if origin is dict:
        if not isinstance(value, dict):
            return False
        _, val_hint = args or (str, typing.Any)
        for k, v in value.items():
            if not _matches(v, val_hint, f"{path}/{k}", errors):
                errors.append(f"{path}/{k}: {v!r} is not a {val_hint}")
        return True
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return isinstance(value, hint) or value in {m.value for m in hint}
    if hint in _PRIMITIVES:
        if isinstance(value, bool) and hint is not bool:
            return False
        return isinstance(value, _PRIMITIVES[hint])
    if isinstance(hint, type):
        if not isinstance(value, hint):
            return False
        _check_model(value, path, errors)
        return True
    return True  # a hint form we do not model: accept rather than guess


def _check_model(obj: Any, path: str, errors: list[str]) -> None:
    try:
        hints = typing.get_type_hints(type(obj))
    except (NameError, TypeError):
        return
    for name, hint in hints.items():
        if name.startswith("_") or not hasattr(obj, name):
            continue
        value = getattr(obj, name)
        if not _matches(value, hint, f"{path}.{name}", errors):
            errors.append(f"{path}.{name}: {value!r} is not a {hint}")


def validate_dashboard(data: dict[str, Any]) -> list[str]:
    """Schema errors of one dashboard's JSON; empty when it is valid."""
    if not isinstance(data, dict):
        return ["dashboard JSON must be an object"]
    errors: list[str] = []
    for i, panel in enumerate(data.get("panels", [])):
        kind = panel.get("type") if isinstance(panel, dict) else None
        if kind != "row" and runtime.panelcfg_config(str(kind)) is None:
            errors.append(f"/panels[{i}]/type: {kind!r} is not a panel type the schema knows")
    try:
        model = Dashboard.from_json(data)
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        return [*errors, f"does not decode as a Grafana dashboard: {exc!r}"]
    decoded = json.loads(JSONEncoder().encode(model))
    _diff(data, decoded, "", errors)
    _check_model(model, "dashboard", errors)
    return errors


def main(argv: list[str] | None = None) -> int:
    paths = [Path(p) for p in (argv if argv is not None else sys.argv[1:])]
    if not paths:
        print("usage: python -m dashboards.validate FILE.json...", file=sys.stderr)
        return 2
    failed = 0
    for path in paths:
        errors = validate_dashboard(json.loads(path.read_text(encoding="utf-8")))
        for err in errors:
            print(f"{path}: {err}", file=sys.stderr)
        failed += bool(errors)
        if not errors:
            print(f"{path}: valid")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
