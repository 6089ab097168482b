"""The GPU node pool's placement contract: ``infra/gpu_pool.json``, the one place that names its label and taint.

Terraform (``infra/terraform/gke``) creates the pool from that file, and the training pipeline gives its
GPU steps the matching nodeSelector and toleration from it (`load`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

ENV = "COVSEG_GPU_POOL_FILE"
"""Environment variable naming gpu_pool.json where the repository is not at hand (installed package)."""

REPO_FILE = Path(__file__).resolve().parents[2] / "infra" / "gpu_pool.json"
TAINT_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")


def load() -> dict[str, Any]:
    """Loads the GPU node pool's placement contract.

    Reads ``infra/gpu_pool.json`` from the repository this module sits in; in an installed package
    (no repository around it) it falls back to the file named by ``$COVSEG_GPU_POOL_FILE``.

    Returns:
        ``{"accelerator_resource": str, "node_selector": {"key", "value"},
        "toleration": {"key", "value", "effect"}}``.

    Raises:
        FileNotFoundError: Neither the repository file nor ``$COVSEG_GPU_POOL_FILE`` exists.
        ValueError: The file lacks a field or names an unknown taint effect.
    """
    path = REPO_FILE
    if not path.is_file():
        env = os.environ.get(ENV)
        if not env:
            raise FileNotFoundError(f"{path} not found and ${ENV} is not set")
        path = Path(env)
    pool = json.loads(path.read_text())
    try:
        fields = [
            pool["accelerator_resource"],
            pool["node_selector"]["key"],
            pool["node_selector"]["value"],
            pool["toleration"]["key"],
            pool["toleration"]["value"],
            pool["toleration"]["effect"],
        ]
    except (KeyError, TypeError) as err:
        raise ValueError(f"{path}: missing field {err}") from err
    if not all(isinstance(f, str) and f for f in fields):
        raise ValueError(f"{path}: every field must be a non-empty string")
    if pool["toleration"]["effect"] not in TAINT_EFFECTS:
        raise ValueError(f"{path}: toleration.effect must be one of {TAINT_EFFECTS}")
    return pool
