#!/usr/bin/env python
"""Classify images with this bundle's ONNX model, without spinal-transfer.

    pip install numpy opencv-python-headless pillow onnxruntime
    python predict_onnx.py photo.jpg more/*.png --topk 3
    python predict_onnx.py photos/ --model model.int8.onnx --json

It reads config.json beside it (classes in logit order, input size, mean, std, interpolation, the temperature)
and preprocesses as spinal-transfer's evaluation pipeline does, step for step: the same decoding (OpenCV for
plain JPEG and PNG, a large JPEG decoded at a reduced scale no smaller than the resize needs; Pillow for the rest;
upright by EXIF's orientation, else XMP's, as Pillow reads them; 16-bit images to their high byte, transparency
onto white), the same resize (area when downscaling), centre crop and normalization. The probabilities are those
`spinal-transfer predict --runner onnx` gives for the same files (--runner onnx-int8 with --model model.int8.onnx;
checked to 1e-5 by spinal-transfer's tests), calibrated as softmax(logits / T). A folder is searched for images
(by extension, recursively, hidden files left out), as `predict` does. A file that cannot be read, or that
`predict` refuses unread (more pixels than Pillow's decompression-bomb bound, an aspect ratio beyond 100:1), is
skipped and named on stderr in one line (and under "skipped" with --json); when none can be read, the exit status
is 2. A config.json edited since export, or a model that is none of the files it records, is refused (as
`predict` refuses them) unless --no-verify.

spinal-transfer copies this file into every bundle it exports with --format onnx; it imports nothing of it. The
decoding and preprocessing repeat spinal_transfer/data/images.py and transforms.py on purpose (this file must run
alone); tests/deploy/test_standalone.py holds the two equal.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
import warnings
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort
from PIL import Image, ImageOps, UnidentifiedImageError

HERE = Path(__file__).resolve().parent
INTERPOLATION = {"nearest": cv2.INTER_NEAREST, "bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC,
                 "area": cv2.INTER_AREA, "lanczos": cv2.INTER_LANCZOS4}
REDUCED = ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4), (2, cv2.IMREAD_REDUCED_COLOR_2))
# predict's (data.images.IMG_EXTENSIONS; test_standalone checks they agree)
EXTENSIONS = (".jpg", ".jpeg", ".jfif", ".jpe", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
MAX_ASPECT_RATIO = 100     # spinal-transfer's: a 1x3,000,000 PNG is 3 KB, but its resize would ask for 10 GB
SIXTEEN_BIT = ("PNG", "PPM")   # formats whose PIL mode I is at most 16 bits (a PGM above maxval 255: 0-65535)
ORIENTATION = 0x0112       # EXIF's Orientation tag
# Pillow's exif_transpose on an HxWxC array, by orientation (1: as stored; 6 turns 90 degrees clockwise)
UPRIGHT = {2: lambda a: cv2.flip(a, 1), 3: lambda a: cv2.rotate(a, cv2.ROTATE_180), 4: lambda a: cv2.flip(a, 0),
           5: cv2.transpose, 6: lambda a: cv2.rotate(a, cv2.ROTATE_90_CLOCKWISE),
           7: lambda a: cv2.flip(cv2.transpose(a), -1), 8: lambda a: cv2.rotate(a, cv2.ROTATE_90_COUNTERCLOCKWISE)}


def image_files(paths: list[Path]) -> list[Path]:
    """Files as given; folders expanded to their images (recursive, sorted, hidden files and folders left out)."""
    out: list[Path] = []
    for p in paths:
        if p.is_dir():         # a broken link is kept: it is skipped and named, as `predict` does
            out += sorted(f for f in p.rglob("*") if f.suffix.lower() in EXTENSIONS and (f.is_file() or f.is_symlink())
                          and not any(part.startswith(".") for part in f.relative_to(p).parts))
        else:
            out.append(p)
    return list(dict.fromkeys(out))


def model_file(name: str, ap: argparse.ArgumentParser) -> Path:
    """--model as a path (from here, or absolute), else a file of that name beside this script."""
    for p in (Path(name), HERE / name):
        if p.is_file():
            return p
    ap.error(f"--model {name}: no such file, here or beside {Path(__file__).name} ({HERE})")


def fail(message: str) -> None:
    """One line on stderr, exit status 2 (spinal-transfer's for a user's mistake)."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify(model: Path, config: dict, config_file: Path) -> None:
    """Refuse (as `predict` does) a config.json edited since export (its classes, preprocessing or temperature
    may no longer fit the model) and a model that is none of the files export recorded in it (another bundle's
    model.onnx copied in: its logits would be read with these classes). A bundle without digests: unchecked."""
    if "config_sha256" in config:
        body = {k: v for k, v in config.items() if k != "config_sha256"}
        if hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest() != config["config_sha256"]:
            fail(f"{config_file} was changed since export (its content does not match the sha256 recorded in it); "
                 f"re-export the bundle, or pass --no-verify to use it as it is")
    files = config.get("files") or {}
    if files and sha256(model) not in files.values():
        fail(f"{model} is not a model of this bundle (its sha256 is none of those {config_file} records: edited, "
             f"corrupted or another bundle's); re-export the bundle, or pass --no-verify to use it as it is")
    data = model.with_name(model.name + ".data")           # an ONNX model's external weights, beside it
    if model.name + ".data" in files and data.is_file() and sha256(data) != files[model.name + ".data"]:
        fail(f"{data} does not match the sha256 recorded in {config_file}; re-export the bundle")


