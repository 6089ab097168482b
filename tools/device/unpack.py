"""Unpack the carry folder into a work folder laid out like the pipeline's artifacts (device side).

    python3 tools/device/unpack.py CARRY WORK

CARRY/lungs/packed.npz -> WORK/lungs/slices.npz (+ index.parquet), byte-identical arrays to the lungs
stage's; CARRY/ingest -> WORK/ingest (manifest + evaluation masks). Needs numpy only.
"""

from __future__ import annotations

import json
import lzma
import shutil
import sys
from pathlib import Path

import numpy as np


def unpack_arrays(packed: Path) -> tuple[np.ndarray, np.ndarray]:
    """(image float16 (N,S,S), lung bool (N,S,S)) from `prepare.pack_lungs`'s file.

    bits 16: the float16 values as they were; bits < 16: value = round(v * (2^bits - 1)) / (2^bits - 1).
    """
    data = np.load(packed)
    shape = tuple(int(v) for v in data["shape"])
    bits = int(data["bits"])
    lung_bits = np.frombuffer(lzma.decompress(data["lung"].tobytes()), np.uint8)
    lung = np.unpackbits(lung_bits, count=int(np.prod(shape))).astype(bool).reshape(shape)
    raw = np.frombuffer(lzma.decompress(data["values"].tobytes()), np.uint8)
    if bits <= 8:
        codes = raw.astype(np.uint16)
    else:
        n = raw.size // 2
        codes = (raw[:n].astype(np.uint16) << 8) | raw[n:].astype(np.uint16)
    image = np.zeros(shape, dtype=np.float16)
    image[lung] = codes.view(np.float16) if bits == 16 else (codes / float(2**bits - 1)).astype(np.float16)
    return image, lung


def unpack(carry: Path, work: Path) -> dict:
    image, lung = unpack_arrays(carry / "lungs" / "packed.npz")
    (work / "lungs").mkdir(parents=True, exist_ok=True)
    np.savez(work / "lungs" / "slices.npz", image=image, lung=lung)
    shutil.copyfile(carry / "lungs" / "index.parquet", work / "lungs" / "index.parquet")
    shutil.copytree(carry / "ingest", work / "ingest", dirs_exist_ok=True)
    info = json.loads((carry / "carry.json").read_text())
    return {"profile": info["profile"], "image_size": int(image.shape[-1]), "n_slices": int(image.shape[0])}


if __name__ == "__main__":
    print(json.dumps(unpack(Path(sys.argv[1]), Path(sys.argv[2]))))
