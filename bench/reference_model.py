"""A trained segmenter of the deployed (`full` profile) architecture, cheaply, for agreement checks only.

The method chain with the `tiny` profile's data and epochs (3 slices per training volume, one short epoch
per stage) on the project's `data/`, but the `full` profile's image size (256 px) and U-Net (features
32-32-64-128-256-32), the segmenter trained `--epochs` epochs. Not a good model (see README *Results* for
those): a network with trained weights whose masks a faster inference path must reproduce (Dice >= 0.99,
`bench/predict_levers.py`), where random weights would leave every probability near one value.

    .venv/bin/python bench/reference_model.py --out /tmp/covseg-reference     # ~10 min on 2 busy cores
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="artifacts folder (the model lands in OUT/segment)")
    parser.add_argument("--data", default=str(REPO / "data"))
    parser.add_argument("--epochs", type=int, default=4, help="segmenter epochs")
    args = parser.parse_args(argv)
    os.environ.setdefault("COVSEG_TRACKING", "0")
    os.environ.setdefault("COVSEG_PIPELINE_RUN_ID", "bench-reference")

    from covseg import stages
    from covseg.config import load_params

    full = load_params("full", path=REPO / "params.yaml")
    params = load_params(
        "tiny",
        path=REPO / "params.yaml",
        overrides={
            "image_size": full["image_size"],
            "segment": {"features": full["segment"]["features"], "epochs": args.epochs, "batch_size": 8},
        },
    )
    out = Path(args.out)
    steps = [
        ("ingest", lambda: stages.ingest(args.data, out / "ingest", params)),
        ("lungs", lambda: stages.lungs(out / "ingest", out / "lungs", params)),
        ("classify", lambda: stages.classify(out / "lungs", out / "classify", params, out / "checkpoints")),
        ("coarse", lambda: stages.coarse(out / "lungs", out / "classify", out / "coarse", params)),
        (
            "mil",
            lambda: stages.mil(
                out / "lungs", out / "classify", out / "coarse", out / "mil", params, out / "checkpoints"
            ),
        ),
        (
            "segment",
            lambda: stages.segment(out / "lungs", out / "mil", out / "segment", params, out / "checkpoints"),
        ),
    ]
    for name, step in steps:
        start = time.perf_counter()
        step()
        print(f"{name}: {time.perf_counter() - start:.0f} s", flush=True)
    print(out / "segment")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
