"""ImageFolder scan errors, deterministic per-sample augmentation, eval pipeline, mixing."""

import numpy as np
import pytest
from PIL import Image

from workloads.volo.data import (
    DataError,
    TrainAugment,
    eval_dataset,
    load_image,
    mix_batch,
    scan_image_folder,
    soft_targets,
)


def _folder(root, classes=("a", "b"), n=3, size=20):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(n):
            arr = rng.integers(0, 255, (size, size + 4, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / c / f"{i}.png")
    return root


def test_scan_sorted_classes_and_labels(tmp_path):
    idx = scan_image_folder(_folder(tmp_path / "train", classes=("zeta", "alpha")))
    assert idx.classes == ("alpha", "zeta")
    assert len(idx) == 6 and list(idx.labels) == [0, 0, 0, 1, 1, 1]


def test_missing_dir_and_empty_class_name_the_path(tmp_path):
    with pytest.raises(DataError, match=str(tmp_path / "nope")):
        scan_image_folder(tmp_path / "nope")
    root = _folder(tmp_path / "train")
    (root / "empty").mkdir()
    with pytest.raises(DataError, match=r"class folder .*empty has no images"):
        scan_image_folder(root)
    (tmp_path / "flat").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        scan_image_folder(tmp_path / "flat")


def test_corrupt_image_names_the_file(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DataError, match="bad.png"):
        load_image(str(bad))


def test_augment_is_a_function_of_its_seed():
    img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 50, 3), np.uint8))
    aug = TrainAugment(image_size=16, hflip=0.5, color_jitter=0.4, re_prob=0.5,
                       auto_augment="randaug-m9-mstd0.5-inc1")
    a = aug(img, np.random.default_rng([1, 2, 3]))
    b = aug(img, np.random.default_rng([1, 2, 3]))
    c = aug(img, np.random.default_rng([1, 2, 4]))
    assert a.shape == (3, 16, 16) and a.dtype == np.float32
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_unknown_auto_augment_is_an_error():
    with pytest.raises(DataError, match="augmix"):
        TrainAugment(image_size=16, auto_augment="augmix-m5")


def test_eval_pipeline_shapes_and_sharding(tmp_path):
    idx = scan_image_folder(_folder(tmp_path / "val", n=5))
    seen = []
    for rank in range(2):
        ds, _ = eval_dataset(idx, image_size=16, crop_pct=0.875, interpolation="bilinear",
                             mean=[127.5] * 3, std=[127.5] * 3, batch_size=4, rank=rank,
                             world_size=2, num_workers=1)
        for images, labels in ds.create_tuple_iterator(num_epochs=1, output_numpy=True):
            assert images.shape[1:] == (3, 16, 16) and images.dtype == np.float32
            seen += list(labels)
    assert sorted(seen) == sorted(idx.labels.tolist())  # each image once over the ranks


def test_mix_batch_targets_are_distributions():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 3, 8, 8)).astype(np.float32)
    y = np.array([0, 1, 2, 3, 4, 5])
    t = soft_targets(y, 10, 0.1)
    assert np.allclose(t.sum(1), 1.0) and np.isclose(t[0, 0], 0.91)
    for seed in range(6):
        xm, tm = mix_batch(x, y, 10, 0.1, mixup=0.2, cutmix=1.0, cutmix_prob=1.0,
                           rng=np.random.default_rng(seed))
        assert xm.shape == x.shape and np.allclose(tm.sum(1), 1.0)
        assert not np.array_equal(xm, x)
    xm, tm = mix_batch(x, y, 10, 0.0, 0.0, 0.0, 1.0, np.random.default_rng(0))
    assert np.array_equal(xm, x) and np.array_equal(tm.argmax(1), y)
