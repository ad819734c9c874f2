"""Calibration and evaluation images: folders of JPEG/PNG files, .npy arrays, zoo defaults."""

from __future__ import annotations

import logging
import glob
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from ..frontend import zoo
from ..errors import RebirthError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
# learned sites hold every 8th calibration image out to measure their error (learn.finetune):
# fewer images leave no held-out image, and the error would be measured on the fitted ones
MIN_LEARNING_IMAGES = 8
# the default calibration count: as many images as CALIBRATION_MACS multiply-adds of the
# model allow, between the bounds (fmnist-inception, 8.6e6 per image, and fmnist-vgg, 2.2e7:
# 2048 images, their default fine-tunes ~3 minutes on 2 cores with every site; fmnist-vgg's
# lost -3.30 points at 896 images and -2.53 at 2048; ShuffleNet 384; GoogLeNet, AlexNet and
# SqueezeNet: 256)
CALIBRATION_MACS = 5e10
DEFAULT_IMAGES = (256, 2048)
FOOLBOX_WHEEL = "foolbox==3.3.4"  # carries 20 labeled ImageNet photos in foolbox/data/


def preprocess(images_hwc: np.ndarray, entry: zoo.ZooModel | None, shape) -> np.ndarray:
    """[N, H, W, C] pixel values on the 0..255 scale (uint8, or float32 from 16-bit images;
    already at the model's size) -> float32 NCHW, normalised."""
    mean = np.array(entry.mean if entry else [0.0] * shape[1], np.float32)
    std = np.array(entry.std if entry else [1.0] * shape[1], np.float32)
    x = (images_hwc.astype(np.float32) - mean) / std
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


