"""Out-of-core slices: the lungs stage's arrays as WebDataset-style tar shards, streamed from a local folder
or from S3 (the DVC remote), each rank reading its own shards.

Format: plain POSIX tars (`shard-000000.tar`, ...), each holding whole samples; a sample is the members
`<key>.image.npy` (S x S, the lungs stage's dtype: float16), `<key>.lung.npy` (bool), `<key>.side.npy` (uint8) and `<key>.json` (its
index row), written consecutively. `shards.json` lists the shards with the rows each holds, and
`index.parquet` is the index of every row (one small row per slice: the balanced sampler needs the labels
and sources, never the pixels).

Why tar shards rather than zarr chunks or one big array:

* **sequential reads**: a shard is read front to back in one request (`tarfile` stream mode), the access
  pattern object stores and spinning disks serve at full bandwidth; no per-slice seeks or HTTP requests
  (a zarr chunk per slice would be one GET per slice; a chunk of many slices needs random access);
* **S3 friendly**: shards are immutable objects of tens to hundreds of MB, a GET streams them
  (`get_object` body read incrementally), a partial shard is never visible, and DVC versions them as files;
* **rank-wise assignment**: rank r of W takes shards r, r+W, ... (`rank_shards`): no coordination, no
  overlap, and the assignment only needs the shard list;
* no new dependency (Python's `tarfile` + `.npy`), and the files open with `tar` and NumPy, or with the
  `webdataset` library, which reads this layout.

Memory stays flat as the data grows: a reader holds one sample being decoded plus a bounded shuffle buffer
(`balanced_batches`), whatever the number of shards.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import pandas as pd

SHARD_NAME = "shard-{:06d}.tar"
MANIFEST = "shards.json"
INDEX = "index.parquet"
ARRAYS = ("image", "lung", "side")


@dataclass
class Sample:
    """One slice read from a shard."""

    row: int
    image: np.ndarray
    lung: np.ndarray
    side: np.ndarray
    meta: dict[str, Any]


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(payload), 0, 0o644  # mtime 0: same bytes for same data
    tar.addfile(info, io.BytesIO(payload))


class ShardWriter:
    """Write samples into shards of `slices_per_shard` samples each under `out_dir`; `close` writes the
    manifest and the index. Samples are added one at a time, so a producer never holds the whole set."""

    def __init__(self, out_dir: str | Path, slices_per_shard: int = 256) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.slices_per_shard = slices_per_shard
        self.shards: list[dict[str, Any]] = []
        self.index_rows: list[dict[str, Any]] = []
        self._tar: tarfile.TarFile | None = None

    def add(
        self, row: int, image: np.ndarray, lung: np.ndarray, side: np.ndarray, meta: dict[str, Any]
    ) -> None:
        if self._tar is None or len(self.shards[-1]["rows"]) >= self.slices_per_shard:
            self._roll()
        key = f"{row:09d}"
        for name, array in zip(ARRAYS, (image, lung.astype(bool), side.astype(np.uint8)), strict=True):
            _add(self._tar, f"{key}.{name}.npy", _npy(array))
        record = {**meta, "row": int(row)}
        _add(self._tar, f"{key}.json", json.dumps(record, default=_json_default).encode())
        self.shards[-1]["rows"].append(int(row))
        self.index_rows.append(record)

    def _roll(self) -> None:
        if self._tar is not None:
            self._tar.close()
        name = SHARD_NAME.format(len(self.shards))
        self._tar = tarfile.open(self.out_dir / name, "w", format=tarfile.USTAR_FORMAT)
        self.shards.append({"name": name, "rows": []})

    def close(self) -> dict[str, Any]:
        if self._tar is not None:
            self._tar.close()
            self._tar = None
        manifest = {"format": "covseg-shards/1", "n": len(self.index_rows), "shards": self.shards}
        (self.out_dir / MANIFEST).write_text(json.dumps(manifest))
        pd.DataFrame(self.index_rows).to_parquet(self.out_dir / INDEX, index=False)
        return manifest

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_shards(
    lungs_dir: str | Path, out_dir: str | Path, slices_per_shard: int = 256, replicate: int = 1
) -> dict[str, Any]:
    """Shard a lungs-stage output (`slices.npz`, `index.parquet`). `replicate` > 1 writes that many copies of
    every slice (row numbers continue: copy c of row r is c * N + r, `replica_of` = r): for scale benchmarks
    only, labelled as replication wherever reported. Reads one member array of `slices.npz` at a time."""
    from covseg.harmonise import INDEX as LUNGS_INDEX
    from covseg.harmonise import SLICES

    lungs_dir = Path(lungs_dir)
    index = pd.read_parquet(lungs_dir / LUNGS_INDEX)
    arrays = np.load(lungs_dir / SLICES)
    images, lungs = arrays["image"], arrays["lung"]
    sides = arrays["side"] if "side" in arrays.files else lungs.astype(np.uint8)
    records = index.to_dict("records")
    n = len(images)
    with ShardWriter(out_dir, slices_per_shard) as writer:
        for copy in range(replicate):
            for record in records:
                row = int(record["row"])
                meta = {**record, "replica_of": row} if replicate > 1 else dict(record)
                writer.add(copy * n + row, images[row], lungs[row], sides[row], meta)
    return json.loads((Path(out_dir) / MANIFEST).read_text())


# ---------------------------------------------------------------------------------------------------
# sources: a local folder or s3://bucket/prefix


class ShardSource:
    """Where shards live: `read_bytes` for the small files, `open` for a shard's byte stream."""

    def read_bytes(self, name: str) -> bytes:
        raise NotImplementedError

    def open(self, name: str) -> IO[bytes]:
        raise NotImplementedError

    def manifest(self) -> dict[str, Any]:
        return json.loads(self.read_bytes(MANIFEST))

    def index(self, columns: Sequence[str] | None = None) -> pd.DataFrame:
        """The index of every row; `columns` limits it to what the sampler needs (a full index row is ~1.5 kB
        in memory: file paths, hashes; four columns are a few dozen bytes)."""
        return pd.read_parquet(io.BytesIO(self.read_bytes(INDEX)), columns=list(columns) if columns else None)


