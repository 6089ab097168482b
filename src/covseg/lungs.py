"""Threshold-based lung segmentation of single axial CT slices (SimpleITK + numpy, no learning).

The lung mask bounds where the weakly-supervised lesion segmenter may predict, so it must keep lesions
inside. Lesions are the hard part: ground glass is grey and consolidation is as bright as soft tissue, so
a plain air threshold cuts them out. Per slice, at a working resolution of about ``WORK_SIZE`` pixels:

1. Air: below -320 HU, or below the per-image Otsu threshold for 8-bit grey of unknown window.
2. Body: the largest non-air component, holes filled. Cropped JPEGs may have no outside air beside a lung
   that touches the image edge, so an air component (not wrapping all four edges) that lies mostly inside
   the body's convex hull, or that encloses many vessel-sized holes (lung texture; outside air has none),
   joins the body.
3. Lung seeds: air components inside the body of at least ``MIN_LUNG_FRAC`` of its area, except, in HU,
   free gas (trachea, stomach, bowel: purer air than lung parenchyma).
4. Ground glass: the seeds take in every connected pixel darker than -200 HU, or, in 8-bit, darker than
   ``GROW_LEVEL`` of the way from the seed median to the tissue median.
5. Left/right: the lung pixels are split at the emptiest point (the mediastinum) of their long axis, with
   a 2-pixel seam between the sides; each side is closed with a disk of ``CLOSE_FRAC`` of the body's
   extent and hole-filled, so consolidations enclosed by aerated lung come in.
6. Chest wall: along rays from the body centroid, each side's outer lung radius is closed over the angle
   (``WALL_WIN_DEG``), which fills outward bays where a consolidation lies against the chest wall.

On medseg-100 (50 slices) this keeps 0.939 of all radiologist lesion pixels inside the lung mask, with the
lung mask 0.65 of the (tightly cropped) body on average; see ``medseg_coverage``. Known limit: lung with
no aerated pixel beside it along the wall (a dependent lobe wholly consolidated next to the spine) cannot
be told from mediastinum or chest wall by intensity and is missed (medseg_023, _054, _003, _030).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

DOMAINS = ("hu", "8bit")

HU_AIR_THRESHOLD = -320.0
"""Air/body threshold in Hounsfield units (lung parenchyma ~ -850, soft tissue ~ +40)."""
GAS_MEDIAN_HU = -900.0
"""HU only: an air component whose median is below this is free gas (trachea, bowel), not lung
(P001 lungs: medians -700..-870; trachea and bowel gas: -910..-965)."""
GAS_PURE_AIR_FRAC = 0.1
GAS_SMALL_FRAC = 0.02
"""HU only: a component under GAS_SMALL_FRAC of the body with at least GAS_PURE_AIR_FRAC of its pixels
below -950 HU is gas too (lung: <= 0.03; bowel loops seen: >= 0.13). Large components are spared so that
an emphysematous lung (many pixels below -950 HU) is not dropped."""
MIN_LUNG_FRAC = 0.005
"""Air components smaller than this fraction of the body area are never lung seeds."""
TEXTURE_MIN_HOLES = 3
TEXTURE_HOLES_PER_KPX = 0.4
"""An air component touching the image edge is lung (not outside air) if it encloses at least this many
vessel holes, and at least this many per 1000 of its pixels."""
HOLE_MIN_PX = 4

# Global constants below were chosen by looking at the *aggregate* lesion coverage and the mean lung/body
# area fraction over the 50 medseg-100 slices (development set, see medseg_coverage). Nothing is tuned
# per image and segment_lungs never sees a lesion mask.
GROW_LEVEL = 0.8
"""8-bit ground-glass level: seed median + GROW_LEVEL * (tissue median - seed median). Higher values
cover more lesion but reach fat in a lung window (fat sits at ~0.85 of the way there)."""
GROW_LEVEL_HU = -200.0
"""HU ground-glass level: ground glass is -750..-300 HU, fat -120..-80 HU (never grown into)."""
CLOSE_FRAC = 0.10
"""Closing radius per lung side, as a fraction of the body's larger extent."""
WALL_WIN_DEG = 45.0
"""Half-window (degrees) of the closing of each lung's outer radius over the ray angle: an outward bay
(consolidation against the wall) up to about twice this wide is filled."""
WALL_EXT_MAX_FRAC = 0.2
"""Longest outward extension of a ray, as a fraction of the body's extent."""
N_RAYS = 360
"""Ray angles sampled around the body centroid for the chest-wall step."""
HULL_ROWS = 64
"""Rows sampled for the body's convex hull (it only decides whether an air component is inside)."""
WORK_SIZE = 256
"""Slices are segmented at a working resolution of at most about this many pixels a side (speed)."""


