"""A missing external tool (kubectl, promtool, ...) is a skip on a developer's machine
and a failure where the suite must run whole: under `.ci/run`, which exports
FLEET_REQUIRE_TOOLS=1, or wherever CI is set."""

from __future__ import annotations

import os

import pytest

REQUIRE_ENV = "FLEET_REQUIRE_TOOLS"


def tools_required() -> bool:
    return os.environ.get(REQUIRE_ENV) == "1" or bool(os.environ.get("CI"))


def missing_tool(reason: str, *, module_level: bool = False) -> None:
    """Fail (tools required) or skip, saying which tool is missing and how to get it."""
    if tools_required():
        pytest.fail(f"{reason} ({REQUIRE_ENV}=1 or CI is set: a missing tool is a failure)",
                    pytrace=False)
    pytest.skip(reason, allow_module_level=module_level)
