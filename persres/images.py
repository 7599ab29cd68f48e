"""Reading a user's reference images: clear errors for missing folders, corrupt files, no images."""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from persres.atomic import atomic_path
from persres.errors import InputError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
HEIF_SUFFIXES = {".heic", ".heif"}  # iPhone photos: read where pillow-heif is installed, else named in a warning
HEIF_ADVICE = "HEIC/HEIF photos need `pip install pillow-heif` (or export them as JPEG)"


def heif_readable() -> bool:
    """Whether HEIC/HEIF files open here (pillow-heif installed; its opener registered once)."""
    try:
        import pillow_heif
    except ImportError:
        return False
    pillow_heif.register_heif_opener()
    return True


class CorruptImageWarning(UserWarning):
    """A file in the reference folder that could not be read; the others are used."""


class FewImagesWarning(UserWarning):
    """Fewer references than the method is made for, or references smaller than the training resolution."""


MIN_IMAGES = 3  # the paper's concepts have 3-15 photos


@dataclass(frozen=True)
class ReferenceImage:
    path: Path
    image: Image.Image  # RGB
    sha256: str


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB: EXIF orientation applied, 16-bit and float scaled (not
    clipped to white), palette and alpha composited on white, CMYK converted."""
    from PIL import ImageOps

    im = ImageOps.exif_transpose(im)
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        arr = np.asarray(im, dtype=np.float64)
        if im.mode == "F" and arr.size and np.nanmax(arr) <= 1.0:
            arr = arr * 255.0
        elif arr.size and np.nanmax(arr) > 65535:
            arr = arr * (255.0 / 2147483647.0)  # 32-bit integer samples
        elif arr.size and np.nanmax(arr) > 255:
            arr = arr * (255.0 / 65535.0)  # 16-bit samples
        im = Image.fromarray(np.clip(np.nan_to_num(arr), 0, 255).round().astype(np.uint8), "L")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("LA", "PA", "RGBa", "La"):
        im = im.convert("RGBA")
    if im.mode == "RGBA":
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, im).convert("RGB")
    return im.convert("RGB")


def read_folder(folder: str | Path) -> list[ReferenceImage]:
    """The readable images of a folder, as RGB; unreadable files and non-files are skipped with a
    warning. (A shipped toy concept's "toy:NAME" is resolved by `persres.toy.resolve_folder`.)"""
    import stat

    folder = Path(folder)
    if not folder.exists():
        raise InputError(f"image folder {str(folder)!r} does not exist")
    if not folder.is_dir():
        raise InputError(f"{str(folder)!r} is not a folder")
    try:
        entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    except OSError as e:
        raise InputError(f"cannot read the image folder {str(folder)!r}: {e.strerror or e}") from None
    if not entries:
        raise InputError(f"image folder {str(folder)!r} is empty")
    images, denied, skipped = [], [], []
    heif = any(p.suffix.lower() in HEIF_SUFFIXES for p in entries) and heif_readable()
    for path in entries:
        try:
            mode = path.stat().st_mode
        except OSError as e:
            warnings.warn(f"skipping {path}: {e.strerror or e}", CorruptImageWarning, stacklevel=2)
            denied.append(f"{path.name}: {e.strerror or e}")
            continue
        if stat.S_ISDIR(mode):
            continue
        if not stat.S_ISREG(mode):  # a pipe or device would block or never end
            warnings.warn(f"skipping {path}: not a regular file", CorruptImageWarning, stacklevel=2)
            skipped.append(path.name)
            continue
        if path.suffix.lower() in HEIF_SUFFIXES and not heif:
            skipped.append(path.name)
            denied.append(f"{path.name}: {HEIF_ADVICE}")
            continue
        try:
            data = path.read_bytes()
        except OSError as e:
            warnings.warn(f"skipping {path}: {e.strerror or e}", CorruptImageWarning, stacklevel=2)
            denied.append(f"{path.name}: {e.strerror or e}")
            skipped.append(path.name)
            continue
        try:
            with Image.open(path) as im:
                im.load()
                rgb = to_rgb(im)
        except Image.DecompressionBombError:
            warnings.warn(f"skipping {path}: {_pixels(path)} is over the {Image.MAX_IMAGE_PIXELS * 2:,} pixels PIL opens "
                          "(its guard against decompression bombs); resize it first", CorruptImageWarning, stacklevel=2)
            skipped.append(path.name)
            continue
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
            if path.suffix.lower() in IMAGE_SUFFIXES | HEIF_SUFFIXES:
                warnings.warn(f"skipping unreadable image {path}", CorruptImageWarning, stacklevel=2)
            skipped.append(path.name)
            continue
        images.append(ReferenceImage(path, rgb, hashlib.sha256(data).hexdigest()))
    heic = [n for n in skipped if Path(n).suffix.lower() in HEIF_SUFFIXES]
    if not images:
        why = f" ({len(denied)} file(s) could not be read, e.g. {denied[0]})" if denied else ""
        raise InputError(f"image folder {str(folder)!r} holds no readable image{why}")
    if skipped:  # every file left out is counted, whatever the reason
        advice = f"; {len(heic)} are HEIC/HEIF: {HEIF_ADVICE}" if heic else ""
        warnings.warn(f"skipped {len(skipped)} of {len(skipped) + len(images)} files in {str(folder)!r} "
                      f"(e.g. {skipped[0]}){advice}", CorruptImageWarning, stacklevel=2)
    if len(images) < MIN_IMAGES:
        warnings.warn(f"only {len(images)} reference image(s) in {str(folder)!r}; the method is made for "
                      f"{MIN_IMAGES}-15 and may copy a single photo", FewImagesWarning, stacklevel=2)
    return images


def _pixels(path: Path) -> str:
    """"20000 x 20000 pixels" from an image's header, without decoding it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            old, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
            try:
                with Image.open(path) as im:
                    return f"{im.width} x {im.height} = {im.width * im.height:,} pixels"
            finally:
                Image.MAX_IMAGE_PIXELS = old
    except Exception:
        return "its size"


def warn_if_small(references: list[ReferenceImage], side: int) -> None:
    small = [r.path.name for r in references if min(r.image.size) < side]
    if small:
        warnings.warn(f"{len(small)} reference image(s) smaller than the training resolution {side} px "
                      f"(e.g. {small[0]}); they are upscaled and will look soft", FewImagesWarning, stacklevel=2)


def check_writable_dir(folder: Path, what: str = "--out") -> Path:
    """Create `folder` if needed and prove it takes a file, before any work is done."""
    import tempfile

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{what} {str(folder)!r} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise InputError(f"cannot write to {what} {str(folder)!r}: {e.strerror or e}") from None
    return folder


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
    with atomic_path(path) as tmp:  # a half-written image never looks finished to a resumed run
        image.save(tmp, format="PNG", pnginfo=info)
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


def write_reference_sheet(path: Path, images) -> None:
    """A contact sheet of a concept's reference images (what galleries show: `persres ui`), written whole or not at all."""
    from persres.atomic import atomic_path

    with atomic_path(path) as tmp:
        contact_sheet([list(images)], min_side=96).save(tmp, format="PNG")
