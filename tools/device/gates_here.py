"""Gates A and B on what a device run brought back (run HERE: the device has no great_expectations).

    .venv/bin/python tools/device/gates_here.py RESULTS_DIR [--profile full]

RESULTS_DIR is the folder the `run` reply names (files_at): its artifacts_*.tar are unpacked into
RESULTS_DIR/../device-artifacts-<name> (or --into), then the gates run on classify/metrics.json,
coarse/coarse.parquet and mil/{fine.parquet, metrics.json} exactly as `covseg gate_a` / `gate_b` do; the
reports land in <into>/gates/. Exit status 1 when a gate fails (its failures are printed).
"""

from __future__ import annotations

import argparse
import json
import sys
import tarfile
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("results")
    parser.add_argument("--profile", default="full")
    parser.add_argument("--into", default=None)
    args = parser.parse_args()
    from covseg import stages
    from covseg.config import load_params
    from covseg.gates import GateFailed

    results = Path(args.results)
    into = Path(args.into) if args.into else Path("/tmp") / f"device-artifacts-{results.name}"
    into.mkdir(parents=True, exist_ok=True)
    for part in sorted(results.glob("artifacts_*.tar")):
        with tarfile.open(part) as tar:
            tar.extractall(into, filter="data")
    params = load_params(args.profile)
    status = 0
    for name, call in (
        (
            "gate_a",
            lambda: stages.gate_a(into / "classify", into / "coarse", into / "gates" / "gate_a.json", params),
        ),
        ("gate_b", lambda: stages.gate_b(into / "mil", into / "gates" / "gate_b.json", params)),
    ):
        try:
            body = call()
            print(f"{name}: passed ({len(body['checks'])} checks)")
        except GateFailed as exc:
            print(f"{name}: FAILED\n{exc}")
            status = 1
    print(json.dumps({"artifacts": str(into), "reports": str(into / "gates")}))
    return status


if __name__ == "__main__":
    sys.exit(main())
