"""The built-in synthetic data set: dermoscopy-like images with exact structure masks.

Each image is skin (tone, low-frequency blotches, pores noise, a few hairs) with one brownish
lesion with an irregular border, and a dark circular dermoscope field-of-view vignette on some
images. The five structures are drawn with their real look, and each mask covers the region
where its texture is drawn (as ISIC masks are regions, not line pixels):

- pigment network (~80% of images): a reticular grid of dark-brown lines over a sector of the
  lesion; mask = that sector.
- negative network (~10%): the inverse, light serpiginous lines on a darker background, with
  larger cells; mask = its sector.
- streaks (~10%): dark radial lines crossing the lesion border in one angular sector; mask =
  the peripheral band they cover.
- globules (~40%): a cluster of dark round dots; mask = the dots, slightly dilated.
- milia-like cysts (~25%): small bright white-yellow round spots; mask = the spots, dilated.

Structures sit in separate angular sectors of the lesion, so overlaps are small (cysts may lie
on a network). Everything is deterministic given the seed: image i of a split uses
`numpy.random.default_rng([seed, split_index, i])`, so one split does not change when another
split's size changes. `write_dataset` writes the ISIC 2018 layout read by
`sources.list_isic2018` (with Task 1 lesion masks).
"""

import dataclasses
import math
import os
from pathlib import Path

import cv2
import numpy as np

from dermseg_jax import labels
from dermseg_jax.data import sources

# Probability that an image holds each structure, in labels.STRUCTURE_NAMES order.
STRUCTURE_PROBS = (0.25, 0.1, 0.8, 0.1, 0.4)
DEFAULT_IMAGE_SIZE = (288, 384)
VIGNETTE_PROB = 0.35
_ID_BASE = 9_000_000
_SPLIT_DIRS = {"train": "Training", "validation": "Validation", "test": "Test"}
_CYST, _NEG_NET, _PIG_NET, _STREAKS, _GLOBULES = range(labels.NUM_STRUCTURES)


@dataclasses.dataclass(frozen=True, eq=False)
class SyntheticImage:
    """One generated example: image uint8 [H, W, 3] RGB, structures uint8 [H, W, 5] in {0, 1},
    lesion uint8 [H, W] in {0, 1}."""

    image: np.ndarray
    structures: np.ndarray
    lesion: np.ndarray


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cell: float) -> np.ndarray:
    """Smooth noise in about [-1, 1] with features of `cell` pixels, float32 [H, W]."""
    gh, gw = max(2, int(height / cell) + 2), max(2, int(width / cell) + 2)
    grid = rng.standard_normal((gh, gw)).astype(np.float32)
    return cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC) * 0.6


def _grid_lines(u: np.ndarray, v: np.ndarray, period: float, width: float) -> np.ndarray:
    """Anti-aliased lines of a warped square grid (u, v in cell units), float32 [H, W] in [0, 1]."""
    du = np.abs(u - np.round(u)) * period
    dv = np.abs(v - np.round(v)) * period
    d = np.minimum(du, dv)
    return np.clip(1.0 - (d - width / 2), 0.0, 1.0)


def _angle_diff(a: np.ndarray, b: float) -> np.ndarray:
    return np.abs((a - b + np.pi) % (2 * np.pi) - np.pi)


def _blend(image: np.ndarray, color, alpha: np.ndarray) -> None:
    image += (np.asarray(color, np.float32) - image) * alpha[..., None]


