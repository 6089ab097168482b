"""The two errors a user sees as one line and exit code 2: bad input, and a data gate that refused.

Standard library only, so that a light command (the CLI's error handling, `covseg data import`, the
pipeline's data fetch) can catch them without importing SimpleITK, pandas or Great Expectations.
`covseg.io` re-exports `InputError` and `covseg.gates` re-exports `GateFailed`.
"""

from __future__ import annotations

from pathlib import Path


class InputError(ValueError):
    """Bad input: the message names the file and the problem, in one line."""

    def __init__(self, path: str | Path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


class GateFailed(RuntimeError):
    """A gate found data that must not go downstream."""

    def __init__(self, gate: str, failures: list[str], report: Path):
        self.gate, self.failures, self.report = gate, failures, report
        super().__init__(
            f"gate {gate} failed ({len(failures)} expectation(s)); report: {report}\n  - "
            + "\n  - ".join(failures)
        )
