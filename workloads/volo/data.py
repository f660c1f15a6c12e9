"""ImageFolder data for VOLO: file scan, MindCV-like transforms, mindspore.dataset pipelines.

Train augmentation (random resized crop, flips, colour jitter or RandAugment, random erasing)
draws its random numbers from a generator seeded by ``(seed, epoch, sample index)``, and
mixup/cutmix from one seeded by ``(seed, optimizer step, chunk)``. So the pixels a sample
becomes do not depend on which rank reads it, how many worker threads run, or whether the
run was interrupted: the property that exact resume and resize equivalence rest on.
MindSpore's own random vision ops draw from a per-pipeline stream instead, which is why the
random part is done here with PIL/numpy and mindspore.dataset does the reading, parallel
mapping, batching and prefetch. Eval uses mindspore.dataset.vision ops directly.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

__all__ = [
    "DataError",
    "ImageFolderIndex",
    "TrainAugment",
    "eval_dataset",
    "mix_batch",
    "scan_image_folder",
    "soft_targets",
    "train_dataset",
]

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class DataError(ValueError):
    """A problem with the dataset on disk, naming the path; entry points exit non-zero."""


@dataclass(frozen=True)
class ImageFolderIndex:
    root: Path
    files: tuple[str, ...]
    labels: np.ndarray  # int32, one per file
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.files)


def scan_image_folder(root: str | Path) -> ImageFolderIndex:
    """``root/<class>/<image>``; classes sorted by name as torchvision/MindSpore do."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"data directory {root} does not exist (check --data_dir and the split "
                        "names --train_split/--val_split)")
    if not root.is_dir():
        raise DataError(f"data path {root} is not a directory")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"data directory {root} has no class folders; expected "
                        f"{root}/<class name>/<image files>")
    files: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        imgs = sorted(str(p) for p in (root / name).rglob("*")
                      if p.suffix.lower() in IMG_EXTENSIONS and p.is_file())
        if not imgs:
            raise DataError(f"class folder {root / name} has no images (extensions: "
                            f"{', '.join(IMG_EXTENSIONS)}); add images or remove the folder")
        files += imgs
        labels += [label] * len(imgs)
    return ImageFolderIndex(root, tuple(files), np.asarray(labels, np.int32), tuple(classes))


def load_image(path: str) -> Image.Image:
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except Exception as e:  # PIL raises several types for broken files
        raise DataError(f"cannot read image {path}: {type(e).__name__}: {e}; "
                        "replace or delete the file") from e


_INTERP = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC,
           "lanczos": Image.LANCZOS, "area": Image.BOX}


def _interp(name: str) -> int:
    try:
        return _INTERP[name.lower()]
    except KeyError as e:
        raise DataError(f"unknown interpolation {name!r}; use one of {', '.join(_INTERP)}") from e


# ----------------------------------------------------------------------------------------------
# RandAugment (the "randaug-mM-nN-mstdS-incI" policy string of timm/MindCV)


def _rand_sign(rng: np.random.Generator, v: float) -> float:
    return -v if rng.random() < 0.5 else v


def _affine(img: Image.Image, coeffs: tuple[float, ...], fill: tuple[int, ...]) -> Image.Image:
    return img.transform(img.size, Image.AFFINE, coeffs, resample=Image.BILINEAR, fillcolor=fill)


def _rotate(img, level, rng, fill):
    return img.rotate(_rand_sign(rng, level * 30.0), resample=Image.BILINEAR, fillcolor=fill)


def _shear_x(img, level, rng, fill):
    return _affine(img, (1, _rand_sign(rng, level * 0.3), 0, 0, 1, 0), fill)


def _shear_y(img, level, rng, fill):
    return _affine(img, (1, 0, 0, _rand_sign(rng, level * 0.3), 1, 0), fill)


def _translate_x(img, level, rng, fill):
    return _affine(img, (1, 0, _rand_sign(rng, level * 0.45) * img.size[0], 0, 1, 0), fill)


def _translate_y(img, level, rng, fill):
    return _affine(img, (1, 0, 0, 0, 1, _rand_sign(rng, level * 0.45) * img.size[1]), fill)