class _Lesion:
    """The lesion's polar frame: normalised radius rho (1 on the border) and angle theta."""

    def __init__(self, rng: np.random.Generator, height: int, width: int):
        short = min(height, width)
        self.cy = height / 2 + rng.uniform(-0.06, 0.06) * height
        self.cx = width / 2 + rng.uniform(-0.06, 0.06) * width
        r0 = short * rng.uniform(0.27, 0.36)
        aspect = rng.uniform(0.8, 1.25)
        ks = np.arange(2, 7)
        self.amps = rng.uniform(0.0, 0.12, ks.size) / np.sqrt(ks - 1)
        self.phases = rng.uniform(0, 2 * np.pi, ks.size)
        self.ks = ks
        ax, ay = r0 * math.sqrt(aspect), r0 / math.sqrt(aspect)
        # Keep the lesion plus its streak band (rho <= 1.15) inside the frame.
        reach = (1 + self.amps.sum()) * 1.15
        room_x = min(self.cx, width - self.cx) - 2
        room_y = min(self.cy, height - self.cy) - 2
        shrink = min(1.0, room_x / (ax * reach), room_y / (ay * reach))
        self.ax, self.ay = ax * shrink, ay * shrink
        self.scale = short / 288.0
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        dx, dy = (xx - self.cx) / self.ax, (yy - self.cy) / self.ay
        self.theta = np.arctan2(dy, dx)
        # The border radius from a fine angle table: exact enough, and 20x cheaper than cosines
        # over the whole frame.
        table = self.radius(np.linspace(-np.pi, np.pi, 4097))
        index = np.round((self.theta + np.pi) * (4096 / (2 * np.pi))).astype(np.int32)
        self.rho = np.sqrt(dx * dx + dy * dy) / table[index]
        self.xx, self.yy = xx, yy

    def radius(self, theta):
        wobble = self.amps * np.cos(self.ks * np.asarray(theta)[..., None] + self.phases)
        return (1.0 + wobble.sum(-1)).astype(np.float32)

    def point(self, theta: float, rho: float) -> tuple[float, float]:
        r = rho * float(self.radius(theta))
        return self.cx + self.ax * r * math.cos(theta), self.cy + self.ay * r * math.sin(theta)


def _sectors(rng: np.random.Generator, widths: dict[int, float]) -> dict[int, tuple[float, float]]:
    """Places angular sectors (centre, width) side by side around the lesion, without overlap."""
    total = sum(widths.values()) + 0.15 * len(widths)
    fit = min(1.0, (2 * np.pi - 0.3) / total) if widths else 1.0
    start, placed = rng.uniform(-np.pi, np.pi), {}
    for k in rng.permutation(list(widths)) if widths else []:
        w = widths[int(k)] * fit
        placed[int(k)] = (start + w / 2, w)
        start += w + 0.15
    return placed


def _draw_network(image, region, les, rng, *, negative: bool) -> None:
    s = max(les.scale, 0.6)  # finer cells than ~5 px alias into noise on small images
    period = (rng.uniform(12, 15) if negative else rng.uniform(7.5, 10)) * s
    width = max(1.2, (rng.uniform(2.4, 3.2) if negative else rng.uniform(1.8, 2.4)) * s)
    angle = rng.uniform(0, np.pi)
    h, w = region.shape
    warp = 0.55 if negative else 0.4
    u = (les.xx * math.cos(angle) + les.yy * math.sin(angle)) / period
    v = (-les.xx * math.sin(angle) + les.yy * math.cos(angle)) / period
    u = u + warp * _smooth_noise(rng, h, w, 3 * period)
    v = v + warp * _smooth_noise(rng, h, w, 3 * period)
    lines = _grid_lines(u, v, period, width)
    # A soft inner edge keeps the texture from looking pasted on; the mask stays the region.
    soft = cv2.GaussianBlur(region.astype(np.float32), (0, 0), 1.5) * region
    if negative:
        _blend(image, rng.uniform([70, 42, 30], [100, 62, 45]), 0.85 * soft)
        _blend(image, rng.uniform([200, 165, 140], [225, 190, 165]), 0.9 * lines * soft)
    else:
        _blend(image, image * 1.1, 0.5 * soft)  # lighter holes between the lines
        _blend(image, rng.uniform([45, 25, 15], [75, 45, 30]), 0.9 * lines * soft)


