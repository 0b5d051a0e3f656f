"""Small generated image folders for the streaming-path tests: mixed sizes and every kind of file the decoder must
turn into RGB (grayscale JPEG, CMYK JPEG, PNG with alpha)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("ant", "bee", "cat")


def image_bytes(rng: np.random.Generator, height: int, width: int, kind: str = "rgb", quality: int = 90) -> bytes:
    """A random smooth image of one class-free pattern, encoded as `kind`: rgb, gray, cmyk (JPEGs) or png."""
    base = rng.integers(0, 256, (height // 8 + 2, width // 8 + 2, 3), dtype=np.uint8)
    image = Image.fromarray(base).resize((width, height), Image.BILINEAR)
    out = io.BytesIO()
    if kind == "png":
        image.convert("RGBA").save(out, "PNG")
    else:
        image.convert({"rgb": "RGB", "gray": "L", "cmyk": "CMYK"}[kind]).save(out, "JPEG", quality=quality)
    return out.getvalue()


def make_image_folder(root: Path, per_class: int = 6, val_per_class: int = 2, seed: int = 0) -> Path:
    """root/train/<class>/*, root/val/<class>/*: sizes from 24 to 70 pixels a side; in the first class a grayscale
    JPEG, a CMYK JPEG and a PNG. Returns root."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", per_class), ("val", val_per_class)):
        for c, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                kind = ("gray", "cmyk", "png")[i] if c == 0 and i < 3 else "rgb"
                data = image_bytes(rng, int(rng.integers(24, 71)), int(rng.integers(24, 71)), kind)
                (folder / f"{i:03d}.{'png' if kind == 'png' else 'jpg'}").write_bytes(data)
    return root
