"""job.json for job.sh: return codes, times, the carry's provenance, what the artifact tars hold.

Folds OUT/artifacts_manifest.json into job.json (and removes it) to stay within the 8 files $OUT returns.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("--out", "--carry", "--profile", "--simpleitk", "--rc"):
        parser.add_argument(name, required=True)
    for name in ("--unpack-s", "--bench-s", "--total-s"):
        parser.add_argument(name, type=int, required=True)
    args = parser.parse_args()
    out = Path(args.out)
    carry = json.loads((Path(args.carry) / "carry.json").read_text())
    manifest = out / "artifacts_manifest.json"
    body = {
        "profile": args.profile,
        "overrides": json.loads(os.environ.get("DEVICE_OVERRIDES") or "null"),
        "simpleitk": args.simpleitk,
        "rc": dict(kv.split("=", 1) for kv in args.rc.split()),
        "unpack_s": args.unpack_s,
        "bench_s": args.bench_s,
        "total_s": args.total_s,
        "carry": {k: carry.get(k) for k in ("profile", "lungs_key", "git_commit", "total_bytes", "lungs")},
        "artifacts": json.loads(manifest.read_text()) if manifest.is_file() else None,
    }
    manifest.unlink(missing_ok=True)
    (out / "job.json").write_text(json.dumps(body, indent=1))
    print("job.json:", json.dumps({k: body[k] for k in ("rc", "total_s", "simpleitk")}))


if __name__ == "__main__":
    main()
