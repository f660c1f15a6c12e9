"""Write scikit-learn's bundled ``load_digits`` images as an ImageFolder quickstart dataset.

    python -m workloads.volo.digits --out data/digits

gives ``data/digits/{train,val}/{0..9}/NNNN.png``: 1,797 real 8x8 grey-level scans of
handwritten digits (no download: the data ships inside scikit-learn), upscaled to 32x32 RGB
so the same pipeline as ImageNet reads them. The train/val split is stratified with a fixed
seed, so every run and every machine gets the same files. Running it again is a no-op when
the directory already holds the same split (checked by a manifest), and a directory holding
anything else is refused rather than overwritten.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

__all__ = ["write_digits"]

_MANIFEST = "digits.json"


def _split(labels: np.ndarray, val_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of validation samples: the same fraction of every class."""
    rng = np.random.default_rng(seed)
    is_val = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        is_val[idx[: round(len(idx) * val_fraction)]] = True
    return is_val


def _to_png(img8: np.ndarray, size: int) -> bytes:
    import io

    from PIL import Image

    # load_digits pixels are 0..16 ink counts; scale to 0..255 grey, upsample smoothly.
    grey = Image.fromarray(np.round(img8 * (255.0 / 16.0)).astype(np.uint8), mode="L")
    rgb = grey.resize((size, size), Image.BICUBIC).convert("RGB")
    buf = io.BytesIO()
    rgb.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def write_digits(out: Path, val_fraction: float = 0.2, seed: int = 0, size: int = 32) -> dict:
    """Create (or confirm) the dataset at ``out``; returns the manifest."""
    from sklearn.datasets import load_digits

    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if size < 8:
        raise ValueError(f"size must be >= 8 pixels, got {size}")
    digits = load_digits()
    images, labels = digits.images, digits.target.astype(int)
    is_val = _split(labels, val_fraction, seed)
    want = {
        "source": "sklearn.datasets.load_digits",
        "val_fraction": val_fraction,
        "seed": seed,
        "size": size,
        "train": int((~is_val).sum()),
        "val": int(is_val.sum()),
        "classes": [str(c) for c in range(10)],
    }
    out = Path(out)
    manifest = out / _MANIFEST
    if manifest.is_file():
        have = json.loads(manifest.read_text())
        if {k: have.get(k) for k in want} == want:
            return have
        diff = ", ".join(f"{k}: {have.get(k)!r} there, {want[k]!r} asked"
                         for k in want if have.get(k) != want[k])
        raise FileExistsError(
            f"{out} already holds a digits dataset made with other settings ({diff}); "
            "remove it or choose another --out"
        )
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose an empty or new --out")

    # Build beside the target and rename, so an interrupted run never leaves a half dataset
    # that a later run would mistake for a finished one.
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    digest = hashlib.sha256()
    for i, (img, label, val) in enumerate(zip(images, labels, is_val, strict=True)):
        d = tmp / ("val" if val else "train") / str(label)
        d.mkdir(parents=True, exist_ok=True)
        png = _to_png(img, size)
        digest.update(png)
        (d / f"{i:04d}.png").write_bytes(png)
    want["sha256"] = digest.hexdigest()
    (tmp / _MANIFEST).write_text(json.dumps(want, indent=2) + "\n")
    if out.exists():
        out.rmdir()  # empty, checked above
    os.rename(tmp, out)
    return want


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path, help="dataset root to create")
    ap.add_argument("--val_fraction", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=0, help="split seed")
    ap.add_argument("--size", type=int, default=32, help="output image side in pixels")
    a = ap.parse_args(argv)
    try:
        m = write_digits(a.out, a.val_fraction, a.seed, a.size)
    except (FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"out": str(a.out), "train": m["train"], "val": m["val"],
                      "sha256": m["sha256"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
