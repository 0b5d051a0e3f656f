"""The built-in dataset: ten shape classes of 32x32 RGB images, drawn procedurally from a seed in seconds.

It needs no download, so demos and tests run offline; and it is hard enough that a ResNet-8 clearly trails
a ResNet-56 after the same short training (SPEC, "Datasets beyond CIFAR").
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

from . import arrays
from .base import HostData

IMAGE_SIZE = 32
SYNTHETIC_SIZE = (10_000, 2_000)  # train, test
SYNTHETIC_CLASSES = 10
# `synthetic-mini`: the first images of the same streams, averaged 2x2 down to 16x16: about 20x less arithmetic an
# epoch, for `make demo` on a slow CPU.
MINI_SIZE, MINI_IMAGE_SIZE = (2_000, 1_000), 16

# Ten shapes over object coordinates (u, v), radius r and box "radius" b; each fills roughly [-1, 1]^2.
_SHAPES = (
    lambda u, v, r, b: r < 1.0,  # disk
    lambda u, v, r, b: b < 0.8,  # square
    lambda u, v, r, b: np.abs(u) + np.abs(v) < 1.0,  # diamond
    lambda u, v, r, b: (r > 0.55) & (r < 1.0),  # ring
    lambda u, v, r, b: ((np.abs(u) < 0.3) | (np.abs(v) < 0.3)) & (b < 1.0),  # plus
    lambda u, v, r, b: (v < 0.8) & (np.abs(u) < (v + 1.0) * 0.5),  # triangle, apex up
    lambda u, v, r, b: (b > 0.45) & (b < 0.9),  # square frame
    lambda u, v, r, b: ((np.abs(u - v) < 0.4) | (np.abs(u + v) < 0.4)) & (b < 0.9),  # X
    lambda u, v, r, b: (np.abs(u) < 0.95) & (np.abs(np.abs(v) - 0.5) < 0.25),  # two bars
    lambda u, v, r, b: (r < 1.0) & (u > -0.35) & (np.hypot(u + 0.35, v) > 0.6),  # half moon
)

# Five fill patterns over image coordinates in units of the stripe period: which of two colours a pixel takes.
_TEXTURES = (
    lambda x, y: np.ones_like(x, bool),  # solid
    lambda x, y: y % 1.0 < 0.5,  # horizontal stripes
    lambda x, y: x % 1.0 < 0.5,  # vertical stripes
    lambda x, y: (x % 1.0 < 0.5) ^ (y % 1.0 < 0.5),  # checker
    lambda x, y: (x + y) % 1.0 < 0.5,  # diagonal stripes
)


# One colour per class (matplotlib's tab10), worn by half of the main objects.
_PALETTE = np.array(
    [
        (0.12, 0.47, 0.71),
        (1.00, 0.50, 0.05),
        (0.17, 0.63, 0.17),
        (0.84, 0.15, 0.16),
        (0.58, 0.40, 0.74),
        (0.55, 0.34, 0.29),
        (0.89, 0.47, 0.76),
        (0.50, 0.50, 0.50),
        (0.74, 0.74, 0.13),
        (0.09, 0.75, 0.81),
    ]
)


def _select(kinds: np.ndarray, choices: tuple, *args: np.ndarray) -> np.ndarray:
    """Per image n, choices[kinds[n]](*args[n]): each choice runs only on the images that use it."""
    out = np.zeros(args[0].shape, bool)
    for k, choice in enumerate(choices):
        sel = kinds == k
        out[sel] = choice(*(a[sel] for a in args))
    return out


def _smooth_noise(rng: np.random.Generator, n: int, cells: int) -> np.ndarray:
    """Low-frequency noise (n, 3, 32, 32): a coarse random grid upsampled bilinearly (separable).

    Interpolated in float64 so that BLAS kernels differing between machines cannot change the float32 result.
    """
    grid = rng.normal(size=(n, 3, cells, cells))
    pos = np.linspace(0, cells - 1, IMAGE_SIZE)
    lo = np.floor(pos).astype(int).clip(0, cells - 2)
    interp = np.zeros((IMAGE_SIZE, cells))
    interp[np.arange(IMAGE_SIZE), lo] = 1 - (pos - lo)
    interp[np.arange(IMAGE_SIZE), lo + 1] = pos - lo
    return (interp @ grid @ interp.T).astype(np.float32)


def _render(rng: np.random.Generator, labels: np.ndarray) -> np.ndarray:
    """Draw one image per label; uint8 (N, 32, 32, 3).

    The label is the shape of the largest object. Everything else is nuisance drawn from the same
    vocabulary: random two-tone texture, position, scale and tilt, smaller distractor shapes (the last
    may occlude the main object), a blotchy background and pixel noise. Colour hints at the class for
    half the objects only; the rest takes the object's outline among look-alike parts, which a deeper
    network with a larger receptive field recognises better.
    """
    n = len(labels)
    grid = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32)
    grid_y, grid_x = (np.broadcast_to(g, (n, IMAGE_SIZE, IMAGE_SIZE)) for g in grid)

    def per_image(a: np.ndarray) -> np.ndarray:  # one scalar per image, broadcast over the pixel grid
        return a.reshape(n, 1, 1).astype(np.float32)

    img = rng.uniform(0.2, 0.8, (n, 3, 1, 1)).astype(np.float32) + 0.12 * _smooth_noise(rng, n, 4)
    img += rng.uniform(-0.2, 0.2, (n, 3, 1, 1)).astype(np.float32) * (grid_x[:, None] / IMAGE_SIZE - 0.5)

    def draw(
        kinds: np.ndarray, radius_lo: float, radius_hi: float, visible: np.ndarray, colour: np.ndarray
    ) -> None:
        radius = per_image(rng.uniform(radius_lo, radius_hi, n))
        cx, cy = (per_image(rng.uniform(radius_hi, IMAGE_SIZE - radius_hi, n)) for _ in "xy")
        angle = rng.uniform(-0.35, 0.35, n)  # cos/sin in float64: float32 SIMD versions vary by CPU
        cos, sin = per_image(np.cos(angle)), per_image(np.sin(angle))
        dx, dy = grid_x - cx, grid_y - cy
        u = (cos * dx + sin * dy) / radius
        v = (cos * dy - sin * dx) / radius
        shape = _select(kinds, _SHAPES, u, v, np.hypot(u, v), np.maximum(np.abs(u), np.abs(v)))
        shape &= visible[:, None, None]
        period = per_image(rng.uniform(3.5, 5.0, n))
        pattern = _select(rng.integers(0, len(_TEXTURES), n), _TEXTURES, grid_x / period, grid_y / period)
        colour = np.clip(colour, 0, 1).astype(np.float32)
        second = np.clip(colour + rng.choice(np.float32([-0.45, 0.45]), (n, 1)), 0, 1)
        for mask, c in ((shape & pattern, colour), (shape & ~pattern, second)):
            img[:] = np.where(mask[:, None], c[:, :, None, None], img)

    def distractor(radius_lo: float, radius_hi: float) -> None:
        kinds = rng.integers(0, len(_SHAPES), n)
        draw(kinds, radius_lo, radius_hi, cluttered, rng.uniform(0, 1, (n, 3)))

    # Two easy cues get every network past chance within an epoch, so that short runs compare what the
    # networks learn rather than how long they stall: a quarter of the images show the object alone, and
    # half the objects wear their class's palette colour (a cue worth about half the labels at best).
    cluttered = rng.random(n) >= 0.25
    hinted = rng.random(n) < 0.5
    palette = _PALETTE[labels] + rng.normal(0, 0.06, (n, 3))
    for _ in range(3):
        distractor(3.0, 5.5)
    draw(labels, 7.0, 11.0, np.ones(n, bool), np.where(hinted[:, None], palette, rng.uniform(0, 1, (n, 3))))
    distractor(2.5, 4.0)
    img += rng.normal(0, 0.06, img.shape).astype(np.float32)
    return np.ascontiguousarray((img.clip(0, 1) * 255 + 0.5).astype(np.uint8).transpose(0, 2, 3, 1))


def make_synthetic(
    n_train: int, n_test: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The built-in 10-class dataset: x uint8 (N, 32, 32, 3), y int64, exactly balanced up to one image.

    Deterministic in ``seed``; each split has its own random stream, so the train set does not depend on
    ``n_test``. Rendered in chunks to bound memory.
    """
    out = []
    for split, n in enumerate((n_train, n_test)):
        rng = np.random.default_rng([seed, split])
        labels = rng.permutation(np.arange(n) % SYNTHETIC_CLASSES).astype(np.int64)
        chunks = [_render(rng, labels[i : i + 2048]) for i in range(0, n, 2048)]
        out += [np.concatenate(chunks) if chunks else np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8), labels]
    return tuple(out)