def _hw(size) -> tuple[int, int]:
    return (int(size[0]), int(size[1])) if isinstance(size, (list, tuple)) else (int(size), int(size))


def open_image(data: bytes) -> Image.Image:
    """Pillow's lazy open (header only), refusing what spinal-transfer refuses before decoding, in its words: more
    pixels than Pillow's decompression-bomb bound (its warning zone too, where Pillow alone would decode them all) and
    an aspect ratio beyond MAX_ASPECT_RATIO (the resize would make a huge image)."""
    if not data:
        raise ValueError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))      # no file handle left open
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise ValueError(f"over PIL's decompression-bomb bound ({e}; the bound is PIL.Image.MAX_IMAGE_PIXELS, "
                         f"twice it for a hard error: raise it for images you trust)") from None
    except UnidentifiedImageError:
        raise ValueError("not an image (unrecognised format)") from None
    except Exception as e:  # Pillow raises many types for malformed headers
        raise ValueError(f"unreadable image header: {type(e).__name__}: {e}") from None
    w, h = im.size
    if max(w, h) > MAX_ASPECT_RATIO * max(1, min(w, h)):
        raise ValueError(f"{w}x{h} px, an aspect ratio beyond {MAX_ASPECT_RATIO}:1: resizing its shorter side to "
                         f"the model's input would make a huge image (crop it first)")
    return im


def decode_plain(data: bytes, im: Image.Image, min_size: int) -> np.ndarray | None:
    """OpenCV's RGB of a plain JPEG or PNG turned upright as Pillow turns it, or None where OpenCV cannot decode it
    (or the file's EXIF is malformed: Pillow then says what it makes of it). OpenCV applies EXIF's orientation but
    not one kept only in XMP, which Pillow follows: a file with XMP is decoded as stored and turned by Pillow's."""
    flags = cv2.IMREAD_COLOR
    if im.format == "JPEG":
        flags = next((f for r, f in REDUCED if min(im.size) // r >= min_size), cv2.IMREAD_COLOR)
    turn = None
    if im.info.get("xmp") or im.info.get("XML:com.adobe.xmp"):
        try:
            turn = UPRIGHT.get(im.getexif().get(ORIENTATION))
        except Exception:  # a malformed EXIF block: Pillow's decoding says what it makes of it
            return None
        flags |= cv2.IMREAD_IGNORE_ORIENTATION
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), flags)       # applies EXIF orientation unless told not to
    if bgr is None:
        return None
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    return turn(rgb) if turn else rgb


def decode(path: Path, min_size: int) -> np.ndarray:
    """HxWx3 uint8 RGB of an image file. A JPEG whose shorter side is at least twice `min_size` is decoded at
    1/2, 1/4 or 1/8 scale (libjpeg's), never below `min_size`: spinal-transfer does the same."""
    data = path.read_bytes()
    im = open_image(data)
    plain = (im.mode in ("RGB", "L") and "transparency" not in im.info
             and (im.format == "PNG" or (im.format == "JPEG" and data.endswith(b"\xff\xd9"))))
    rgb = decode_plain(data, im, min_size) if plain else None
    if rgb is not None:
        return rgb
    if im.mode == "F" or (im.mode == "I" and im.format not in SIXTEEN_BIT):   # as spinal-transfer: no agreed range
        raise ValueError(f"{'floating-point' if im.mode == 'F' else '32-bit integer'} pixels (PIL mode {im.mode}) "
                         f"have no standard range; save the image with 8 or 16 bits per channel")
    im = ImageOps.exif_transpose(im)       # EXIF's orientation, else XMP's
    if im.mode.startswith("I;16") or im.mode == "I":
        high = (np.clip(np.asarray(im, dtype=np.int64), 0, 65535) >> 8).astype(np.uint8)
        return np.repeat(high[:, :, None], 3, axis=2)
    if "A" in im.mode or "a" in im.mode or "transparency" in im.info:
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, im.convert("RGBA"))
    return np.array(im.convert("RGB"))


def _resize(img: np.ndarray, h: int, w: int, interpolation: int, downscale: bool) -> np.ndarray:
    if (h, w) == img.shape[:2]:
        return img
    return cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA if downscale else interpolation)


