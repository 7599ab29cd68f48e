"""Reading a user's reference images: clear errors for missing folders, corrupt files, no images."""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from persres.errors import InputError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


class CorruptImageWarning(UserWarning):
    """A file in the reference folder that could not be read; the others are used."""


@dataclass(frozen=True)
class ReferenceImage:
    path: Path
    image: Image.Image  # RGB
    sha256: str


def read_folder(folder: str | Path) -> list[ReferenceImage]:
    folder = Path(folder)
    if not folder.exists():
        raise InputError(f"image folder {str(folder)!r} does not exist")
    if not folder.is_dir():
        raise InputError(f"{str(folder)!r} is not a folder")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise InputError(f"image folder {str(folder)!r} is empty")
    images = []
    for path in files:
        data = path.read_bytes()
        try:
            with Image.open(path) as im:
                im.load()
                rgb = im.convert("RGB")
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
            if path.suffix.lower() in IMAGE_SUFFIXES:
                warnings.warn(f"skipping unreadable image {path}", CorruptImageWarning, stacklevel=2)
            continue
        images.append(ReferenceImage(path, rgb, hashlib.sha256(data).hexdigest()))
    if not images:
        raise InputError(f"image folder {str(folder)!r} holds no readable image")
    return images


def center_square(image: Image.Image, size: int) -> Image.Image:
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return image.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BICUBIC)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> (3, H, W) float in [-1, 1]."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32)  # (H, W, 3)
    return torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1.0


def to_pil(x: torch.Tensor) -> Image.Image:
    """(3, H, W) in [-1, 1] -> PIL RGB."""
    arr = ((x.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr)


def save_png(image: Image.Image, path: Path, text: dict) -> Path:
    """Write a PNG whose text chunks say how it was made (prompt, seed, concepts, ...)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in text.items():
        info.add_text(key, str(value))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG", pnginfo=info)
    tmp.replace(path)  # a half-written image never looks finished to a resumed run
    return path


def contact_sheet(rows: list[list[Image.Image]], min_side: int = 128, gap: int = 4) -> Image.Image:
    """Rows of images on one white sheet; small images are enlarged by a whole factor
    (nearest neighbour, so a 32 px toy sample stays crisp) until a tile is >= min_side."""
    tile_w = max(im.width for row in rows for im in row)
    tile_h = max(im.height for row in rows for im in row)
    scale = max(1, -(-min_side // min(tile_w, tile_h)))  # ceil
    tw, th = tile_w * scale, tile_h * scale
    cols = max(len(row) for row in rows)
    sheet = Image.new("RGB", (cols * tw + (cols - 1) * gap, len(rows) * th + (len(rows) - 1) * gap), (255, 255, 255))
    for r, row in enumerate(rows):
        for c, im in enumerate(row):
            sheet.paste(im.convert("RGB").resize((im.width * scale, im.height * scale), Image.Resampling.NEAREST),
                        (c * (tw + gap), r * (th + gap)))
    return sheet
