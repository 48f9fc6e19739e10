"""Decoding one image file into an HxWx3 uint8 RGB array, or a `BadImage` that says why not.

Every file goes through here: training, evaluation, feature caching and `predict`, so a picture gives the
same pixels everywhere. Files are header-checked up front (cheap, `check_image_header`); a full-decode
failure surfaces at load time as `BadImage`, which the dataset turns into a skipped file.
"""
from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import BinaryIO, Iterable, Optional, Union

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

PathLike = Union[str, os.PathLike]
IMG_EXTENSIONS = (".jpg", ".jpeg", ".jfif", ".jpe", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


MAX_ASPECT_RATIO = 100     # a 1x3,000,000 PNG is 3 KB, but resizing its shorter side to 34 px asks for 10 GB


class BadImage(Exception):
    """A file that cannot be decoded into an image; the message says why, `reason` names the kind of failure
    in a word (serve counts its errors by it)."""

    reason = "not_an_image"


class DecompressionBomb(BadImage):
    """More pixels than PIL's decompression-bomb bound: refused before they are decoded."""

    reason = "decompression_bomb"


class ExtremeAspectRatio(BadImage):
    """An image so thin that resizing its shorter side to a model's input would make a huge one."""

    reason = "extreme_aspect_ratio"


def _open(fp: BinaryIO) -> Image.Image:
    """Lazy PIL open (header only) that turns every failure, including the decompression-bomb
    warning zone (> MAX_IMAGE_PIXELS, below PIL's own hard error at 2x), into BadImage."""
    if fp.seek(0, os.SEEK_END) == 0:
        raise BadImage("empty file (0 bytes)")
    fp.seek(0)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(fp)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise DecompressionBomb(f"over PIL's decompression-bomb bound ({e}; the bound is PIL.Image.MAX_IMAGE_PIXELS, "
                                f"twice it for a hard error: raise it for images you trust)") from None
    except UnidentifiedImageError:
        raise BadImage("not an image (unrecognised format)") from None
    except Exception as e:  # PIL raises many types for malformed headers
        raise BadImage(f"unreadable image header: {type(e).__name__}: {e}") from None
    w, h = im.size
    if max(w, h) > MAX_ASPECT_RATIO * max(1, min(w, h)):
        raise ExtremeAspectRatio(f"{w}x{h} px, an aspect ratio beyond {MAX_ASPECT_RATIO}:1: resizing its shorter side "
                                 f"to the model's input would make a huge image (crop it first)")
    _check_mode(im)          # in the header: the scan skips such a file before a split is carved from the folder
    return im


# formats whose PIL mode I holds at most 16 bits: a 16-bit PNG (older PILs), a PGM/PPM of maxval above 255
# (Pillow scales it to 0-65535)
SIXTEEN_BIT = ("PNG", "PPM")


def _check_mode(im: Image.Image) -> None:
    """BadImage for pixels without an agreed range: floating point and 32-bit integers (TIFF's F and I modes)."""
    if im.mode == "F" or (im.mode == "I" and im.format not in SIXTEEN_BIT):
        raise BadImage(f"{'floating-point' if im.mode == 'F' else '32-bit integer'} pixels (PIL mode {im.mode}) have "
                       f"no standard range; save the image with 8 or 16 bits per channel")


def _pil_to_rgb(im: Image.Image) -> np.ndarray:
    """Decode with PIL: EXIF orientation (else XMP's); 16-bit keeps its high byte (as PIL's 16-bit RGB PNG reader
    and cv2 do); alpha and palette transparency are composited onto white (transparent backgrounds
    become white, not whatever colour hides under alpha=0); CMYK etc. via PIL's convert. 32-bit integer and
    floating-point pixels (TIFF's I and F modes) have no agreed range (0-255? 0-1? 0-65535?): BadImage, not
    a guess that would turn them black or white."""
    _check_mode(im)
    im = ImageOps.exif_transpose(im)
    if im.mode.startswith("I;16") or im.mode == "I":
        high = np.clip(np.asarray(im, dtype=np.int64), 0, 65535) >> 8
        return np.repeat(high.astype(np.uint8)[:, :, None], 3, axis=2)
    if "A" in im.mode or "a" in im.mode or "transparency" in im.info:
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, im.convert("RGBA"))
    return np.array(im.convert("RGB"))


# libjpeg's scaled decoding (1/8, 1/4, 1/2 of each side, in the DCT domain), largest first
_REDUCED = ((8, cv2.IMREAD_REDUCED_GRAYSCALE_8), (4, cv2.IMREAD_REDUCED_GRAYSCALE_4), (2, cv2.IMREAD_REDUCED_GRAYSCALE_2))


def _jpeg_flags(size: tuple[int, int], min_size: Optional[int]) -> int:
    """cv2 flags decoding a JPEG of `size` as small as possible with its shorter side >= min_size."""
    short = min(size)
    for r, reduced in _REDUCED:
        if min_size and short // r >= min_size:
            return reduced | cv2.IMREAD_COLOR_RGB     # the REDUCED_GRAYSCALE bit is the scale; RGB the colour
    return cv2.IMREAD_COLOR_RGB


def pil_to_rgb(im: Image.Image, min_size: Optional[int] = None) -> np.ndarray:
    """HxWx3 uint8 RGB of a PIL image given by a caller (Predictor), or BadImage. One still as `Image.open`
    left it (not yet decoded) is decoded from its file as `load_image` decodes that file: a large JPEG at
    libjpeg's reduced scale, as in training, so a PIL image and its path give the same probabilities. An
    image already decoded (or drawn), or moved to a later frame of its file (`seek`), is taken as it is."""
    if (getattr(im, "tile", None) and im.tell() == 0 and isinstance(getattr(im, "filename", None), str)
            and Path(im.filename).is_file()):
        return load_image(im.filename, min_size)
    return _pil_to_rgb(im)


