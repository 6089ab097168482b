"""Telemetry off, defined once: covseg.telemetry is the only Python source of the variables."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from helpers import REPO_ROOT

from covseg import telemetry

PYTHON_TREES = ("src", "components", "pipelines", "tests", "bench")


def test_no_other_python_file_defines_the_telemetry_variables() -> None:
    names = re.compile("|".join(re.escape(f'"{key}"') for key in telemetry.TELEMETRY_OFF))
    files = sorted(p for tree in PYTHON_TREES for p in (REPO_ROOT / tree).rglob("*.py"))
    assert REPO_ROOT / "src" / "covseg" / "telemetry.py" in files
    defined = [
        str(p.relative_to(REPO_ROOT))
        for p in files
        if p.name not in ("telemetry.py", "test_telemetry.py") and names.search(p.read_text(encoding="utf-8"))
    ]
    assert defined == [], f"telemetry variables spelled out again (use covseg.telemetry): {defined}"


def test_shell_entry_points_export_the_same_variables() -> None:
    make = dict(re.findall(r"^export (\w+) := (\S+)$", (REPO_ROOT / "Makefile").read_text(), re.M))
    assert {k: make.get(k) for k in telemetry.TELEMETRY_OFF} == dict(telemetry.TELEMETRY_OFF)
    printed = subprocess.run(
        [sys.executable, "-m", "covseg.telemetry"], capture_output=True, text=True, check=True
    ).stdout  # what .ci/run evaluates
    assert dict(re.findall(r"^export (\w+)=(\S+)$", printed, re.M)) == dict(telemetry.TELEMETRY_OFF)
    assert "covseg.telemetry" in (REPO_ROOT / ".ci" / "run").read_text()


def test_disable_sets_only_what_is_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in telemetry.TELEMETRY_OFF:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("DO_NOT_TRACK", "0")  # an explicit choice of the user is kept
    telemetry.disable()
    assert {k: os.environ[k] for k in telemetry.TELEMETRY_OFF} == {
        **telemetry.TELEMETRY_OFF,
        "DO_NOT_TRACK": "0",
    }