def preprocess(img: np.ndarray, inp: dict) -> np.ndarray:
    """The model's 3xSxS float32 input: resize (the shorter side to resize_size, or to resize_size's HxW when it
    is two numbers, or the whole image to SxS when eval_resize is not center_crop), centre crop SxS, normalize."""
    size, interp = int(inp["img_size"]), INTERPOLATION[inp["interpolation"]]
    h, w = _hw(inp["resize_size"])
    if inp["eval_resize"] == "center_crop" and h != w:
        img = _resize(img, h, w, interp, h < img.shape[0] or w < img.shape[1])
    elif inp["eval_resize"] == "center_crop":
        scale = h / min(img.shape[:2])
        img = _resize(img, max(1, round(img.shape[0] * scale)), max(1, round(img.shape[1] * scale)), interp,
                      scale < 1.0)
    else:
        img = _resize(img, size, size, interp, size < img.shape[0] or size < img.shape[1])
    if inp["eval_resize"] == "center_crop":
        top, left = (img.shape[0] - size) // 2, (img.shape[1] - size) // 2
        img = img[top:top + size, left:left + size]
    mean, std = np.array(inp["mean"], np.float64), np.array(inp["std"], np.float64)
    return ((img.astype(np.float64) / 255.0 - mean) / std).astype(np.float32).transpose(2, 0, 1)


def decode_size(inp: dict) -> int:
    """The shorter side the first resize needs of the decoded image."""
    h, w = _hw(inp["resize_size"])
    return min(h, w) if inp["eval_resize"] == "center_crop" else int(inp["img_size"])


def probabilities(session: ort.InferenceSession, batch: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(logits / T) in float64, one row per image."""
    z = session.run(None, {session.get_inputs()[0].name: batch})[0].astype(np.float64) / temperature
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="classify images with this bundle's ONNX model (top-k classes)")
    ap.add_argument("images", nargs="+", type=Path, help="image files or folders")
    ap.add_argument("--model", default="model.onnx",
                    help="model.onnx (default) or model.int8.onnx beside this file, or a path to one")
    ap.add_argument("--topk", type=positive, default=5, help="classes shown per image (default 5)")
    ap.add_argument("--batch-size", type=positive, default=32, help="images per model call (default 32)")
    ap.add_argument("--json", action="store_true", help="one JSON object: every image's probabilities")
    ap.add_argument("--no-verify", action="store_true",
                    help="use a bundle whose config.json or model differs from the sha256 export recorded")
    return ap


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    model = model_file(args.model, ap)
    config_file = model.parent / "config.json"
    if not config_file.is_file():           # a model copied out of its bundle: this bundle's config
        config_file = HERE / "config.json"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8-sig"))
        inp, classes, temperature = config["input"], config["classes"], float(config.get("temperature") or 1.0)
    except (OSError, ValueError, KeyError, TypeError) as e:
        fail(f"{config_file} is missing or unreadable ({type(e).__name__}: {e}): this script reads the classes and "
             f"preprocessing from the config.json of its bundle")
    if not args.no_verify:
        verify(model, config, config_file)
    try:
        session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    except Exception as e:                  # onnxruntime's own exception types: not an ONNX model, a damaged one
        fail(f"{model} is not an ONNX model onnxruntime can load ({str(e).splitlines()[0][:200]})")
    files = image_files(args.images)
    if not files:
        fail(f"no images found in {' '.join(map(str, args.images))} (read are {' '.join(EXTENSIONS)})")
    need, read, skipped, probs = decode_size(inp), [], [], []
    for i in range(0, len(files), args.batch_size):           # a batch at a time: memory stays one batch
        batch = []
        for f in files[i:i + args.batch_size]:             # an unreadable file is skipped and named, as in `predict`
            try:
                batch.append(preprocess(decode(f, need), inp))
                read.append(f)
            except (OSError, ValueError, SyntaxError, cv2.error) as e:   # missing, truncated, not an image, ...
                why = str(e) if type(e) is ValueError else f"{type(e).__name__}: {e}"
                skipped.append((str(f), why))
                print(f"skipped {f}: {why}", file=sys.stderr)
        if batch:
            probs.append(probabilities(session, np.stack(batch), temperature))
    p = np.concatenate(probs) if probs else np.zeros((0, len(classes)))
    if not read:
        print(f"error: none of the {len(files)} image file(s) could be read", file=sys.stderr)
    if args.json:
        json.dump({"classes": classes, "temperature": temperature, "images": [str(f) for f in read],
                   "probabilities": p.tolist(), "skipped": skipped}, sys.stdout)
        print()
        return 0 if read else 2
    k = min(args.topk, len(classes))
    for f, row in zip(read, p):
        top = np.argsort(-row, kind="stable")[:k]
        print(f"{f}: " + ", ".join(f"{classes[j]} {row[j]:.4f}" for j in top))
    return 0 if read else 2


if __name__ == "__main__":
    sys.exit(main())
