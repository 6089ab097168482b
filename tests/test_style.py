"""The enforced style: ruff's docstring rules reach `src/` and nothing else, the contributor hooks pin the
ruff of requirements.lock, and `make lint` checks the format.

Ruff itself is run (the venv's, the version requirements.lock pins) on planted code given on stdin, so each
rule is shown to fire where it should and stay quiet where it should not.
"""

from __future__ import annotations

import re
import subprocess
import tomllib

import pytest
import yaml
from helpers import BIN, REPO_ROOT

UNDOCUMENTED = "def public(x: int) -> int:\n    return x\n"
PROTECTED = (
    "ingest",
    "harmonise",
    "lungs",
    "classify",
    "cam",
    "mil",
    "segment",
    "refine",
    "prior",
    "evaluate",
    "stages",
    "cli",
    "layout",
    "training",
)


def _ruff(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    ruff = BIN / "ruff"
    if not ruff.is_file():
        pytest.skip(f"ruff not installed beside {BIN / 'python'}")
    return subprocess.run(
        [str(ruff), *args],
        cwd=REPO_ROOT,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _codes(filename: str, source: str) -> set[str]:
    """The rule codes ruff reports for `source` as if it were the file `filename` of the repository."""
    result = _ruff("check", "--output-format", "concise", "--stdin-filename", filename, "-", stdin=source)
    return set(re.findall(r":\d+:\d+: ([A-Z]+\d+)", result.stdout))


def _locked_ruff() -> str:
    match = re.search(
        r"^ruff==(\S+)$", (REPO_ROOT / "requirements.lock").read_text(encoding="utf-8"), re.MULTILINE
    )
    assert match, "requirements.lock pins no ruff"
    return match.group(1)


def test_docstring_rules_fire_in_the_library_only() -> None:
    assert {"D100", "D103"} <= _codes("src/covseg/newmodule.py", UNDOCUMENTED)
    for elsewhere in (
        "tests/test_new.py",
        "bench/new.py",
        "tools/new.py",
        "components/new.py",
        "pipelines/new.py",
    ):
        assert not {c for c in _codes(elsewhere, UNDOCUMENTED) if c.startswith("D")}, elsewhere


def test_docstring_rules_follow_the_google_convention() -> None:
    two_line_summary = (
        '"""Module."""\n\n\ndef f() -> None:\n    """A summary that runs on\n    over two lines."""\n'
    )
    assert {"D205", "D209"} <= _codes("src/covseg/newmodule.py", two_line_summary)
    imperative_or_not = '"""Module."""\n\n\ndef f() -> int:\n    """Returns one."""\n    return 1\n'
    assert "D401" not in _codes("src/covseg/newmodule.py", imperative_or_not)  # pep257's rule, not Google's


def test_modules_pending_a_docstring_pass_are_exempt_and_marked_so() -> None:
    config = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["ruff"]["lint"]
    exempt = [
        pattern
        for pattern, codes in config["per-file-ignores"].items()
        if codes == ["D"] and pattern.startswith("src/")
    ]
    assert len(exempt) == 1
    for name in PROTECTED:
        assert not {c for c in _codes(f"src/covseg/{name}.py", UNDOCUMENTED) if c.startswith("D")}, name
    assert {"D100", "D103"} <= _codes("src/covseg/promotion.py", UNDOCUMENTED)  # the rest is checked
    lines = (REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8").splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith(f'"{exempt[0]}"'))
    assert lines[at - 1].startswith("#") and "pending a docstring pass" in lines[at - 1]


def test_the_library_passes_ruff_with_the_docstring_rules() -> None:
    result = _ruff("check", "src")
    assert result.returncode == 0, result.stdout + result.stderr


def test_pre_commit_hooks_run_ruff_check_and_format_at_the_locked_version() -> None:
    config = yaml.safe_load((REPO_ROOT / ".pre-commit-config.yaml").read_text(encoding="utf-8"))
    hooks = {hook["id"]: hook for repo in config["repos"] for hook in repo["hooks"]}
    assert hooks["ruff-check"]["entry"].split()[:2] == ["ruff", "check"]
    assert hooks["ruff-format"]["entry"].split()[:2] == ["ruff", "format"]
    pins = {dep for hook in hooks.values() for dep in hook.get("additional_dependencies", [])}
    assert pins == {f"ruff=={_locked_ruff()}"}
    installed = _ruff("--version").stdout.split()[-1]
    assert installed == _locked_ruff(), "the venv's ruff is not the locked one"


def test_make_lint_checks_the_format() -> None:
    makefile = (REPO_ROOT / "Makefile").read_text(encoding="utf-8")
    lint = makefile.split("\nlint:")[1].split("\n\n")[0]
    assert "ruff check" in lint and "ruff format --check" in lint