def _draw_streaks(image, mask, les, rng, centre: float, width: float) -> None:
    s = les.scale
    spacing = rng.uniform(6, 9) * s
    r_mean = 0.5 * (les.ax + les.ay)
    n = max(3, int(width * r_mean / spacing))
    thickness = max(1, round(2 * s))
    color = tuple(float(c) for c in rng.uniform([40, 22, 15], [70, 42, 30]))
    for t in np.linspace(centre - width / 2, centre + width / 2, n):
        t = t + rng.uniform(-0.02, 0.02)
        p0 = les.point(t, rng.uniform(0.7, 0.78))
        p1 = les.point(t + rng.uniform(-0.03, 0.03), rng.uniform(1.04, 1.12))
        pts = [tuple(int(round(c * 16)) for c in p) for p in (p0, p1)]
        cv2.line(image, pts[0], pts[1], color, thickness, cv2.LINE_AA, shift=4)
    in_band = (les.rho >= 0.68) & (les.rho <= 1.14)
    mask[in_band & (_angle_diff(les.theta, centre) <= width / 2 + 0.04)] = 1


def _draw_dots(image, mask, les, rng, centres, radius_range, color, halo: bool) -> None:
    s = les.scale
    for cx, cy in centres:
        # Below ~2 px a dot is a speck that the first convolutions blur away.
        r = max(2.0 if not halo else 1.5, rng.uniform(*radius_range) * s)
        c = (int(round(cx * 16)), int(round(cy * 16)))
        if halo:
            cv2.circle(
                image,
                c,
                int(round((r + 1.5) * 16)),
                tuple(float(v) for v in np.asarray(color) * 0.85),
                -1,
                cv2.LINE_AA,
                shift=4,
            )
        cv2.circle(
            image, c, int(round(r * 16)), tuple(float(v) for v in color), -1, cv2.LINE_AA, shift=4
        )
        cv2.circle(mask, c, int(round((r + 1.5) * 16)), 1, -1, cv2.LINE_8, shift=4)


def _dot_centres(rng, les, n, theta_range, rho_range):
    thetas = rng.uniform(*theta_range, n)
    rhos = np.sqrt(rng.uniform(rho_range[0] ** 2, rho_range[1] ** 2, n))
    return [les.point(t, r) for t, r in zip(thetas, rhos, strict=True)]


def _draw_hairs(image: np.ndarray, rng: np.random.Generator) -> None:
    h, w = image.shape[:2]
    for _ in range(min(5, rng.poisson(1.5))):
        p = rng.uniform([0, 0], [w, h], (3, 2))
        axis = int(rng.integers(2))
        p[0, axis] = 0 if rng.random() < 0.5 else (w, h)[axis]  # start on an image edge
        t = np.linspace(0, 1, 40)[:, None]
        curve = (1 - t) ** 2 * p[0] + 2 * (1 - t) * t * p[1] + t**2 * p[2]
        color = tuple(float(c) for c in rng.uniform([20, 15, 10], [60, 45, 35]))
        cv2.polylines(
            image,
            [np.round(curve * 16).astype(np.int32)],
            False,
            color,
            int(rng.integers(1, 3)),
            cv2.LINE_AA,
            shift=4,
        )


