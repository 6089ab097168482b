"""Pack the trained artifacts for the trip back (device side), within what $OUT returns.

    python3 tools/device/pack_outputs.py WORK/artifacts OUT [--parts 3] [--part-mib 15]

$OUT returns at most 8 files of at most 16 MiB. The small files (metrics, parquet stats, schedule, panel,
model metadata) and the model weights go into OUT/artifacts_<k>.tar (no compression: weights do not
shrink), smallest first, each part under --part-mib. The big label maps (coarse.npz, fine.npz) come back
only if they still fit; what is left behind is listed in OUT/artifacts_manifest.json.
"""

from __future__ import annotations

import argparse
import json
import tarfile
from pathlib import Path

PRIORITY = {".json": 0, ".parquet": 0, ".png": 1, ".pt": 2, ".npz": 3}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("artifacts")
    parser.add_argument("out")
    parser.add_argument("--parts", type=int, default=3)
    parser.add_argument("--part-mib", type=float, default=15.0)
    args = parser.parse_args()

    root, out = Path(args.artifacts), Path(args.out)
    limit = int(args.part_mib * 2**20) - 64 * 1024  # room for tar headers
    files = [p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")]
    files.sort(key=lambda p: (PRIORITY.get(p.suffix, 4), p.stat().st_size, str(p)))
    parts: list[list[Path]] = [[] for _ in range(args.parts)]
    used = [0] * args.parts
    left = []
    for path in files:
        size = path.stat().st_size + 1024
        slot = next((i for i in range(args.parts) if used[i] + size <= limit), None)
        if slot is None:
            left.append(path)
            continue
        parts[slot].append(path)
        used[slot] += size
    manifest = {"parts": {}, "left_behind": {str(p.relative_to(root)): p.stat().st_size for p in left}}
    for i, members in enumerate(parts, start=1):
        if not members:
            continue
        name = f"artifacts_{i}.tar"
        with tarfile.open(out / name, "w") as tar:
            for path in members:
                tar.add(path, arcname=str(path.relative_to(root)))
        manifest["parts"][name] = {str(p.relative_to(root)): p.stat().st_size for p in members}
    (out / "artifacts_manifest.json").write_text(json.dumps(manifest, indent=1))
    print(
        f"packed {sum(len(m) for m in parts)} files into {len(manifest['parts'])} part(s); "
        f"left behind: {list(manifest['left_behind']) or 'nothing'}"
    )


if __name__ == "__main__":
    main()