def _enhance(kind):
    def op(img, level, rng, fill):  # "increasing" variants: factor 1 +- 0.9 * level
        return kind(img).enhance(1.0 + _rand_sign(rng, level * 0.9))
    return op


def _posterize(img, level, rng, fill):
    return ImageOps.posterize(img, max(1, 8 - int(level * 4)))


def _solarize(img, level, rng, fill):
    return ImageOps.solarize(img, 256 - int(level * 256))


def _solarize_add(img, level, rng, fill):
    arr = np.asarray(img).astype(np.int32)
    add = int(level * 110)
    return Image.fromarray(np.where(arr < 128, np.minimum(arr + add, 255), arr).astype(np.uint8))


_RAND_OPS = {
    "AutoContrast": lambda img, level, rng, fill: ImageOps.autocontrast(img),
    "Equalize": lambda img, level, rng, fill: ImageOps.equalize(img),
    "Invert": lambda img, level, rng, fill: ImageOps.invert(img),
    "Rotate": _rotate,
    "Posterize": _posterize,
    "Solarize": _solarize,
    "SolarizeAdd": _solarize_add,
    "Color": _enhance(ImageEnhance.Color),
    "Contrast": _enhance(ImageEnhance.Contrast),
    "Brightness": _enhance(ImageEnhance.Brightness),
    "Sharpness": _enhance(ImageEnhance.Sharpness),
    "ShearX": _shear_x,
    "ShearY": _shear_y,
    "TranslateX": _translate_x,
    "TranslateY": _translate_y,
}


@dataclass(frozen=True)
class RandAugment:
    magnitude: float = 10.0  # out of _MAX_LEVEL
    num_ops: int = 2
    magnitude_std: float = 0.0
    prob: float = 0.5  # per chosen op

    _MAX_LEVEL = 10.0

    @classmethod
    def parse(cls, policy: str) -> RandAugment:
        parts = policy.split("-")
        if parts[0] != "randaug":
            raise DataError(f"auto_augment {policy!r} is not supported; use a 'randaug-...' policy "
                            "such as 'randaug-m9-mstd0.5-inc1', or leave it unset")
        kw: dict[str, Any] = {}
        for p in parts[1:]:
            key, val = p[:1], p[1:]
            if p.startswith("mstd"):
                kw["magnitude_std"] = float(p[4:])
            elif p.startswith("inc") or p.startswith("mmax"):
                continue  # the increasing-severity ops are the only ones implemented
            elif key == "m":
                kw["magnitude"] = float(val)
            elif key == "n":
                kw["num_ops"] = int(val)
            elif key == "w":
                continue
            else:
                raise DataError(f"auto_augment {policy!r}: unknown part {p!r}")
        return cls(**kw)

    def __call__(self, img: Image.Image, rng: np.random.Generator,
                 fill: tuple[int, ...]) -> Image.Image:
        names = list(_RAND_OPS)
        for i in rng.choice(len(names), size=self.num_ops, replace=True):
            if rng.random() > self.prob:
                continue
            m = self.magnitude
            if self.magnitude_std > 0:
                m = rng.normal(m, self.magnitude_std)
            level = min(max(m, 0.0), self._MAX_LEVEL) / self._MAX_LEVEL
            img = _RAND_OPS[names[i]](img, level, rng, fill)
        return img


# ----------------------------------------------------------------------------------------------
# Per-sample train augmentation