def generate_image(rng: np.random.Generator, height: int, width: int) -> SyntheticImage:
    """Draws one synthetic dermoscopy image with its masks.

    Args:
        rng: the image's random generator (all randomness comes from it).
        height, width: image size in pixels (at least 32).

    Returns:
        A `SyntheticImage` with image [H, W, 3], structures [H, W, 5], lesion [H, W].
    """
    if min(height, width) < 32:
        raise ValueError(f"synthetic images need at least 32x32 pixels, got {height}x{width}")
    present = rng.random(labels.NUM_STRUCTURES) < np.asarray(STRUCTURE_PROBS)
    les = _Lesion(rng, height, width)
    short = min(height, width)

    skin = rng.uniform([200, 145, 120], [240, 195, 170]).astype(np.float32)
    image = np.empty((height, width, 3), np.float32)
    image[:] = skin
    image += _smooth_noise(rng, height, width, short / 4)[..., None] * [10, 9, 9]
    image += rng.normal(0, 3.0, (height, width, 1)).astype(np.float32)

    lesion = (les.rho < 1.0).astype(np.uint8)
    inner = rng.uniform([90, 55, 30], [130, 85, 50]).astype(np.float32)
    outer = rng.uniform([160, 110, 75], [190, 135, 95]).astype(np.float32)
    depth = np.clip(1.0 - les.rho, 0, 1) ** 0.7 + 0.15 * _smooth_noise(rng, height, width, 20)
    tone = outer + (inner - outer) * np.clip(depth, 0, 1)[..., None]
    alpha = np.clip((1.0 - les.rho) / 0.08, 0, 1)
    image += (tone.astype(np.float32) - image) * alpha[..., None]

    structures = np.zeros((height, width, labels.NUM_STRUCTURES), np.uint8)
    widths = {}
    if present[_PIG_NET]:
        widths[_PIG_NET] = rng.uniform(2.2, 3.4)
    if present[_NEG_NET]:
        widths[_NEG_NET] = rng.uniform(1.5, 2.3)
    if present[_GLOBULES]:
        widths[_GLOBULES] = rng.uniform(1.2, 1.9)
    sectors = _sectors(rng, widths)
    if present[_STREAKS]:
        streak_mask = np.zeros((height, width), np.uint8)
        centre, width_ = rng.uniform(-np.pi, np.pi), rng.uniform(0.9, 1.6)
        _draw_streaks(image, streak_mask, les, rng, centre, width_)
        structures[..., _STREAKS] = streak_mask
        lesion |= streak_mask
    for k, negative in ((_PIG_NET, False), (_NEG_NET, True)):
        if k in sectors:
            centre, width_ = sectors[k]
            inner_rho = rng.uniform(0.12, 0.3)
            region = (
                (_angle_diff(les.theta, centre) <= width_ / 2)
                & (les.rho >= inner_rho)
                & (les.rho <= 0.88)
                & (structures[..., _STREAKS] == 0)
            )
            _draw_network(image, region, les, rng, negative=negative)
            structures[..., k] = region
    if present[_GLOBULES]:
        centre, width_ = sectors[_GLOBULES]
        n = int(rng.integers(10, 24))
        dots = _dot_centres(rng, les, n, (centre - width_ / 2, centre + width_ / 2), (0.2, 0.6))
        color = rng.uniform([35, 20, 15], [65, 40, 28])
        globules = np.zeros((height, width), np.uint8)
        _draw_dots(image, globules, les, rng, dots, (3.0, 4.5), color, False)
        structures[..., _GLOBULES] = globules
    if present[_CYST]:
        n = int(rng.integers(3, 9))
        dots = _dot_centres(rng, les, n, (-np.pi, np.pi), (0.1, 0.8))
        color = rng.uniform([230, 225, 185], [250, 245, 220])
        # Cysts are drawn last and cover what is under them, so other masks give those up.
        cysts = np.zeros((height, width), np.uint8)
        _draw_dots(image, cysts, les, rng, dots, (2.2, 3.4), color, True)
        structures[cysts > 0] = 0
        structures[..., _CYST] = cysts

    # Dots on the border may reach past it; the lesion includes every structure.
    lesion |= structures.any(-1).astype(np.uint8)
    _draw_hairs(image, rng)
    if rng.random() < VIGNETTE_PROB:
        radius = 0.5 * math.hypot(height, width) * rng.uniform(0.8, 0.95)
        dist = np.hypot(les.xx - width / 2, les.yy - height / 2)
        fade = np.clip((dist - radius) / 6.0 + 0.5, 0, 1)
        image *= 1.0 - 0.93 * fade[..., None]
    image = cv2.GaussianBlur(image, (0, 0), 0.6)
    image = np.clip(np.round(image), 0, 255).astype(np.uint8)
    return SyntheticImage(image, structures, lesion)


