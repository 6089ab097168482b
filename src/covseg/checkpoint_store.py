"""Epoch checkpoints that outlive a pipeline task, so a killed training task's rerun resumes where it stopped.

`covseg.training.fit` writes one checkpoint file per epoch into a local folder and removes it when training
completes. On Kubeflow the task's own disk dies with its pod, so `durable_checkpoints` hands the stage a
folder that survives it: a local folder as is (kfp.local, a mounted volume), or, for ``s3://bucket/prefix``
(the pipeline root's bucket on the cluster), a temporary folder filled from the prefix first and mirrored
back to it while the stage trains. Checkpoint names carry their key (`covseg.training.checkpoint_path`:
parameters and input contents), so a rerun finds its own and ignores others; when the stage finishes, what
is left in the folder belongs to old keys (runs killed before a change) and is swept.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PATTERN = "*.ckpt"
"""The files `covseg.training.fit` writes (its ``*.tmp`` halves never travel)."""


@contextlib.contextmanager
def durable_checkpoints(
    root: str, stage: str, endpoint_url: str = "", interval_s: float = 0.5
) -> Iterator[Path]:
    """A folder for one training stage's epoch checkpoints that a rerun of the stage finds again.

    Args:
        root: A local folder, or ``s3://bucket/prefix``; the stage's checkpoints go under ``<root>/<stage>``.
            Empty: a temporary folder that lives as long as the block (no resume after a kill).
        stage: Name of the stage (one folder each: a finished stage sweeps only its own).
        endpoint_url: S3 endpoint (MinIO); empty for ``$AWS_ENDPOINT_URL`` or AWS itself.
        interval_s: How often the S3 mirror looks for a new checkpoint (a kill loses at most this much
            of a finished epoch's upload).

    Yields:
        The local folder to pass to the stage as its checkpoint folder.

    On success every checkpoint left under ``<root>/<stage>`` is deleted (the stage's own were removed by
    `fit`; the rest are of old keys). On an exception the latest checkpoints stay for the rerun.
    Durability is best effort: an S3 prefix that cannot be reached (wrong endpoint, no bucket, no access)
    is one warning in the log, and the stage trains as it would without it.
    """
    if not root:  # no durable place given: the checkpoints live and die with this process
        with tempfile.TemporaryDirectory(prefix=f"covseg-ckpt-{stage}-") as scratch:
            yield Path(scratch)
        return
    if not root.startswith("s3://"):
        folder = Path(root) / stage
        folder.mkdir(parents=True, exist_ok=True)
        yield folder
        for stale in folder.glob(PATTERN):
            stale.unlink(missing_ok=True)
        return
    url = f"{root.rstrip('/')}/{stage}"
    with tempfile.TemporaryDirectory(prefix=f"covseg-ckpt-{stage}-") as scratch:
        mirror = S3Mirror(url, Path(scratch), endpoint_url)
        try:
            mirror.pull()
        except mirror.errors as exc:
            log.warning("%s is out of reach (%s): this task's checkpoints will not outlive it", url, exc)
            yield Path(scratch)
            return
        stop = threading.Event()
        thread = threading.Thread(
            target=mirror.run, args=(stop, interval_s), name=f"ckpt-mirror-{stage}", daemon=True
        )
        thread.start()
        try:
            yield Path(scratch)
        finally:
            stop.set()
            thread.join()
            mirror.attempt(mirror.push)  # the last epoch's checkpoint, or the removals of a finished stage
        mirror.attempt(mirror.sweep)


class S3Mirror:
    """Keeps the ``*.ckpt`` files of a local folder and an S3 prefix the same, local side leading."""

    def __init__(self, url: str, folder: Path, endpoint_url: str = "") -> None:
        import boto3
        from boto3.exceptions import Boto3Error
        from botocore.config import Config
        from botocore.exceptions import BotoCoreError, ClientError

        self.bucket, _, prefix = url[len("s3://") :].partition("/")
        self.prefix = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
        self.folder = folder
        # Short connect timeout, few retries: an unreachable store must not hold the training up for minutes.
        config = Config(connect_timeout=5, read_timeout=60, retries={"max_attempts": 3, "mode": "standard"})
        self.s3: Any = boto3.client("s3", endpoint_url=endpoint_url or None, config=config)
        self.errors = (BotoCoreError, ClientError, Boto3Error)
        """What a failed S3 call raises: endpoint unreachable, no bucket, no access, a failed upload."""
        self.pushed: dict[str, tuple[int, int]] = {}
        """Name -> (size, mtime_ns) of each file as it was last uploaded or downloaded."""

    def _remote(self) -> list[str]:
        pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", []) if o["Key"].endswith(".ckpt")]

    def pull(self) -> None:
        """Downloads every checkpoint under the prefix (a killed run's, or old keys' until swept)."""
        for key in self._remote():
            target = self.folder / key[len(self.prefix) :]
            if target.parent != self.folder:
                continue  # not one of this stage's files
            self.s3.download_file(self.bucket, key, str(target))
            stat = target.stat()
            self.pushed[target.name] = (stat.st_size, stat.st_mtime_ns)

    def push(self) -> None:
        """Uploads new or rewritten checkpoints; deletes on S3 those removed here."""
        present = {}
        for path in self.folder.glob(PATTERN):
            with contextlib.suppress(FileNotFoundError):  # fit may replace or remove it meanwhile
                with open(path, "rb") as handle:  # one open file: a rename mid-upload cannot mix two epochs
                    stat = os.fstat(handle.fileno())
                    present[path.name] = (stat.st_size, stat.st_mtime_ns)
                    if self.pushed.get(path.name) != present[path.name]:
                        self.s3.upload_fileobj(handle, self.bucket, self.prefix + path.name)
                        self.pushed[path.name] = present[path.name]
        for name in set(self.pushed) - set(present):
            self.s3.delete_object(Bucket=self.bucket, Key=self.prefix + name)
            del self.pushed[name]

    def attempt(self, operation: Callable[[], None]) -> bool:
        """Runs one S3 operation; an S3 error is logged, not raised (the training it protects goes on)."""
        try:
            operation()
        except self.errors as exc:
            log.warning(
                "checkpoints at s3://%s/%s: %s failed: %s", self.bucket, self.prefix, operation.__name__, exc
            )
            return False
        return True

    def run(self, stop: threading.Event, interval_s: float) -> None:
        """Pushes every `interval_s` until `stop` is set; a failed push is retried the next time."""
        while not stop.wait(interval_s):
            self.attempt(self.push)

    def sweep(self) -> None:
        """Deletes every checkpoint under the prefix: the stage finished, so all that is left is stale."""
        for key in self._remote():
            self.s3.delete_object(Bucket=self.bucket, Key=key)