# PIL modes of 16-bit (and 32-bit integer) grayscale images: converting them to "L" clips
# every value above 255, so they are read as floats and scaled to the 8-bit range instead
WIDE_GRAY_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def _decode(path: Path, size, channels, crop_box=None, flip=False) -> np.ndarray:
    """One image file as [H, W, C] pixel values on the 0..255 scale: uint8 for 8-bit
    images, float32 for 16-bit grayscale ones (value * 255 / 65535: full precision)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            wide = img.mode in WIDE_GRAY_MODES
            if wide:
                img = Image.fromarray(np.asarray(img, np.float32) * np.float32(255 / 65535), "F")
            else:
                img = img.convert("RGB" if channels == 3 else "L")
            if crop_box is not None:
                img = img.crop(crop_box)
            else:  # resize the shorter side, centre crop
                w, h = img.size
                side = min(w, h)
                img = img.crop(((w - side) // 2, (h - side) // 2,
                                (w - side) // 2 + side, (h - side) // 2 + side))
            img = img.resize((size[1], size[0]), Image.BILINEAR)
            if flip:
                img = img.transpose(Image.FLIP_LEFT_RIGHT)
            arr = np.asarray(img, np.float32 if wide else np.uint8)
    except (OSError, ValueError) as err:
        raise RebirthError(f"{path}: not a readable image ({err})") from None
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if wide and channels == 3:
        arr = np.repeat(arr, 3, axis=2)
    return arr


def images_from_folder(folder, shape, count, entry=None, augment=False, seed=0):
    """Up to ``count`` images of a folder, preprocessed to ``shape`` (N, C, H, W). With
    ``augment``, seeded random crops and flips extend a small folder to ``count`` images."""
    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise RebirthError(f"{folder}: no JPEG/PNG images in this folder")
    size, channels = shape[2:], shape[1]
    if not augment or len(files) >= count:
        return images_from_folder_files(files[:count], shape, entry)
    from PIL import Image

    rng = np.random.default_rng(seed)
    arrays = []
    for i in range(count):
        path = files[i % len(files)]
        with Image.open(path) as img:
            w, h = img.size
        side = int(min(w, h) * rng.uniform(0.5, 1.0))
        left, top = rng.integers(0, w - side + 1), rng.integers(0, h - side + 1)
        arrays.append(_decode(path, size, channels, (left, top, left + side, top + side),
                              flip=bool(rng.integers(0, 2))))
    return preprocess(np.stack(arrays), entry, shape)


def images_from_folder_files(files, shape, entry=None):
    """The given image files, centre-cropped, resized and preprocessed to ``shape``."""
    return preprocess(np.stack([_decode(f, shape[2:], shape[1]) for f in files]), entry, shape)


def images_from_npy(path, shape, count):
    """The first ``count`` rows of a preprocessed NCHW float array; every value finite."""
    try:
        x = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise RebirthError(f"{path}: not a readable .npy array ({err or 'empty file'})") from None
    if not isinstance(x, np.ndarray):
        raise RebirthError(f"{path}: an .npz archive, not a .npy array")
    if x.ndim != 4 or list(x.shape[1:]) != list(shape[1:]):
        raise RebirthError(f"{path}: array shape {list(x.shape)} does not match the model "
                           f"input [N, {', '.join(map(str, shape[1:]))}] (preprocessed NCHW)")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise RebirthError(f"{path}: holds {x.dtype} values, not numbers")
    x = np.ascontiguousarray(x[:count], np.float32)
    finite = np.isfinite(x).reshape(len(x), -1).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise RebirthError(f"{path}: {len(bad)} image(s) hold NaN or Inf values (first: row "
                           f"{bad[0]})")
    return x


def imagenet_photos_dir() -> Path:
    """The 20 ImageNet photos shipped in the foolbox wheel, extracted once into the cache."""
    target = zoo.cache_dir() / "imagenet-photos"
    if target.exists() and any(target.glob("*.jpg")):
        return target
    logger.info(f"[calib] fetching ImageNet sample photos ({FOOLBOX_WHEEL} wheel) into {target}")
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q",
                               "-d", tmp, FOOLBOX_WHEEL], capture_output=True, text=True)
        wheels = glob.glob(os.path.join(tmp, "*.whl"))
        if proc.returncode != 0 or not wheels:
            raise RebirthError(f"cannot fetch {FOOLBOX_WHEEL} for sample images "
                               f"({(proc.stderr.strip().splitlines() or ['no wheel'])[-1]}); "
                               "pass --calib DIR with your own images")
        partial = target.with_name(target.name + ".partial")
        partial.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheels[0]) as wheel:
            for name in wheel.namelist():
                if name.startswith("foolbox/data/imagenet_") and name.endswith(".jpg"):
                    (partial / os.path.basename(name)).write_bytes(wheel.read(name))
        os.replace(partial, target)
    return target


def default_image_count(model) -> int:
    """Calibration images when none are asked for: sized for the model (CALIBRATION_MACS),
    a multiple of 64 within DEFAULT_IMAGES. Small models get more images (accuracy keeps
    improving past 2048 for fmnist-inception, but 2048 is what keeps its fine-tune within
    5 minutes: the table against unlabeled images); big ones the
    floor, where the fine-tune's time, not the images, is what runs out."""
    from .train import function_macs

    macs = max(function_macs(model.mod["main"]), 1)
    low, high = DEFAULT_IMAGES
    return int(min(high, max(low, CALIBRATION_MACS // macs // 64 * 64)))


def calibration_images(model, source=None, count=256, seed=0) -> tuple[np.ndarray, str]:
    """(images NCHW float32, description) for fitting; zoo models have a default source."""
    shape = model.input_shapes[model.input_name]
    entry = model.zoo_entry
    if source:
        path = Path(source)
        if path.is_dir():
            x = images_from_folder(path, shape, count, entry)
            return x, f"{len(x)} images from {path}"
        if path.suffix == ".npy":
            x = images_from_npy(path, shape, count)
            return x, f"{len(x)} images from {path}"
        raise RebirthError(f"{source}: --calib must be a folder of images or a .npy array")
    if entry is None:
        raise RebirthError(f"{model.path}: this plan has learned (non-exact) sites; pass "
                           "--calib DIR (JPEG/PNG images) or --calib FILE.npy")
    if entry.calibration == "fashion-mnist":
        x, _, description = _fashion_mnist_train(entry, shape, count, seed)
        return x, description
    folder = imagenet_photos_dir()
    x = images_from_folder(folder, shape, count, entry, augment=True, seed=seed)
    return x, f"{count} seeded crops of the {len(list(folder.glob('*.jpg')))} foolbox ImageNet photos"


def _fashion_mnist_train(entry, shape, count, seed):
    from ..frontend.datasets import fashion_mnist

    images, labels = fashion_mnist("train")
    if count > len(images):
        raise RebirthError(f"Fashion-MNIST train has {len(images)} images; asked for {count}")
    idx = np.random.default_rng(seed).choice(len(images), size=count, replace=False)
    return preprocess(images[idx][..., None], entry, shape), labels[idx].astype(np.int64), \
        f"{count} Fashion-MNIST train images (seed {seed})"


def check_labels(mod, labels, count, func_name="main"):
    """Labels for retraining: one class index per image, each below the model's output
    width (checked before any fitting starts, so a bad file fails fast)."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) != count:
        raise RebirthError(f"end-to-end refinement: {labels.size} labels for {count} images")
    shape = [int(d) for d in mod[func_name].ret_ty.shape.values]
    classes = int(np.prod(shape[1:]))
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= classes):
        raise RebirthError(f"end-to-end refinement: labels must lie in 0..{classes - 1} (the "
                           f"model has {classes} outputs), got {int(labels.min())}.."
                           f"{int(labels.max())}")


def labeled_training_images(model, source=None, labels=None, count=4096, seed=1) -> tuple:
    """(images NCHW float32, labels int64, description) for retraining with labels: rows of
    ``source`` (.npy) labeled by ``labels`` (.npy of class indices, same order), or the zoo
    model's own labeled training source."""
    shape = model.input_shapes[model.input_name]
    if labels is None:
        entry = model.zoo_entry
        if source is None and entry is not None and entry.calibration == "fashion-mnist":
            return _fashion_mnist_train(entry, shape, count, seed)
        raise RebirthError(f"{model.name}: no labeled training source; pass --calib FILE.npy "
                           "with --e2e-labels LABELS.npy (one class index per row)")
    if source is None or Path(source).suffix != ".npy":
        raise RebirthError(f"{labels}: --e2e-labels labels the rows of a --calib FILE.npy "
                           "array; pass both")
    x = images_from_npy(source, shape, count)
    try:
        y = np.load(labels, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise RebirthError(f"{labels}: not a readable .npy array ({err})") from None
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise RebirthError(f"{labels}: expected a 1-D array of integer class indices, got "
                           f"{y.dtype} {list(y.shape)}")
    if len(y) < len(x):
        raise RebirthError(f"{labels}: {len(y)} labels for {len(x)} images of {source}")
    y = y[:len(x)].astype(np.int64)
    try:
        check_labels(model.mod, y, len(x))
    except RebirthError as err:
        raise RebirthError(f"{labels}: {err}") from None
    return x, y, f"{len(x)} labeled images from {source}"


def bench_input(model, source=None) -> tuple[np.ndarray, str]:
    """(input, description) every latency comparison runs on: the first image of
    ``source`` (--calib: a folder or .npy), else one real image of a zoo model's calibration
    source, else a seeded standard-normal tensor (a user model without --calib)."""
    shape = model.input_shapes[model.input_name]
    if source:
        x, _ = calibration_images(model, source, count=1)
        return x, f"the first image of {source}"
    if model.zoo_entry is not None:
        x, _ = calibration_images(model, count=1, seed=12345)
        return x, "one real image of the model's calibration source"
    return np.random.default_rng(0).standard_normal(shape).astype("float32"), \
        "seeded standard-normal input (no --calib images)"