class LocalSource(ShardSource):
    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    def read_bytes(self, name: str) -> bytes:
        return (self.folder / name).read_bytes()

    def open(self, name: str) -> IO[bytes]:
        return open(self.folder / name, "rb", buffering=1 << 20)


class S3Source(ShardSource):
    """Shards under s3://bucket/prefix; a shard is one streamed GET (read as it is decoded)."""

    def __init__(self, bucket: str, prefix: str, client: Any = None) -> None:
        import boto3

        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.client = client or boto3.client("s3")

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def read_bytes(self, name: str) -> bytes:
        return self.client.get_object(Bucket=self.bucket, Key=self.key(name))["Body"].read()

    def open(self, name: str) -> IO[bytes]:
        return self.client.get_object(Bucket=self.bucket, Key=self.key(name))["Body"]


def open_source(url: str | Path, s3_client: Any = None) -> ShardSource:
    """`s3://bucket/prefix` (boto3; endpoint from the client or $AWS_ENDPOINT_URL) or a local folder."""
    text = str(url)
    if text.startswith("s3://"):
        bucket, _, prefix = text[5:].partition("/")
        return S3Source(bucket, prefix, s3_client)
    return LocalSource(text)


def upload_shards(folder: str | Path, url: str, s3_client: Any) -> list[str]:
    """Upload a shard folder to `s3://bucket/prefix` (multipart for large shards); returns the keys."""
    source = open_source(url, s3_client)
    assert isinstance(source, S3Source)
    keys = []
    for path in sorted(Path(folder).iterdir()):
        if path.is_file():
            s3_client.upload_file(str(path), source.bucket, source.key(path.name))
            keys.append(source.key(path.name))
    return keys


# ---------------------------------------------------------------------------------------------------
# reading


def rank_shards(manifest: dict[str, Any], rank: int, world: int) -> list[dict[str, Any]]:
    """Shards of rank `rank` of `world`: every world-th shard from the rank's own (disjoint, covering)."""
    return manifest["shards"][rank::world]


