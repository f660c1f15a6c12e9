"""A missing tool is a skip on a developer's machine, a failure under .ci/run or CI."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from required_tools import REQUIRE_ENV, missing_tool

ROOT = Path(__file__).resolve().parent.parent


def test_missing_tool_skips_where_tools_are_optional(monkeypatch):
    monkeypatch.delenv(REQUIRE_ENV, raising=False)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no kubectl"):
        missing_tool("no kubectl")


@pytest.mark.parametrize(("name", "value"), [(REQUIRE_ENV, "1"), ("CI", "true")])
def test_missing_tool_fails_where_every_test_must_run(monkeypatch, name, value):
    monkeypatch.delenv(REQUIRE_ENV, raising=False)
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setenv(name, value)
    with pytest.raises(pytest.fail.Exception, match="no kubectl"):
        missing_tool("no kubectl")


def test_ci_run_requires_the_tools_before_it_runs_pytest():
    text = (ROOT / ".ci" / "run").read_text()
    export = re.search(rf"^export {REQUIRE_ENV}=1$", text, re.M)
    pytest_line = re.search(r"^\S*python\" -m pytest", text, re.M)
    assert export and pytest_line and export.start() < pytest_line.start()
