"""Build the carry folder for the device job (run HERE, on the CPU, with the project venv).

    .venv/bin/python tools/device/prepare.py                       # full profile -> .devcarry/
    .venv/bin/python tools/device/prepare.py --profile tiny --carry /tmp/devcarry-tiny

What goes into the carry folder (`.devcarry/`, ignored through .git/info/exclude; name it in `carry`):

  lungs/packed.npz      the lungs-stage output of the profile (canonical slices + lung masks): lung masks
                        as bits (exact), image values inside the lungs only (outside they are exactly 0)
                        as 10-bit codes (--bits; max error 4.9e-4 on the harmonised 0..1 scale, about the
                        float16 spacing at 0.25-0.5; lossless float16 (--bits 16) is ~62 MiB at full
                        size and does not fit the 64 MiB that travels), lzma'd.
  lungs/index.parquet   the lungs-stage index, unchanged
  ingest/manifest.parquet + ingest/masks/*.png
                        the ingest manifest and the radiologist masks of the evaluation rows (what
                        `evaluate` reads from the ingest folder; the CT volumes themselves do not travel)
  wheels/*.whl          pure-Python packages the device image lacks (monai)
  carry.json            provenance: profile, lungs key, sizes, sha256 of every file

The lungs stage runs with SimpleITK, which the device lacks, so it runs here. Its output is cached under
`.devcarry-build/` (ignored) by a key of everything it depends on (lungs parameters, manifest, the code of
harmonise.py / lungs.py / io.py); `--rebuild` forces it. The project's own `artifacts/` is never written.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
MONAI_WHEEL = "monai==1.6.1"
PIP_PLATFORM = [
    "--no-deps",
    "--only-binary=:all:",
    "--python-version",
    "3.12",
    "--implementation",
    "cp",
    "--platform",
    "manylinux_2_28_x86_64",
    "--platform",
    "manylinux_2_17_x86_64",
    "--platform",
    "manylinux2014_x86_64",
    "--platform",
    "any",
]


def lungs_key(params: dict, ingest_dir: Path) -> str:
    """What the lungs-stage output depends on."""
    from covseg.io import sha256_file as sha256

    parts = {k: params.get(k) for k in ("image_size", "max_slices_per_volume", "max_eval_slices")}
    parts["manifest"] = sha256(ingest_dir / "manifest.parquet")
    parts["code"] = {
        name: sha256(ROOT / "src" / "covseg" / name) for name in ("harmonise.py", "lungs.py", "io.py")
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def build_lungs(params: dict, ingest_dir: Path, cache: Path, rebuild: bool) -> tuple[Path, float | None]:
    """The lungs stage of `params` into `cache/lungs-<key>` (reused when present)."""
    from covseg import stages

    target = cache / f"lungs-{params['profile']}-{lungs_key(params, ingest_dir)}"
    if target.is_dir() and not rebuild:
        print(f"lungs: reusing {target}")
        return target, None
    t0 = time.perf_counter()
    stages.lungs(ingest_dir, target, params)
    seconds = time.perf_counter() - t0
    print(f"lungs: built {target} in {seconds:.0f} s")
    return target, seconds


def encode_values(values: np.ndarray, bits: int) -> np.ndarray:
    """float16 values in [0, 1] -> integer codes: the float16 bit patterns (bits 16) or round(v * (2^bits - 1))."""
    if bits == 16:
        return values.view(np.uint16)
    if not 1 <= bits <= 15:
        raise SystemExit("--bits: 16 (lossless) or 1..15")
    return np.round(values.astype(np.float64) * (2**bits - 1)).astype(np.uint16)


def pack_lungs(lungs_dir: Path, out: Path, bits: int) -> dict:
    """slices.npz (image float16, lung bool) -> packed.npz: lung masks as bits, image values inside the lungs
    only (outside they are exactly 0) as `bits`-bit codes, high and low bytes apart, lzma'd. Checked by
    unpacking: masks identical, values identical (bits 16) or within half a quantisation step."""
    from covseg.harmonise import INDEX, SLICES

    arrays = np.load(lungs_dir / SLICES)
    image, lung = arrays["image"], arrays["lung"]
    assert image.dtype == np.float16 and lung.dtype == bool, (image.dtype, lung.dtype)
    outside = image[~lung]
    if outside.size and np.any(outside != 0):
        raise SystemExit(f"{lungs_dir}: image is not zero outside the lung mask; the packing assumes it")
    values = np.ascontiguousarray(image[lung])
    if bits < 16 and (values.min() < 0 or values.max() > 1):
        raise SystemExit(f"{lungs_dir}: values outside [0, 1]; use --bits 16")
    codes = encode_values(values, bits)
    payload = (
        codes.astype(np.uint8).tobytes()
        if bits <= 8
        else (codes >> 8).astype(np.uint8).tobytes() + (codes & 0xFF).astype(np.uint8).tobytes()
    )
    out.mkdir(parents=True, exist_ok=True)
    np.savez(
        out / "packed.npz",
        shape=np.array(image.shape, np.int64),
        bits=np.array(bits),
        lung=np.frombuffer(lzma.compress(np.packbits(lung.ravel()).tobytes(), preset=6), np.uint8),
        values=np.frombuffer(lzma.compress(payload, preset=6), np.uint8),
    )
    shutil.copyfile(lungs_dir / INDEX, out / INDEX)
    from unpack import unpack_arrays

    image2, lung2 = unpack_arrays(out / "packed.npz")
    if not np.array_equal(lung2, lung):
        raise SystemExit("packing changed the lung masks")
    err = np.abs(image2.astype(np.float32) - image.astype(np.float32))
    tolerance = 0.0 if bits == 16 else 0.5 / (2**bits - 1) + 2.0**-11  # half a step + float16 rounding
    if err.max() > tolerance:
        raise SystemExit(f"packing error {err.max():.2e} over {tolerance:.2e}")
    return {
        "n_slices": int(image.shape[0]),
        "image_size": int(image.shape[-1]),
        "lung_pixel_share": float(lung.mean()),
        "unpacked_bytes": int(image.nbytes + lung.nbytes),
        "bits": bits,
        "lossless": bits == 16,
        "max_abs_error": float(err.max()),
        "mean_abs_error_in_lung": float(err[lung].mean()),
    }


def copy_eval_masks(ingest_dir: Path, out: Path) -> int:
    import pandas as pd

    manifest = pd.read_parquet(ingest_dir / "manifest.parquet")
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(ingest_dir / "manifest.parquet", out / "manifest.parquet")
    masks = [m for m in manifest.loc[manifest["role"] == "eval", "mask_file"].dropna().unique() if m]
    for name in masks:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ingest_dir / name, out / name)
    return len(masks)


def fetch_wheels(out: Path, wheel_cache: Path) -> list[str]:
    """monai (pure Python) for Python 3.12; downloaded once into `wheel_cache`, then copied."""
    wheel_cache.mkdir(parents=True, exist_ok=True)
    if not list(wheel_cache.glob("monai-1.6.1-*.whl")):
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "-q",
                *PIP_PLATFORM,
                "-d",
                str(wheel_cache),
                MONAI_WHEEL,
            ],
            check=True,
        )
    out.mkdir(parents=True, exist_ok=True)
    names = []
    for wheel in sorted(wheel_cache.glob("*.whl")):
        shutil.copyfile(wheel, out / wheel.name)
        names.append(wheel.name)
    return names


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--profile", default="full")
    parser.add_argument("--carry", default=str(ROOT / ".devcarry"), help="carry folder (replaced)")
    parser.add_argument("--ingest", default=None, help="ingest folder (default: artifacts/ingest)")
    parser.add_argument("--cache", default=str(ROOT / ".devcarry-build"), help="lungs-stage / wheel cache")
    parser.add_argument("--rebuild", action="store_true", help="recompute the lungs stage")
    parser.add_argument(
        "--bits",
        type=int,
        default=10,
        help="image values: 16 = the float16 values losslessly (~62 MiB at full: does not fit), "
        "else quantised to this many bits (10: ~45 MiB, max error 4.9e-4 on the 0..1 scale)",
    )
    parser.add_argument("--max-mib", type=float, default=56.0, help="refuse a carry bigger than this")
    args = parser.parse_args()

    from covseg.config import load_params
    from covseg.io import sha256_file as sha256

    params = load_params(args.profile)
    ingest_dir = Path(args.ingest) if args.ingest else ROOT / params["artifacts_dir"] / "ingest"
    carry, cache = Path(args.carry), Path(args.cache)
    if not (ingest_dir / "manifest.parquet").is_file():
        sys.exit(
            f"no ingest manifest at {ingest_dir}: in a fresh checkout run `make data` and "
            f"`COVSEG_TRACKING=0 .venv/bin/covseg ingest --profile {args.profile}` first (~4 min here)"
        )
    lungs_dir, lungs_seconds = build_lungs(params, ingest_dir, cache, args.rebuild)

    scratch = carry.with_name(carry.name + ".tmp")
    shutil.rmtree(scratch, ignore_errors=True)
    info = {
        "profile": args.profile,
        "image_size": params["image_size"],
        "lungs_key": lungs_dir.name,
        "lungs_stage_seconds_here": lungs_seconds,
        "git_commit": subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip(),
        "git_dirty_lungs_code": subprocess.run(
            [
                "git",
                "status",
                "--porcelain",
                "src/covseg/harmonise.py",
                "src/covseg/lungs.py",
                "src/covseg/io.py",
                "src/covseg/ingest.py",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout.splitlines(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    info["lungs"] = pack_lungs(lungs_dir, scratch / "lungs", args.bits)
    info["eval_masks"] = copy_eval_masks(ingest_dir, scratch / "ingest")
    info["wheels"] = fetch_wheels(scratch / "wheels", cache / "wheels")
    files = sorted(p for p in scratch.rglob("*") if p.is_file())
    info["files"] = {
        str(p.relative_to(scratch)): {"bytes": p.stat().st_size, "sha256": sha256(p)}
        for p in files
        if p.suffix != ".png"
    }
    info["total_bytes"] = sum(p.stat().st_size for p in files)
    (scratch / "carry.json").write_text(json.dumps(info, indent=2))
    mib = info["total_bytes"] / 2**20
    if mib > args.max_mib:
        raise SystemExit(f"carry is {mib:.1f} MiB, over --max-mib {args.max_mib}: it would not travel")
    shutil.rmtree(carry, ignore_errors=True)
    scratch.rename(carry)
    print(
        json.dumps({k: info[k] for k in ("profile", "image_size", "lungs", "eval_masks", "wheels")}, indent=1)
    )
    print(f"carry: {carry}  {mib:.1f} MiB")


if __name__ == "__main__":
    main()
