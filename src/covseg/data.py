"""Raw data: import sources into `data/`, and fetch the raw sources of a pipeline run.

Importing copies the sources into the project's DVC-tracked `data/` (copy, verify, `dvc add`); fetching
brings a pipeline run's raw sources from a folder, an S3 prefix, or one version of the data in the DVC
remote.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from tqdm import tqdm

from covseg.errors import InputError

_DOWNLOAD_THREADS = 16


def source_changes(source: str | Path, data_dir: str | Path) -> dict[str, list[str]]:
    """What changed in `source` since it was imported into `data_dir`.

    Relative paths ``added``, ``removed`` and ``changed`` (content compared by SHA-256).
    """
    from covseg.io import sha256_file

    def listing(root: Path) -> dict[str, Path]:
        return {p.relative_to(root).as_posix(): p for p in root.rglob("*") if p.is_file()}

    new, old = listing(Path(source)), listing(Path(data_dir))
    both = sorted(set(new) & set(old))
    return {
        "added": sorted(set(new) - set(old)),
        "removed": sorted(set(old) - set(new)),
        "changed": [
            k
            for k in both
            if new[k].stat().st_size != old[k].stat().st_size or sha256_file(new[k]) != sha256_file(old[k])
        ],
    }


def import_sources(source: str | Path, data_dir: str | Path, track: bool = True, update: bool = False) -> int:
    """Copy every file under `source` into `data_dir` (all or nothing), verify hashes, and `dvc add` it.

    With `update`, a `data_dir` that already holds data is replaced when the source differs from it (a new
    data version: new `data.dvc` md5) and left alone when it does not (returns 0). The source is only read.
    Returns the number of files copied.
    """
    from covseg.io import atomic_dir, sha256_file  # io reads CT (SimpleITK): only when importing

    source, data_dir = Path(source).resolve(), Path(data_dir)
    if not source.is_dir():
        raise InputError(source, "source folder not found")
    files = sorted(p for p in source.rglob("*") if p.is_file())
    if not files:
        raise InputError(source, "source folder is empty")
    if data_dir.exists() and any(data_dir.iterdir()):
        if not update:
            raise InputError(
                data_dir,
                "already holds data; remove it first, import into another folder, "
                "or pass --update to replace it with a newer source",
            )
        if not any(source_changes(source, data_dir).values()):
            return 0
    with atomic_dir(data_dir) as scratch:
        for path in tqdm(files, desc="import", unit="file", disable=None):
            target = scratch / path.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
            if sha256_file(target) != sha256_file(path):
                raise InputError(path, "copy does not match its source (disk error?)")
    if track:
        dvc_add(data_dir)
    return len(files)


def dvc_add(data_dir: Path) -> None:
    """Track `data_dir` with DVC (writes `<data_dir>.dvc`); a no-op outside a DVC repository."""
    root = data_dir.resolve().parent
    if not (root / ".dvc").is_dir():
        return
    subprocess.run(["dvc", "add", "--quiet", data_dir.name], cwd=root, check=True)


def fetch_data(data_path: str, dest: str | Path, data_version: str = "", endpoint_url: str = "") -> Path:
    """Locates the raw sources of a pipeline run, downloading them into `dest` when they are on S3.

    Args:
        data_path: A local folder (returned as is); ``s3://bucket/prefix`` holding the raw layout (every object
            under it is copied); or, with `data_version`, the URL of the project's DVC remote.
        dest: Empty folder for the download (unused for a local folder).
        data_version: A DVC directory md5 (``outs[0].md5`` of ``data.dvc``, ``<32 hex>.dir``). With an s3://
            `data_path`, exactly that version is rebuilt from the DVC remote (``files/md5/<2>/<30>``
            objects, DVC 3 layout) and every file's md5 is checked. Ignored for a local folder.
        endpoint_url: S3 endpoint (MinIO); empty for ``$AWS_ENDPOINT_URL`` or AWS itself.

    Returns:
        The folder holding the raw sources.

    Raises:
        InputError: The folder, the version or an object is missing, or a download does not match its md5.
    """
    if not data_path.startswith("s3://"):
        folder = Path(data_path)
        if not folder.is_dir():
            raise InputError(folder, "raw data folder not found")
        return folder
    import boto3

    bucket, _, prefix = data_path[len("s3://") :].partition("/")
    prefix = prefix.strip("/")
    s3 = boto3.client("s3", endpoint_url=endpoint_url or None)
    dest = Path(dest)
    if data_version:
        files = _dvc_listing(s3, bucket, prefix, data_version, data_path)
    else:
        files = _prefix_listing(s3, bucket, prefix, data_path)
    _download_all(s3, bucket, files, dest)
    return dest


def _dvc_key(prefix: str, md5: str) -> str:
    return "/".join(part for part in (prefix, "files", "md5", md5[:2], md5[2:]) if part)


def _dvc_listing(s3: Any, bucket: str, prefix: str, version: str, url: str) -> list[tuple[str, str, str]]:
    """(key, relative path, md5) of every file of DVC directory `version` in the remote."""
    if not (version.endswith(".dir") and len(version) == 36):
        raise InputError(url, f"data_version {version!r} is not a DVC directory md5 (<32 hex>.dir)")
    try:
        body = s3.get_object(Bucket=bucket, Key=_dvc_key(prefix, version))["Body"].read()
    except s3.exceptions.NoSuchKey as exc:
        raise InputError(url, f"data version {version} not in this DVC remote (dvc push it first)") from exc
    entries = json.loads(body)
    return [(_dvc_key(prefix, e["md5"]), e["relpath"], e["md5"]) for e in entries]


def _prefix_listing(s3: Any, bucket: str, prefix: str, url: str) -> list[tuple[str, str, str]]:
    """(key, relative path, "") of every object under the prefix."""
    base = f"{prefix}/" if prefix else ""
    files = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=base):
        keys = [o["Key"] for o in page.get("Contents", []) if not o["Key"].endswith("/")]
        files += [(key, key[len(base) :], "") for key in keys]
    if not files:
        raise InputError(url, "no objects under this S3 prefix")
    return files


def _download_all(s3: Any, bucket: str, files: list[tuple[str, str, str]], dest: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    def fetch(item: tuple[str, str, str]) -> None:
        key, relpath, md5 = item
        target = dest / relpath
        if not target.resolve().is_relative_to(dest.resolve()):
            raise InputError(f"s3://{bucket}/{key}", f"relative path {relpath!r} leaves the download folder")
        target.parent.mkdir(parents=True, exist_ok=True)
        s3.download_file(bucket, key, str(target))
        if md5 and hashlib.md5(target.read_bytes()).hexdigest() != md5:
            raise InputError(f"s3://{bucket}/{key}", f"{relpath}: content does not match its md5 {md5}")

    with ThreadPoolExecutor(max_workers=_DOWNLOAD_THREADS) as pool:
        list(pool.map(fetch, files))


def _s3_client(endpoint_url: str = "") -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=endpoint_url or None)


def _split_s3_url(url: str) -> tuple[str, str]:
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    return bucket, prefix.strip("/")


def download_prefix(url: str, folder: str | os.PathLike, endpoint_url: str = "") -> int:
    """Copy every object under `s3://bucket/prefix` into `folder` (same relative paths); returns the count."""
    from pathlib import Path

    client, (bucket, prefix) = _s3_client(endpoint_url), _split_s3_url(url)
    n = 0
    for page in client.get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix=f"{prefix}/" if prefix else ""
    ):
        for obj in page.get("Contents", []):
            target = Path(folder, obj["Key"][len(prefix) :].lstrip("/"))
            target.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, obj["Key"], str(target))
            n += 1
    return n


def upload_folder(folder: str | os.PathLike, url: str, endpoint_url: str = "") -> int:
    """Upload every file under `folder` to `s3://bucket/prefix/<relative path>`; returns the count."""
    from pathlib import Path

    client, (bucket, prefix) = _s3_client(endpoint_url), _split_s3_url(url)
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file())
    for path in files:
        key = "/".join(filter(None, [prefix, path.relative_to(folder).as_posix()]))
        client.upload_file(str(path), bucket, key)
    return len(files)