def image_id(split: str, index: int) -> str:
    """The ID of image `index` of `split`: `ISIC_9<split digit><5 digits>`."""
    if not 0 <= index < 100_000:
        raise ValueError(f"synthetic splits hold at most 100000 images, got index {index}")
    return f"ISIC_{_ID_BASE + 100_000 * sources.SPLITS.index(split) + index:07d}"


def _write_png(path: Path, mask: np.ndarray) -> None:
    ok, buf = cv2.imencode(".png", mask * np.uint8(255))
    if not ok:
        raise OSError(f"{path}: PNG encoding failed")
    path.write_bytes(buf.tobytes())


def _write_one(out: Path, split: str, index: int, seed: int, size, vary_size: bool) -> None:
    rng = np.random.default_rng([seed, sources.SPLITS.index(split), index])
    height, width = size
    if vary_size:
        height = max(32, round(height * rng.uniform(0.9, 1.1)))
        width = max(32, round(width * rng.uniform(0.9, 1.1)))
    example = generate_image(rng, height, width)
    name, iid = _SPLIT_DIRS[split], image_id(split, index)
    bgr = cv2.cvtColor(example.image, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(
        ".jpg",
        bgr,
        [
            cv2.IMWRITE_JPEG_QUALITY,
            95,
            cv2.IMWRITE_JPEG_SAMPLING_FACTOR,
            cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444,
        ],
    )
    if not ok:
        raise OSError(f"JPEG encoding failed for {iid}")
    (out / f"ISIC2018_Task1-2_{name}_Input" / f"{iid}.jpg").write_bytes(buf.tobytes())
    for k, structure in enumerate(labels.STRUCTURE_NAMES):
        path = out / f"ISIC2018_Task2_{name}_GroundTruth" / f"{iid}_attribute_{structure}.png"
        _write_png(path, example.structures[..., k])
    _write_png(
        out / f"ISIC2018_Task1_{name}_GroundTruth" / f"{iid}_segmentation.png", example.lesion
    )


def write_dataset(
    out: str | os.PathLike,
    *,
    n_train: int,
    n_val: int,
    n_test: int,
    seed: int = 0,
    image_size: int | tuple[int, int] = DEFAULT_IMAGE_SIZE,
    vary_size: bool = True,
    num_workers: int = 2,
) -> dict[str, int]:
    """Writes the synthetic set in the ISIC 2018 Task 1-2 layout under `out`.

    Args:
        out: destination folder (created; existing files are overwritten).
        n_train, n_val, n_test: images per split (a split with 0 images is not written).
        seed: the data set's seed; the same arguments give byte-identical files.
        image_size: (height, width), or one int for square images.
        vary_size: vary each side by up to +-10% per image, as real photos vary.
        num_workers: drawing threads.

    Returns:
        Images written per split, e.g. {'train': 200, 'validation': 50, 'test': 50}.
    """
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(size) != 2 or min(size) < 32:
        raise ValueError(f"image_size must be (height, width) >= 32, got {image_size!r}")
    out = Path(out)
    counts = {"train": n_train, "validation": n_val, "test": n_test}
    for split, n in counts.items():
        if n < 0:
            raise ValueError(f"negative number of {split} images: {n}")
        if n == 0:
            continue
        name = _SPLIT_DIRS[split]
        for folder in (
            f"ISIC2018_Task1-2_{name}_Input",
            f"ISIC2018_Task2_{name}_GroundTruth",
            f"ISIC2018_Task1_{name}_GroundTruth",
        ):
            (out / folder).mkdir(parents=True, exist_ok=True)
        # A non-image file, as in the real release, which readers must ignore.
        (out / f"ISIC2018_Task1-2_{name}_Input" / "LICENSE.txt").write_text(
            "Synthetic images generated by dermseg_jax.data.synthetic (public domain).\n"
        )
        jobs = range(n)
        write = lambda i, s=split: _write_one(out, s, i, seed, size, vary_size)  # noqa: E731
        for result in sources.parallel_map(write, jobs, num_workers):
            if isinstance(result, Exception):
                raise result
    return {split: n for split, n in counts.items() if n > 0}
