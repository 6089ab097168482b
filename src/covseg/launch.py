"""What a PyTorchJob pod (or `torchrun` on one machine) runs: one training stage on every rank.

`python -m covseg.launch STAGE ARTIFACTS DATA PARAMS [--input NAME=s3://...] [--output-uri s3://...]`
under `torchrun`: every rank joins the process group (`covseg.distributed`), downloads the stage's inputs,
runs the stage through the stage table (`covseg.stages.run_stage`), and rank 0 alone writes the output
(uploaded to `--output-uri`), metrics and MLflow runs. Kept apart from `covseg.distributed`, which the
training loops import: this module sits above the stage table, that one below it.
"""

from __future__ import annotations

import os
from typing import Any

from covseg.data import download_prefix, upload_folder
from covseg.distributed import barrier, init_from_env, is_main, rank, shutdown


def run_stage(
    name: str,
    artifacts: str | os.PathLike,
    data: str | os.PathLike,
    params: dict[str, Any],
    inputs: dict[str, str] | None = None,
    output_uri: str = "",
    checkpoint_root: str = "",
    endpoint_url: str = "",
) -> Any:
    """Run one training stage on every rank (`covseg.stages.run_stage`): rank 0 into `artifacts`, the other
    ranks into a throw-away folder holding links to the same inputs, with tracking off, so that only rank 0
    writes outputs, metrics and MLflow runs.

    On a cluster (a PyTorchJob's pods share no disk): `inputs` maps input names to `s3://` prefixes each rank
    downloads into `artifacts` first, rank 0 uploads the stage's output to `output_uri` when the stage
    succeeded, and `checkpoint_root` (`s3://` or a folder) keeps rank 0's epoch checkpoints beyond the pods
    (`checkpoint_store.durable_checkpoints`: a rerun of a killed job resumes)."""
    import contextlib
    import shutil
    import tempfile
    from pathlib import Path

    from covseg.checkpoint_store import durable_checkpoints
    from covseg.layout import CHECKPOINTS, DATA, stage
    from covseg.stages import run_stage as run_one

    init_from_env()
    try:
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:  # one download per pod; its other ranks wait
            for item, url in (inputs or {}).items():
                download_prefix(url, Path(artifacts, item), endpoint_url)
        barrier()
        if is_main():
            with contextlib.ExitStack() as stack:
                if checkpoint_root:
                    durable = stack.enter_context(durable_checkpoints(checkpoint_root, name, endpoint_url))
                    link = Path(artifacts, CHECKPOINTS)
                    if link.is_symlink() or link.is_file():
                        link.unlink()
                    elif link.is_dir():
                        shutil.rmtree(link)
                    link.symlink_to(durable, target_is_directory=True)
                result = run_one(name, artifacts, data, params)
            if output_uri:
                upload_folder(Path(artifacts, stage(name).output), output_uri, endpoint_url)
            return result
        scratch = Path(tempfile.mkdtemp(prefix=f"covseg-rank{rank()}-"))
        try:
            for item in stage(name).inputs:
                if item != DATA:
                    (scratch / item).parent.mkdir(parents=True, exist_ok=True)
                    (scratch / item).symlink_to(Path(artifacts, item).resolve(), target_is_directory=True)
            os.environ["COVSEG_TRACKING"] = "0"
            return run_one(name, scratch, data, params)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    finally:
        barrier()
        shutdown()


def main(argv: list[str] | None = None) -> None:
    """`torchrun --nproc-per-node N -m covseg.launch STAGE ARTIFACTS DATA PARAMS`."""
    import argparse
    import json
    from pathlib import Path

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("stage")
    parser.add_argument("artifacts")
    parser.add_argument("data")
    parser.add_argument("params", help="the resolved params: a JSON file, or the JSON itself")
    parser.add_argument(
        "--input",
        action="append",
        default=[],
        metavar="NAME=S3_URL",
        help="download an input artifact (e.g. lungs=s3://bucket/run/lungs) before the stage",
    )
    parser.add_argument("--output-uri", default="", help="rank 0 uploads the stage's output folder here")
    parser.add_argument("--checkpoint-root", default="", help="durable epoch checkpoints (s3:// or a folder)")
    parser.add_argument(
        "--s3-endpoint-url", default="", help="S3 endpoint (MinIO); empty: AWS / $AWS_ENDPOINT_URL"
    )
    parser.add_argument("--result", help="rank 0 writes the stage's result here as JSON")
    args = parser.parse_args(argv)
    text = args.params if args.params.lstrip().startswith("{") else Path(args.params).read_text()
    inputs = dict(item.split("=", 1) for item in args.input)
    result = run_stage(
        args.stage,
        args.artifacts,
        args.data,
        json.loads(text),
        inputs,
        args.output_uri,
        args.checkpoint_root,
        args.s3_endpoint_url,
    )
    if args.result and int(os.environ.get("RANK", "0")) == 0:
        Path(args.result).write_text(json.dumps(result, indent=2, default=float))


if __name__ == "__main__":
    main()
