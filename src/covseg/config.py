"""Parameters: `params.yaml` profiles merged over `common`, plus the paths every stage agrees on."""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import yaml

PROFILES = ("tiny", "quick", "full")
DEFAULT_PROFILE = "quick"


def repo_root() -> Path:
    """The project root: $COVSEG_ROOT, else the nearest parent of the cwd holding params.yaml."""
    if env := os.environ.get("COVSEG_ROOT"):
        return Path(env).resolve()
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if (folder / "params.yaml").is_file():
            return folder
    return here


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_params(
    profile: str | None = None, path: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Return the `common` parameters overridden by `profile` (and then by `overrides`)."""
    path = Path(path) if path else repo_root() / "params.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: params file not found")
    raw = yaml.safe_load(path.read_text())
    profile = profile or os.environ.get("COVSEG_PROFILE") or raw.get("profile") or DEFAULT_PROFILE
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
    params = _merge(raw["common"], raw.get(profile) or {})
    if overrides:
        params = _merge(params, overrides)
    params["profile"] = profile
    return params


def params_hash(params: dict[str, Any]) -> str:
    """A short, stable hash of a parameter set (a lineage tag)."""
    blob = json.dumps(params, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