@cache
def _synthetic(size: tuple[int, int], image_size: int) -> tuple[np.ndarray, ...]:
    """A synthetic set from seed 0, generated once per process; read-only because it is shared."""
    split_arrays = make_synthetic(*size, seed=0)
    if image_size != IMAGE_SIZE:  # each pixel the mean of a block of the 32x32 image
        f = IMAGE_SIZE // image_size
        split_arrays = tuple(
            (a.reshape(len(a), image_size, f, image_size, f, 3).mean((2, 4)) + 0.5).astype(np.uint8) if a.ndim == 4
            else a for a in split_arrays)
    for a in split_arrays:
        a.flags.writeable = False
    return split_arrays


@dataclass(frozen=True)
class SyntheticSource:
    """``--dataset synthetic``: 10,000 / 2,000 images of 32x32 from seed 0, the same on every machine; or another
    size (``synthetic-mini``)."""

    name: str = "synthetic"
    size: tuple[int, int] = SYNTHETIC_SIZE
    image_size: int = IMAGE_SIZE

    def load(self, data_dir: Path) -> HostData:
        """Generated once per process (`data_dir` is not used)."""
        x_train, y_train, x_test, y_test = _synthetic(self.size, self.image_size)
        found = {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}
        return arrays.host_data(self.name, self.name, found, SYNTHETIC_CLASSES)
