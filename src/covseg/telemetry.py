"""Telemetry and usage analytics off: the one definition of the environment that turns them off.

Great Expectations, DVC, MLflow and the tools that honour ``DO_NOT_TRACK`` each read their own variable.
covseg sets them here (:func:`disable`, called before MLflow or Great Expectations is configured), the
tests and the local KFP runner pass :data:`TELEMETRY_OFF` to every process they start, and the shell
entry points (``Makefile``, ``.ci/run``) export the same variables for commands that run before Python:
``python -m covseg.telemetry`` prints them as ``export`` lines.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from types import MappingProxyType

TELEMETRY_OFF: Mapping[str, str] = MappingProxyType(
    {
        "GX_ANALYTICS_ENABLED": "False",
        "DVC_NO_ANALYTICS": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "1",
    }
)
"""Environment variables that switch telemetry off (read-only)."""


def disable() -> None:
    """Set each variable of :data:`TELEMETRY_OFF` that the environment does not set already."""
    for key, value in TELEMETRY_OFF.items():
        os.environ.setdefault(key, value)


if __name__ == "__main__":  # `eval "$(python -m covseg.telemetry)"` in a shell script
    print("\n".join(f"export {key}={value}" for key, value in TELEMETRY_OFF.items()))