@dataclass(frozen=True)
class TrainAugment:
    image_size: int
    scale: Sequence[float] = (0.08, 1.0)
    ratio: Sequence[float] = (0.75, 1.333)
    hflip: float = 0.5
    vflip: float = 0.0
    color_jitter: float | Sequence[float] | None = 0.4
    auto_augment: str | None = None
    interpolation: str = "bilinear"
    mean: Sequence[float] = (0.485 * 255, 0.456 * 255, 0.406 * 255)
    std: Sequence[float] = (0.229 * 255, 0.224 * 255, 0.225 * 255)
    re_prob: float = 0.0
    re_scale: Sequence[float] = (0.02, 0.33)
    re_ratio: Sequence[float] = (0.3, 3.3)
    re_max_attempts: int = 10

    def __post_init__(self) -> None:
        _interp(self.interpolation)
        if self.auto_augment:
            object.__setattr__(self, "_randaug", RandAugment.parse(self.auto_augment))

    def _crop_box(self, w: int, h: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
        area = w * h
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * rng.uniform(self.scale[0], self.scale[1])
            aspect = math.exp(rng.uniform(*log_ratio))
            cw = round(math.sqrt(target * aspect))
            ch = round(math.sqrt(target / aspect))
            if 0 < cw <= w and 0 < ch <= h:
                return int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1)), cw, ch
        # Fallback: central crop at the clamped aspect ratio (as torchvision).
        in_ratio = w / h
        if in_ratio < min(self.ratio):
            cw, ch = w, round(w / min(self.ratio))
        elif in_ratio > max(self.ratio):
            ch, cw = h, round(h * max(self.ratio))
        else:
            cw, ch = w, h
        return (w - cw) // 2, (h - ch) // 2, cw, ch

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> np.ndarray:
        x, y, cw, ch = self._crop_box(img.width, img.height, rng)
        size = (self.image_size, self.image_size)
        img = img.resize(size, _interp(self.interpolation), box=(x, y, x + cw, y + ch))
        if self.hflip > 0 and rng.random() < self.hflip:
            img = ImageOps.mirror(img)
        if self.vflip > 0 and rng.random() < self.vflip:
            img = ImageOps.flip(img)
        if self.auto_augment:
            fill = tuple(min(255, round(v)) for v in self.mean)
            img = self._randaug(img, rng, fill)  # type: ignore[attr-defined]
        elif self.color_jitter:
            img = self._jitter(img, rng)
        arr = (np.asarray(img, np.float32) - np.asarray(self.mean, np.float32)) / np.asarray(
            self.std, np.float32)
        arr = np.ascontiguousarray(arr.transpose(2, 0, 1))
        if self.re_prob > 0 and rng.random() < self.re_prob:
            self._erase(arr, rng)
        return arr

    def _jitter(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        cj = self.color_jitter
        factors = [float(cj)] * 3 if isinstance(cj, (int, float)) else [float(v) for v in cj][:3]
        ops = [ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color]
        for i in rng.permutation(3):
            if factors[i] > 0:
                img = ops[i](img).enhance(rng.uniform(max(0.0, 1 - factors[i]), 1 + factors[i]))
        return img

    def _erase(self, arr: np.ndarray, rng: np.random.Generator) -> None:
        c, h, w = arr.shape
        area = h * w
        log_ratio = (math.log(self.re_ratio[0]), math.log(self.re_ratio[1]))
        for _ in range(self.re_max_attempts):
            target = area * rng.uniform(self.re_scale[0], self.re_scale[1])
            aspect = math.exp(rng.uniform(*log_ratio))
            eh, ew = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if eh < h and ew < w:
                top, left = int(rng.integers(0, h - eh + 1)), int(rng.integers(0, w - ew + 1))
                arr[:, top:top + eh, left:left + ew] = 0.0  # re_value 0 after normalisation
                return


# ----------------------------------------------------------------------------------------------
# mixup / cutmix / label smoothing on a micro-batch


def soft_targets(labels: np.ndarray, num_classes: int, smoothing: float) -> np.ndarray:
    off = smoothing / num_classes
    t = np.full((len(labels), num_classes), off, np.float32)
    t[np.arange(len(labels)), labels] = 1.0 - smoothing + off
    return t


def mix_batch(images: np.ndarray, labels: np.ndarray, num_classes: int, smoothing: float,
              mixup: float, cutmix: float, cutmix_prob: float,
              rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """timm-style batch mixing: pairs sample i with sample n-1-i; returns images, soft targets."""
    targets = soft_targets(labels, num_classes, smoothing)
    if (mixup <= 0 and cutmix <= 0) or rng.random() >= cutmix_prob:
        return images, targets
    use_cutmix = cutmix > 0 and (mixup <= 0 or rng.random() < 0.5)
    lam = float(rng.beta(cutmix, cutmix) if use_cutmix else rng.beta(mixup, mixup))
    flipped = images[::-1]
    if use_cutmix:
        _, _, h, w = images.shape
        cut = math.sqrt(1.0 - lam)
        ch, cw = int(h * cut), int(w * cut)
        cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
        y0, y1 = np.clip([cy - ch // 2, cy + ch // 2], 0, h)
        x0, x1 = np.clip([cx - cw // 2, cx + cw // 2], 0, w)
        images = images.copy()
        images[:, :, y0:y1, x0:x1] = flipped[:, :, y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / float(h * w)  # the area actually pasted
    else:
        images = (images * lam + flipped * (1.0 - lam)).astype(np.float32)
    return images, (targets * lam + targets[::-1] * (1.0 - lam)).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# mindspore.dataset pipelines


class _TrainSource:
    """Random-access source: position i of this rank's stream -> (image CHW, label)."""

    def __init__(self, index: ImageFolderIndex, stream: np.ndarray, epochs: np.ndarray,
                 augment: TrainAugment, seed: int):
        self.index, self.stream, self.epochs = index, stream, epochs
        self.augment, self.seed = augment, seed
        self.error: DataError | None = None
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.stream)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.int32, np.int64]:
        """(image, label, dataset index): the index travels with its image so that the train
        loop reports the samples it was given, not the ones it asked for."""
        idx = int(self.stream[i])
        try:
            img = load_image(self.index.files[idx])
        except DataError as e:
            with self._lock:
                self.error = self.error or e
            raise
        rng = np.random.default_rng([self.seed, int(self.epochs[i]), idx])
        return self.augment(img, rng), self.index.labels[idx], np.int64(idx)


def train_dataset(index: ImageFolderIndex, stream: np.ndarray, epochs: np.ndarray,
                  augment: TrainAugment, micro_batch: int, seed: int,
                  num_workers: int = 2) -> tuple[Any, _TrainSource]:
    """Batches (image, label, dataset index) of this rank's ``stream`` in order; returns
    (dataset, source) so that a caller can read ``source.error`` to name a corrupt file when
    iteration fails."""
    import mindspore.dataset as ds

    source = _TrainSource(index, stream, epochs, augment, seed)
    dataset = ds.GeneratorDataset(source, column_names=["image", "label", "index"],
                                  shuffle=False,
                                  num_parallel_workers=max(1, num_workers),
                                  python_multiprocessing=False)
    return dataset.batch(micro_batch, drop_remainder=True), source


class _EvalSource:
    def __init__(self, index: ImageFolderIndex, positions: np.ndarray):
        self.index, self.positions = index, positions
        self.error: DataError | None = None

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.int32]:
        idx = int(self.positions[i])
        try:
            # PIL decodes (and converts grey/CMYK/palette files to RGB); a broken file is
            # reported by name here rather than as an anonymous error inside the pipeline.
            img = load_image(self.index.files[idx])
        except DataError as e:
            self.error = self.error or e
            raise
        return np.asarray(img, np.uint8), self.index.labels[idx]


def eval_dataset(index: ImageFolderIndex, image_size: int, crop_pct: float, interpolation: str,
                 mean: Sequence[float], std: Sequence[float], batch_size: int,
                 rank: int = 0, world_size: int = 1,
                 num_workers: int = 2) -> tuple[Any, _EvalSource]:
    """Resize to image_size/crop_pct, centre crop, normalise (MindCV's eval transform).

    Rank r evaluates samples r, r+d, r+2d, ...: every sample exactly once over all ranks."""
    import mindspore.dataset as ds
    from mindspore.dataset import vision
    from mindspore.dataset.vision import Inter

    inter = getattr(Inter, interpolation.upper(), Inter.BILINEAR)
    positions = np.arange(rank, len(index), world_size)
    source = _EvalSource(index, positions)
    dataset = ds.GeneratorDataset(source, column_names=["image", "label"], shuffle=False,
                                  num_parallel_workers=max(1, num_workers),
                                  python_multiprocessing=False)
    ops = [
        vision.Resize(int(image_size / crop_pct), interpolation=inter),
        vision.CenterCrop(image_size),
        vision.Normalize(mean=list(mean), std=list(std)),
        vision.HWC2CHW(),
    ]
    dataset = dataset.map(operations=ops, input_columns="image",
                          num_parallel_workers=max(1, num_workers))
    return dataset.batch(batch_size, drop_remainder=False), source