def iter_samples(
    source: ShardSource, shards: Sequence[dict[str, Any]], wanted: set[int] | None = None
) -> Iterator[Sample]:
    """Stream the samples of `shards` in order (each shard one sequential read). With `wanted`, only those
    rows are decoded (the others' members are skipped unread)."""
    for shard in shards:
        with source.open(shard["name"]) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
            parts: dict[str, Any] = {}
            key = None
            for member in tar:
                stem, _, kind = member.name.partition(".")
                if stem != key:
                    if parts:
                        yield _sample(parts)
                    key, parts = stem, {}
                if wanted is not None and int(stem) not in wanted:
                    continue
                handle = tar.extractfile(member)
                payload = handle.read() if handle is not None else b""
                parts[kind] = json.loads(payload) if kind == "json" else np.load(io.BytesIO(payload))
            if parts:
                yield _sample(parts)


def _sample(parts: dict[str, Any]) -> Sample:
    missing = [k for k in (*[f"{a}.npy" for a in ARRAYS], "json") if k not in parts]
    if missing:
        raise ValueError(f"incomplete sample {parts.get('json', {}).get('row')}: missing {missing}")
    meta = parts["json"]
    return Sample(int(meta["row"]), parts["image.npy"], parts["lung.npy"], parts["side.npy"], meta)


def draw_counts(weights: np.ndarray, n_draws: int, rng: np.random.Generator) -> np.ndarray:
    """How often each row is drawn in an epoch: the multinomial counts of `training.batches`' weighted
    draws with replacement (the same draw on every rank: same seed)."""
    chosen = rng.choice(len(weights), size=n_draws, replace=True, p=weights / weights.sum())
    return np.bincount(chosen, minlength=len(weights))


def balanced_batches(
    source: ShardSource,
    manifest: dict[str, Any],
    counts: np.ndarray,
    batch_size: int,
    rng: np.random.Generator,
    rank: int = 0,
    world: int = 1,
    buffer_size: int = 512,
) -> Iterator[list[Sample]]:
    """Batches of this rank's share of one epoch's draws, streamed from its own shards.

    `counts` (indexed by position in the manifest's row order, `draw_counts`) says how often each row is
    drawn; each drawn sample enters a shuffle buffer that many times and batches leave it in random order
    (WebDataset's buffer shuffle). Every rank yields the same number of batches (the smallest rank's), so
    the gradient all-reduce stays in step; the few draws beyond that are dropped. Memory: at most
    `buffer_size + batch_size` samples, whatever the size of the data.

    `rng` shuffles this rank's buffer: give each rank its own, and never the generator that drew `counts`
    (that one must stay the same on every rank for the next epoch's draw)."""
    position = {row: i for i, row in enumerate(r for s in manifest["shards"] for r in s["rows"])}
    per_rank = [
        sum(int(counts[position[r]]) for s in rank_shards(manifest, k, world) for r in s["rows"])
        for k in range(world)
    ]
    steps = min(per_rank) // batch_size
    mine = rank_shards(manifest, rank, world)
    wanted = {r for s in mine for r in s["rows"] if counts[position[r]] > 0}
    buffer: list[Sample] = []
    made = 0

    def take() -> list[Sample]:
        out = []
        for _ in range(batch_size):
            out.append(buffer.pop(int(rng.integers(len(buffer)))))
        return out

    for sample in iter_samples(source, mine, wanted):
        buffer.extend([sample] * int(counts[position[sample.row]]))
        while len(buffer) >= buffer_size + batch_size and made < steps:
            yield take()
            made += 1
        if made >= steps:
            return
    while len(buffer) >= batch_size and made < steps:
        yield take()
        made += 1


def stack(
    batch: Sequence[Sample], fill: float = 0.0, tissue_ceiling: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(B,1,S,S) float32 model inputs (lung-masked as `SliceSet.tensor`) and (B,) labels of a batch."""
    images = np.stack([s.image for s in batch]).astype(np.float32)
    lungs = np.stack([s.lung for s in batch])
    if tissue_ceiling is not None:
        images = np.where(lungs & (images < tissue_ceiling), images, fill).astype(np.float32)
    labels = np.array([float(s.meta.get("label", 0)) for s in batch], dtype=np.float32)
    return images[:, None], labels