def _filter(cls: type, **settings: object) -> sitk.ImageFilter:
    """A SimpleITK filter on one thread: the working images are small, and threads only cost here."""
    f = cls()
    f.SetNumberOfThreads(1)
    for key, value in settings.items():
        getattr(f, f"Set{key}")(value)
    return f


def _cc(mask: np.ndarray, full: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Label components (8-connected if full, else 4), largest first; returns (labels, sizes)."""
    arr = sitk.GetArrayFromImage(
        _filter(sitk.ConnectedComponentImageFilter, FullyConnected=full).Execute(
            sitk.GetImageFromArray(mask.astype(np.uint8))
        )
    )
    sizes = np.bincount(arr.ravel())
    order = np.argsort(-sizes[1:], kind="stable") + 1  # old labels, largest first
    relabel = np.zeros(sizes.size, dtype=np.int32)
    relabel[order] = np.arange(1, sizes.size)
    return relabel[arr], np.concatenate([sizes[:1], sizes[order]])


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill holes: 4-connected background components that do not touch the image border."""
    bg = sitk.GetArrayFromImage(
        _filter(sitk.ConnectedComponentImageFilter, FullyConnected=False).Execute(
            sitk.GetImageFromArray((~mask).astype(np.uint8))
        )
    )
    edge = np.unique(np.concatenate([bg[0], bg[-1], bg[:, 0], bg[:, -1]]))
    return ~np.isin(bg, edge[edge > 0])


def _dist_outside(mask: np.ndarray) -> np.ndarray:
    """Squared Euclidean distance (pixels) from every pixel to the mask (0 inside)."""
    f = _filter(
        sitk.SignedMaurerDistanceMapImageFilter,
        InsideIsPositive=False,
        SquaredDistance=True,
        UseImageSpacing=False,
    )
    return np.maximum(sitk.GetArrayFromImage(f.Execute(sitk.GetImageFromArray(mask.astype(np.uint8)))), 0)


def _close(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary closing with an exact Euclidean disk (via distance maps); padded so nothing is clipped."""
    if radius < 1 or not mask.any():
        return mask.copy()
    if radius >= 8:
        # a large disk only shapes the outline coarsely: close at half resolution (4x cheaper)
        h, w = mask.shape
        small = (
            np.pad(mask, ((0, h % 2), (0, w % 2))).reshape((h + 1) // 2, 2, (w + 1) // 2, 2).any(axis=(1, 3))
        )
        closed = _close(small, radius // 2)
        return _majority3(np.repeat(np.repeat(closed, 2, axis=0), 2, axis=1)[:h, :w]) | mask
    pad = radius + 1
    dilated = _dist_outside(np.pad(mask, pad)) <= radius * radius
    closed = _dist_outside(~dilated) > radius * radius
    return closed[pad:-pad, pad:-pad] | mask


def _close_fill(mask: np.ndarray, radius: int) -> np.ndarray:
    """Close with a disk, then fill holes. The frame is padded by replicating its edge, so that in a slice
    cropped through the lung, lesions cut by the image edge count as enclosed."""
    pad = radius + 2
    padded = np.pad(mask, pad, mode="edge")
    return _fill_holes(_close(padded, radius))[pad:-pad, pad:-pad]


def _majority3(mask: np.ndarray) -> np.ndarray:
    """3x3 majority vote (rounds the 2-pixel steps of an upsampled mask)."""
    p = np.pad(mask, 1, mode="edge").astype(np.uint8)
    h, w = mask.shape
    votes = sum(p[i : i + h, j : j + w] for i in range(3) for j in range(3))
    return votes >= 5


def _bbox(mask: np.ndarray, pad: int = 0) -> tuple[slice, slice]:
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    r0, r1 = max(rows[0] - pad, 0), min(rows[-1] + pad + 1, mask.shape[0])
    c0, c1 = max(cols[0] - pad, 0), min(cols[-1] + pad + 1, mask.shape[1])
    return slice(r0, r1), slice(c0, c1)


def _convex_hull(mask: np.ndarray) -> np.ndarray:
    """Filled convex hull of a 2-D mask (monotone chain over per-row extremes, row-span rasterisation)."""
    out = np.zeros(mask.shape, dtype=bool)
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return out
    step = max(1, rows.size // HULL_ROWS)  # a subset of rows (always the first and last) is plenty here
    rows = np.unique(np.concatenate([rows[::step], rows[-1:]]))
    sub = mask[rows]
    left = sub.argmax(axis=1).astype(float)
    right = (sub.shape[1] - 1 - sub[:, ::-1].argmax(axis=1)).astype(float)
    y = rows.astype(float)
    pts = np.concatenate([np.stack([left, y], 1), np.stack([right, y], 1)])
    pts = np.unique(pts, axis=0)
    hull = _monotone_chain(pts)
    if len(hull) < 3:
        return mask.copy()
    x0, y0 = hull[:, 0], hull[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    ys = np.arange(mask.shape[0], dtype=float)
    dy = y1 - y0
    with np.errstate(divide="ignore", invalid="ignore"):
        xs = x0[:, None] + (ys[None, :] - y0[:, None]) / dy[:, None] * (x1 - x0)[:, None]
    ok = (ys >= np.minimum(y0, y1)[:, None]) & (ys <= np.maximum(y0, y1)[:, None]) & (dy != 0)[:, None]
    xmin = np.where(ok, xs, np.inf).min(axis=0)
    xmax = np.where(ok, xs, -np.inf).max(axis=0)
    cols = np.arange(mask.shape[1], dtype=float)
    out = (cols[None, :] >= xmin[:, None] - 0.5) & (cols[None, :] <= xmax[:, None] + 0.5)
    return out | mask


def _monotone_chain(pts: np.ndarray) -> np.ndarray:
    """Convex hull vertices of unique, lexicographically sorted 2-D points (Andrew's monotone chain)."""

    def half(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
        h: list[tuple[float, float]] = []
        for x, y in points:
            while (
                len(h) >= 2
                and (h[-1][0] - h[-2][0]) * (y - h[-2][1]) - (h[-1][1] - h[-2][1]) * (x - h[-2][0]) <= 0
            ):
                h.pop()
            h.append((x, y))
        return h

    p = [(float(x), float(y)) for x, y in pts]
    return np.array(half(p)[:-1] + half(p[::-1])[:-1])


def _holes_per_component(labels: np.ndarray, n: int) -> np.ndarray:
    """Number of holes of at least HOLE_MIN_PX pixels enclosed by each labelled component (index = label)."""
    comps = labels > 0
    hole_labels, hole_sizes = _cc(_fill_holes(comps) & ~comps, full=False)
    counts = np.zeros(n, dtype=np.int64)
    big = np.flatnonzero(hole_sizes >= HOLE_MIN_PX)
    big = big[big > 0]
    if big.size:
        # the pixel above a hole's first (top-most) pixel belongs to the component that encloses it
        _, first = np.unique(hole_labels.ravel(), return_index=True)
        first = first[big]  # np.unique sorts labels 0..max, so index = label
        above = first - labels.shape[1]
        owner = labels.ravel()[above[above >= 0]]
        counts += np.bincount(owner, minlength=n)[:n]
    return counts


def _dark_mask(image: np.ndarray, domain: str) -> np.ndarray:
    """Air-like pixels: below -320 HU, or below the per-image Otsu threshold for 8-bit grey."""
    if domain == "hu":
        return image < HU_AIR_THRESHOLD
    img = _filter(sitk.MedianImageFilter, Radius=[1, 1]).Execute(
        sitk.GetImageFromArray(image.astype(np.float32))
    )
    otsu = _filter(sitk.OtsuThresholdImageFilter, InsideValue=1, OutsideValue=0, NumberOfHistogramBins=128)
    return sitk.GetArrayFromImage(otsu.Execute(img)) > 0


def _body(dark: np.ndarray) -> np.ndarray:
    """Body mask: largest non-air component, holes filled, plus air components that are lung open to the
    image edge (mostly inside the body's convex hull, or textured)."""
    labels, sizes = _cc(~dark)
    body = _fill_holes(labels == 1)
    out_labels, out_sizes = _cc(dark & ~body)
    if out_sizes.size == 1:
        return body
    # the outside air of a full field of view wraps the body and touches all four image edges
    edges = [np.unique(e) for e in (out_labels[0], out_labels[-1], out_labels[:, 0], out_labels[:, -1])]
    n_edges = np.bincount(np.concatenate(edges), minlength=out_sizes.size)
    cand = (out_sizes >= MIN_LUNG_FRAC * body.sum()) & (n_edges < 4)
    cand[0] = False
    if not cand.any():
        return body
    inside = np.bincount(out_labels[_convex_hull(body)], minlength=out_sizes.size)
    add = cand & (inside >= 0.5 * out_sizes)
    if (cand & ~add).any():
        holes = _holes_per_component(out_labels, out_sizes.size)
        add |= cand & (holes >= TEXTURE_MIN_HOLES) & (holes * 1000 >= TEXTURE_HOLES_PER_KPX * out_sizes)
    if not add.any():
        return body
    body = _fill_holes(body | add[out_labels])
    # bright islands in such a lung (vessels, consolidation) that touch the image edge are no holes either
    rest, rest_sizes = _cc(~body)
    inside = np.bincount(rest[_convex_hull(body)], minlength=rest_sizes.size)
    edges = [np.unique(e) for e in (rest[0], rest[-1], rest[:, 0], rest[:, -1])]
    n_edges = np.bincount(np.concatenate(edges), minlength=rest_sizes.size)
    island = (inside >= 0.5 * rest_sizes) & (n_edges < 4)
    island[0] = False
    return body | island[rest]


def _is_gas(values: np.ndarray, area_frac: float) -> bool:
    """HU only: free gas (trachea, stomach, bowel) is purer air than lung parenchyma."""
    if np.median(values) < GAS_MEDIAN_HU:
        return True
    return area_frac < GAS_SMALL_FRAC and float(np.mean(values < -950)) >= GAS_PURE_AIR_FRAC


def _grow(seed: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """Seed plus every component of allowed that touches the seed (reconstruction by dilation)."""
    labels, _ = _cc(allowed | seed)
    return np.isin(labels, np.unique(labels[seed]))


def _extend_to_wall(
    body: np.ndarray, lungs: list[np.ndarray], center: tuple[float, float], max_ext: float
) -> list[np.ndarray]:
    """Fill each lung's outward bays (consolidation against the chest wall) along rays from center.

    Per lung, the outer lung radius as a function of ray angle is closed (max then min filter over
    ``WALL_WIN_DEG``): dips narrower than the window rise to the level of the lung on both sides, the
    tapering ends of a lung stay as they are. Rays are only extended where they cross that lung.
    """
    h, w = body.shape
    cy, cx = center
    rs, cs = _bbox(body)
    corners = np.array([[rs.start, cs.start], [rs.start, cs.stop], [rs.stop, cs.start], [rs.stop, cs.stop]])
    rmax = int(np.hypot(corners[:, 0] - cy, corners[:, 1] - cx).max()) + 2
    theta = np.arange(N_RAYS) * (2 * np.pi / N_RAYS)
    r = np.arange(rmax)
    ys = np.rint(cy + r[None, :] * np.sin(theta)[:, None]).astype(np.int32)
    xs = np.rint(cx + r[None, :] * np.cos(theta)[:, None]).astype(np.int32)
    inb = (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)
    ys, xs = np.clip(ys, 0, h - 1), np.clip(xs, 0, w - 1)
    exit_r = (~inb | ~body[ys, xs]).argmax(axis=1)  # first sample outside the body or the image
    inside = inb & (r[None, :] < exit_r[:, None])
    k = int(round(WALL_WIN_DEG / 360 * N_RAYS))
    win = (np.arange(N_RAYS)[:, None] + np.arange(-k, k + 1)[None, :]) % N_RAYS
    yy, xx = np.mgrid[rs, cs]
    dy, dx = yy - cy, xx - cx
    ray = np.rint(np.arctan2(dy, dx) * (N_RAYS / (2 * np.pi))).astype(np.int32) % N_RAYS
    rad = np.hypot(dy, dx)
    out = []
    for lung in lungs:
        ext = lung.copy()
        on_lung = inside & lung[ys, xs]
        has = on_lung.any(axis=1)
        outer = rmax - 1 - on_lung[:, ::-1].argmax(axis=1)
        profile = np.where(has, outer, 0)
        closed = profile[win].max(axis=1)[win].min(axis=1)
        reach = np.minimum(np.minimum(closed, exit_r - 1), outer + max_ext)
        ok = has & (reach > outer)
        if ok.any():
            ext[rs, cs] |= ok[ray] & (rad >= outer[ray]) & (rad <= reach[ray])
        out.append(ext & body)
    return out


def _left_right(lung: np.ndarray, body: np.ndarray) -> np.ndarray:
    """Split the slice into the two lung sides; returns each pixel's signed distance to the cut.

    The left-right axis is the long principal axis of the lung pixels (two lungs side by side); the cut
    across it is at the emptiest lung column (the mediastinum) within the middle of the body.
    """
    ly, lx = np.nonzero(lung)
    my, mx = ly.mean(), lx.mean()
    _, evecs = np.linalg.eigh(np.cov(np.stack([ly - my, lx - mx])))
    ay, ax = evecs[:, 1]
    by, bx = np.nonzero(body)
    proj_body = (by - my) * ay + (bx - mx) * ax
    lo, hi = float(proj_body.min()), float(proj_body.max())
    proj = (ly - my) * ay + (lx - mx) * ax
    bins = np.arange(np.floor(lo), np.ceil(hi) + 2)
    hist = np.histogram(proj, bins=bins)[0].astype(float)
    hist = np.convolve(hist, np.ones(5) / 5, mode="same")
    centre = (bins[:-1] >= lo + 0.3 * (hi - lo)) & (bins[:-1] <= lo + 0.7 * (hi - lo))
    cut = bins[:-1][centre][hist[centre].argmin()] + 0.5 if centre.any() else 0.0
    yy, xx = np.mgrid[: body.shape[0], : body.shape[1]]
    return (yy - my) * ay + (xx - mx) * ax - cut


def segment_lungs(image: np.ndarray, domain: str) -> tuple[np.ndarray, np.ndarray]:
    """Threshold lung segmentation of ONE axial 2-D slice.

    Args:
        image: 2-D float/int array. ``'hu'``: Hounsfield units (COVID-CT-MD DICOM, ~-1024..3000).
            ``'8bit'``: 0..255 grey JPEG/PNG of unknown window (per-image Otsu; HU is never assumed).
        domain: ``'hu'`` or ``'8bit'``.

    Returns:
        (body_mask, lung_mask), both bool arrays of ``image``'s shape. On a slice without lungs the lung
        mask is empty (or tiny).
    """
    if domain not in DOMAINS:
        raise ValueError(f"domain must be one of {DOMAINS}, got {domain!r}")
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 2 or min(image.shape) < 8:
        raise ValueError(f"expected one 2-D slice, got shape {image.shape}")
    factor = max(1, int(np.ceil(max(image.shape) / WORK_SIZE)))
    body, lung = _segment(_block_mean(image, factor), domain)
    return _upsample(body, factor, image.shape), _upsample(lung, factor, image.shape)


def _block_mean(image: np.ndarray, factor: int) -> np.ndarray:
    """Downsample by an integer factor (block mean; the edge is padded by replication)."""
    if factor == 1:
        return image
    h, w = image.shape
    ph, pw = -h % factor, -w % factor
    padded = np.pad(image, ((0, ph), (0, pw)), mode="edge")
    return padded.reshape(padded.shape[0] // factor, factor, padded.shape[1] // factor, factor).mean(
        axis=(1, 3)
    )


def _upsample(mask: np.ndarray, factor: int, shape: tuple[int, ...]) -> np.ndarray:
    """Nearest-neighbour upsampling back to shape."""
    if factor == 1:
        return mask
    return np.repeat(np.repeat(mask, factor, axis=0), factor, axis=1)[: shape[0], : shape[1]]


def _segment(image: np.ndarray, domain: str) -> tuple[np.ndarray, np.ndarray]:
    """segment_lungs at the working resolution."""
    empty = np.zeros(image.shape, dtype=bool)
    dark = _dark_mask(image, domain)
    if dark.all() or not dark.any():
        return (~dark).copy(), empty
    body = _body(dark)
    body_area = int(body.sum())
    cand, sizes = _cc(dark & body)
    n_big = int((sizes[1:] >= MIN_LUNG_FRAC * body_area).sum())
    keep = [
        lab
        for lab in range(1, n_big + 1)
        if domain != "hu" or not _is_gas(image[cand == lab], sizes[lab] / body_area)
    ]
    if not keep:
        return body, empty
    seed = np.isin(cand, keep)

    rows, cols = np.nonzero(body)
    extent = int(max(np.ptp(rows), np.ptp(cols))) + 1
    tissue = body & ~seed
    if domain == "hu":
        level = GROW_LEVEL_HU
    elif tissue.any():
        lo, hi = float(np.median(image[seed])), float(np.median(image[tissue]))
        level = lo + GROW_LEVEL * (hi - lo)
    else:
        level = -np.inf
    grown = _grow(seed, body & (image < level))

    offset = _left_right(grown, body)
    radius = max(1, round(CLOSE_FRAC * extent))
    lungs, sides = [], []
    for side in (offset >= 1.0, offset <= -1.0):  # a 2-pixel seam keeps the two lungs apart
        half = grown & side
        if half.any():
            win = _bbox(half, pad=radius + 2)
            part = empty.copy()
            part[win] = _close_fill(half[win], radius)
            lungs.append(part & body)
            sides.append(side)
    lungs = _extend_to_wall(body, lungs, (rows.mean(), cols.mean()), WALL_EXT_MAX_FRAC * extent)
    lung = empty.copy()
    for part, side in zip(lungs, sides, strict=True):
        lung |= part & side
    return body, lung


SIDE_RIGHT, SIDE_LEFT = 1, 2
"""Values of `split_sides`: the patient's right lung lies on the image's left in the radiological view."""


def split_sides(lung: np.ndarray) -> np.ndarray:
    """Label each lung pixel of a slice in the radiological view (anterior up) by side: `SIDE_RIGHT` on
    the image's left half, `SIDE_LEFT` on its right, 0 outside the lungs.

    The cut is the emptiest lung column (the mediastinum, smoothed over 5 columns) in the middle 40 % of
    the lungs' width; two lungs that touch are still split there. A mask without lung gives all zeros.
    """
    lung = np.asarray(lung, dtype=bool)
    sides = np.zeros(lung.shape, dtype=np.uint8)
    columns = lung.sum(axis=0).astype(float)
    filled = np.nonzero(columns)[0]
    if filled.size == 0:
        return sides
    lo, hi = int(filled[0]), int(filled[-1]) + 1
    smooth = np.convolve(columns, np.ones(5) / 5, mode="same")
    middle = np.arange(
        lo + int(0.3 * (hi - lo)), max(lo + int(0.7 * (hi - lo)), lo + int(0.3 * (hi - lo)) + 1)
    )
    cut = int(middle[np.argmin(smooth[middle])])
    sides[:, :cut][lung[:, :cut]] = SIDE_RIGHT
    sides[:, cut:][lung[:, cut:]] = SIDE_LEFT
    return sides


def lesion_coverage(lung_mask: np.ndarray, lesion_mask: np.ndarray) -> float:
    """Fraction of lesion pixels inside the lung mask (1.0 if there is no lesion)."""
    lesion = np.asarray(lesion_mask, dtype=bool)
    n = int(lesion.sum())
    if n == 0:
        return 1.0
    return float((lesion & np.asarray(lung_mask, dtype=bool)).sum() / n)


def medseg_coverage(directory: str | Path) -> dict:
    """Lesion coverage of the lung masks over a medseg-style folder (images/*.jpg, masks/*.png).

    Evaluation only: the radiologist masks are read here to score the lung masks, never to make them.

    Returns:
        dict with ``coverage`` (lesion pixels inside the lung mask / all lesion pixels, pooled),
        ``mean_slice_coverage``, ``min_slice_coverage``, ``lung_body_fraction`` (mean lung/body area),
        ``n_slices``, ``lesion_pixels`` and ``per_slice`` {name: coverage}.
    """
    from PIL import Image

    directory = Path(directory)
    images = sorted((directory / "images").glob("*.jpg"))
    if not images:
        raise FileNotFoundError(f"no images/*.jpg under {directory}")
    total = inside = 0
    fractions: list[float] = []
    per_slice: dict[str, float] = {}
    for path in images:
        image = np.asarray(Image.open(path).convert("L"))
        lesion = np.asarray(Image.open(directory / "masks" / f"{path.stem}.png").convert("L")) > 127
        body, lung = segment_lungs(image, "8bit")
        total += int(lesion.sum())
        inside += int((lesion & lung).sum())
        fractions.append(float(lung.sum() / max(int(body.sum()), 1)))
        per_slice[path.stem] = lesion_coverage(lung, lesion)
    return {
        "coverage": inside / total if total else 1.0,
        "mean_slice_coverage": float(np.mean(list(per_slice.values()))),
        "min_slice_coverage": float(min(per_slice.values())),
        "lung_body_fraction": float(np.mean(fractions)),
        "n_slices": len(images),
        "lesion_pixels": total,
        "per_slice": per_slice,
    }