def load_image(path: PathLike, min_size: Optional[int] = None) -> np.ndarray:
    """HxWx3 uint8 RGB, or BadImage saying why not.

    Plain 8-bit RGB/greyscale JPEG and PNG (the bulk of any dataset) are decoded by OpenCV, which is
    faster than PIL, and turned upright as PIL's exif_transpose turns them (EXIF orientation, else XMP's);
    every other mode goes through PIL.
    A JPEG without its end marker goes through PIL too, because cv2 silently grey-fills truncation.

    `min_size`: the shorter side the caller needs. A JPEG at least twice that is decoded at 1/2, 1/4
    or 1/8 scale (libjpeg's DCT-domain scaling, as PIL's `draft`), never below `min_size`: for a
    phone photo fed to a 224-px model, a fraction of the decoding and resizing, and only detail that
    the pipeline's own antialiased downscale would have removed is lost.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise BadImage(f"cannot read file: {e}") from None
    return decode_image(data, min_size)


ORIENTATION = 0x0112     # EXIF's Orientation tag
# Pillow's exif_transpose on an HxWxC array, by orientation (1: as stored; 6 turns 90 degrees clockwise), in
# OpenCV's calls: a contiguous copy at memcpy speed, where numpy's strided rot90 copy took longer than the decoding
_UPRIGHT = {2: lambda a: cv2.flip(a, 1), 3: lambda a: cv2.rotate(a, cv2.ROTATE_180), 4: lambda a: cv2.flip(a, 0),
            5: cv2.transpose, 6: lambda a: cv2.rotate(a, cv2.ROTATE_90_CLOCKWISE),
            7: lambda a: cv2.flip(cv2.transpose(a), -1), 8: lambda a: cv2.rotate(a, cv2.ROTATE_90_COUNTERCLOCKWISE)}


def _has_xmp(im: Image.Image) -> bool:
    """Whether the header holds an XMP packet (Pillow reads a JPEG's APP1 XMP and a PNG's iTXt at open)."""
    return bool(im.info.get("xmp") or im.info.get("XML:com.adobe.xmp"))


def _cv2_decode(data: bytes, im: Image.Image, min_size: Optional[int]) -> Optional[np.ndarray]:
    """OpenCV's decoding of a plain JPEG or PNG, turned upright by Pillow's rule, or None where it cannot decode.

    OpenCV applies the EXIF orientation but not one kept only in XMP (tiff:Orientation), which Pillow's
    exif_transpose follows when EXIF has none (CMYK JPEG, WebP, a PIL image given to Predictor). So a file with XMP
    is decoded as stored and turned here by the orientation Pillow reads: one rule on every path. Pillow parsed the
    packet at open; a file without XMP (nearly all) costs nothing more, one with it a header lookup."""
    flags = _jpeg_flags(im.size, min_size) if im.format == "JPEG" else cv2.IMREAD_COLOR_RGB
    turn = None
    if _has_xmp(im):
        try:
            turn = _UPRIGHT.get(im.getexif().get(ORIENTATION))
        except Exception:  # a malformed EXIF block: PIL's decoding says what it makes of it
            return None
        flags |= cv2.IMREAD_IGNORE_ORIENTATION
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    return turn(arr) if arr is not None and turn else arr


def decode_image(data: bytes, min_size: Optional[int] = None) -> np.ndarray:
    """HxWx3 uint8 RGB of an encoded image held in memory (an upload to `serve`), or BadImage saying why
    not: decoded exactly as load_image decodes the same bytes from a file, so both give the same pixels."""
    im = _open(io.BytesIO(data))
    fast = (im.mode in ("RGB", "L") and "transparency" not in im.info
            and (im.format == "PNG" or (im.format == "JPEG" and data.endswith(b"\xff\xd9"))))
    arr = _cv2_decode(data, im, min_size) if fast else None
    if arr is not None:
        return arr
    try:
        return _pil_to_rgb(im)
    except BadImage:
        raise
    except Exception as e:  # truncated/corrupt streams raise OSError, SyntaxError, ValueError, ...
        raise BadImage(f"corrupt or truncated image: {type(e).__name__}: {e}") from None


def check_image_header(path: PathLike) -> Optional[str]:
    """Cheap up-front check (header only, no decode): None if plausible, else the reason to skip."""
    try:
        with open(path, "rb") as fp:
            _open(fp).close()
    except BadImage as e:
        return str(e)
    except OSError as e:
        return f"cannot read file: {e}"
    return None


def first_readable(paths: Iterable[PathLike], min_size: Optional[int] = None
                   ) -> tuple[Optional[PathLike], list[tuple[PathLike, str]]]:
    """The first of `paths` that decodes (None when none does), and each that failed before it with its reason.
    Whether a class has a readable image is asked without decoding the whole folder: a healthy class costs one
    decode, and only a class whose files fail is read further (truncated files pass the header check).
    `min_size` as load_image's (1: a large JPEG at 1/8 scale, when only whether it decodes matters)."""
    failed: list[tuple[PathLike, str]] = []
    for path in paths:
        try:
            load_image(path, min_size)
            return path, failed
        except BadImage as e:
            failed.append((path, str(e)))
    return None, failed
