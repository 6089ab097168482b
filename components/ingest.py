"""Ingest component: raw sources (a folder, an s3:// prefix or a DVC remote) -> canonical cases + manifest."""

from kfp import dsl
from kfp.dsl import Dataset, Metrics, Output

from components.settings import BASE_IMAGE, log_numbers


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False, additional_funcs=[log_numbers])
def ingest(
    data_path: str,
    data_version: str,
    s3_endpoint_url: str,
    params_json: str,
    ingested: Output[Dataset],
    metrics: Output[Metrics],
) -> None:
    """Reads every configured raw source into canonical cases and `manifest.parquet`.

    Binds `covseg.stages.ingest`. The raw data is located by `covseg.data.fetch_data`.

    Args:
        data_path: A folder holding the raw sources (local runs, a mounted volume); an ``s3://bucket/prefix``
            holding the same layout; or, with `data_version`, the URL of the project's DVC remote.
        data_version: The DVC md5 of the data (``outs[0].md5`` of ``data.dvc``, ending in ``.dir``). With an
            s3:// `data_path` that exact version is fetched from the DVC remote and every file's md5 is
            verified; with a folder it is only recorded. It is also what KFP's cache key sees of the data:
            give a new version (or run without caching) when the data at `data_path` changed.
        s3_endpoint_url: S3 endpoint (MinIO in dev); empty for AWS S3 or ``$AWS_ENDPOINT_URL``.
        params_json: The merged parameter profile (``covseg.config.load_params``) as JSON.
        ingested: Output folder: ``cases/``, ``masks/``, ``manifest.parquet``.
        metrics: Slice and volume counts per split.
    """
    import json
    import tempfile

    from covseg import stages
    from covseg.data import fetch_data

    params = json.loads(params_json)
    with tempfile.TemporaryDirectory(prefix="covseg-raw-") as scratch:
        frame = stages.ingest(
            fetch_data(data_path, scratch, data_version, s3_endpoint_url), ingested.path, params
        )
    counts = {"slices": len(frame), "volumes": int(frame["volume_id"].nunique())}
    counts.update({f"slices_{split}": int(n) for split, n in frame["split"].value_counts().items()})
    log_numbers(metrics, counts)
    ingested.metadata.update({"data_path": data_path, "data_version": data_version, **counts})
