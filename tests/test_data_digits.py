"""The quickstart dataset: sklearn digits as a fixed-split ImageFolder, idempotent."""

import subprocess
import sys
from pathlib import Path

from workloads.volo.data import scan_image_folder
from workloads.volo.digits import write_digits

ROOT = Path(__file__).resolve().parents[1]


def test_digits_imagefolder_split_and_idempotence(tmp_path):
    out = tmp_path / "digits"
    m1 = write_digits(out)
    train, val = scan_image_folder(out / "train"), scan_image_folder(out / "val")
    assert train.classes == val.classes == tuple(str(i) for i in range(10))
    assert len(train) + len(val) == 1797 and len(val) == m1["val"]
    assert abs(len(val) / 1797 - 0.2) < 0.01
    assert not set(map(lambda p: Path(p).name, train.files)) & set(
        map(lambda p: Path(p).name, val.files))
    before = sorted(p.stat().st_mtime_ns for p in out.rglob("*.png"))
    m2 = write_digits(out)  # second run: nothing rewritten
    assert m2 == m1 and sorted(p.stat().st_mtime_ns for p in out.rglob("*.png")) == before


def test_digits_cli_refuses_other_settings_and_non_empty_dirs(tmp_path):
    out = tmp_path / "d"
    write_digits(out)
    r = subprocess.run([sys.executable, "-m", "workloads.volo.digits", "--out", str(out),
                        "--seed", "3"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "seed" in r.stderr
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    r = subprocess.run([sys.executable, "-m", "workloads.volo.digits", "--out", str(other)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "not empty" in r.stderr
    assert (other / "keep.txt").read_text() == "mine"
