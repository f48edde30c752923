"""Bad inputs raise DatasetError naming the file; skip_bad_cases skips and lists them."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from delinea.datamodules import Atlas8kDataModule, BTCVDataModule, DatasetError
from delinea.testing.phantoms import Phantom, write_atlas8k

Layout = tuple[Path, dict[str, Phantom]]
IMG = "RawData/Training/img"
LABEL = "RawData/Training/label"


def _dm(root: Path, **kwargs) -> BTCVDataModule:
    return BTCVDataModule(root=str(root), resolution=32, batch_size=2, **kwargs)


def _rewrite(path: Path, array: np.ndarray | None = None, affine: np.ndarray | None = None) -> None:
    img = nib.load(str(path))
    data = np.asanyarray(img.dataobj) if array is None else array
    nib.save(nib.Nifti1Image(data, img.affine if affine is None else affine), str(path))


def _setup_all(dm: BTCVDataModule) -> None:
    dm.setup("fit")
    dm.setup("test")


def _damage(root: Path, kind: str) -> tuple[str, str]:
    """Damage case 0001 in one way; return (file name expected in the message, message pattern)."""
    image, label = root / IMG / "img0001.nii.gz", root / LABEL / "label0001.nii.gz"
    if kind == "missing image":
        image.unlink()
        return "img0001.nii.gz", "is missing"
    if kind == "missing label":
        label.unlink()
        return "label0001.nii.gz", "is missing"
    if kind == "shape mismatch":
        _rewrite(label, np.zeros((24, 20, 5), np.uint8))
        return "label0001.nii.gz", "does not match image"
    if kind == "affine mismatch":
        affine = nib.load(str(label)).affine.copy()
        affine[0, 3] += 0.5
        _rewrite(label, affine=affine)
        return "label0001.nii.gz", "affine differs"
    if kind == "corrupt":
        image.write_bytes(b"\x1f\x8b not really gzip")
        return "img0001.nii.gz", "cannot read as NIfTI"
    if kind == "2d":
        _rewrite(image, np.zeros((24, 20), np.int16))
        return "img0001.nii.gz", "got a 2D array"
    if kind == "4d":
        _rewrite(image, np.zeros((24, 20, 6, 2), np.int16))
        return "img0001.nii.gz", "got a 4D array"
    raise AssertionError(kind)


KINDS = ["missing image", "missing label", "shape mismatch", "affine mismatch", "corrupt", "2d", "4d"]


@pytest.mark.parametrize("kind", KINDS)
def test_bad_case_raises_naming_the_file(btcv_copy: Layout, kind: str) -> None:
    root, _ = btcv_copy
    name, pattern = _damage(root, kind)
    dm = _dm(root)
    with pytest.raises(DatasetError, match=rf"(?s){name}.*{pattern}|{pattern}.*{name}") as info:
        _setup_all(dm)
    assert isinstance(info.value, ValueError)
    with pytest.raises(DatasetError, match=name):
        dm.load_case("0001")


@pytest.mark.parametrize("kind", KINDS)
def test_skip_bad_cases_skips_and_lists(btcv_copy: Layout, kind: str) -> None:
    root, phantoms = btcv_copy
    name, _ = _damage(root, kind)
    dm = _dm(root, skip_bad_cases=True)
    with pytest.warns(UserWarning, match=r"(?s)btcv: skipped 1 bad case.*0001"):
        _setup_all(dm)
    assert list(dm.skipped_cases) == ["0001"] and name in dm.skipped_cases["0001"]
    used = dm.train_cases() + dm.val_cases() + dm.test_cases()
    assert sorted(used) == sorted(set(phantoms) - {"0001"})


def test_unknown_label_ids_raise_or_are_ignored(btcv_copy: Layout) -> None:
    root, _phantoms = btcv_copy
    path = root / LABEL / "label0002.nii.gz"
    data = np.asanyarray(nib.load(str(path)).dataobj).copy()
    data[0, 0, 0], data[1, 0, 0] = 42, 17
    _rewrite(path, data)
    with pytest.raises(DatasetError, match=r"label0002\.nii\.gz: label ids \[17, 42\] are not in this dataset's table"):
        _dm(root).load_case("0002")
    with pytest.warns(UserWarning, match=r"label ids \[17, 42\].*mapped to background"):
        case = _dm(root, ignore_unknown_labels=True).load_case("0002")
    assert case.label.max() <= 8
    # With empty_slice_ratio every training label is read at setup: the bad case is caught (or skipped) there.
    dm = _dm(root, empty_slice_ratio=0.1, skip_bad_cases=True)
    with pytest.warns(UserWarning, match="skipped"):
        dm.setup("fit")
    assert "0002" in dm.split["train"] and "0002" in dm.skipped_cases and "0002" not in dm.train_cases()


def test_non_integer_labels_are_refused(btcv_copy: Layout) -> None:
    root, _ = btcv_copy
    path = root / LABEL / "label0003.nii.gz"
    _rewrite(path, np.asanyarray(nib.load(str(path)).dataobj).astype(np.float32) + 0.5)
    with pytest.raises(DatasetError, match=r"label0003\.nii\.gz: label values must be integers"):
        _dm(root).load_case("0003")


def test_missing_or_empty_root(tmp_path: Path) -> None:
    with pytest.raises(
        DatasetError, match=rf"btcv: root {tmp_path / 'nope'} is not a folder\. Expected layout: <root>/RawData"
    ):
        BTCVDataModule(root=str(tmp_path / "nope"))
    with pytest.raises(DatasetError, match=rf"btcv: no cases found in {tmp_path}\. Expected layout"):
        BTCVDataModule(root=str(tmp_path)).setup("fit")
    (tmp_path / "RawData/Training/img").mkdir(parents=True)
    with pytest.raises(DatasetError, match="btcv: no cases found"):
        BTCVDataModule(root=str(tmp_path)).setup("fit")
    with pytest.raises(DatasetError, match="atlas8k: no cases found"):
        Atlas8kDataModule(root=str(tmp_path)).setup("fit")


def test_atlas_missing_organ_file_and_label_only_cases(tmp_path: Path) -> None:
    write_atlas8k(tmp_path, n=4, per_organ=True)
    (tmp_path / "BDMAP_00000002/segmentations/pancreas.nii.gz").unlink()
    (tmp_path / "BDMAP_00000003/ct.nii.gz").unlink()  # AbdomenAtlas 1.1 cases that ship labels only
    with pytest.raises(
        DatasetError,
        match=r"BDMAP_00000002/segmentations/pancreas\.nii\.gz is missing|BDMAP_00000003/ct\.nii\.gz is missing",
    ):
        dm = Atlas8kDataModule(root=str(tmp_path), resolution=32)
        dm.setup("fit")
    dm = Atlas8kDataModule(root=str(tmp_path), resolution=32, skip_bad_cases=True)
    with pytest.warns(UserWarning):
        dm.setup("fit")
    assert sorted(dm.skipped_cases) == ["BDMAP_00000002", "BDMAP_00000003"]


def test_split_file_naming_unknown_cases(btcv: Layout, tmp_path: Path) -> None:
    split = tmp_path / "split.json"
    split.write_text('{"train": ["0001", "9999"], "val": [], "test": []}')
    with pytest.raises(DatasetError, match=r"split\.json: the split names 1 case\(s\) not found.*9999"):
        _ = _dm(btcv[0], split_file=str(split)).split
    split.write_text("not json")
    with pytest.raises(DatasetError, match=r"split\.json: cannot read the split file"):
        _ = _dm(btcv[0], split_file=str(split)).split


@pytest.mark.parametrize(("kwargs", "pattern"), [
    ({"resolution": 30}, "resolution must be a positive multiple of 8.*30"),
    ({"resolution": [256, 0]}, r"resolution must be.*\[256, 0\]"),
    ({"batch_size": 0}, "batch_size must be a positive integer, got 0"),
    ({"num_workers": -1}, "num_workers must be a non-negative integer, got -1"),
    ({"window": (250.0, -175.0)}, r"window must be \(low, high\) with low < high"),
    ({"empty_slice_ratio": 1.0}, r"empty_slice_ratio must be in \[0, 1\) or None, got 1.0"),
])  # fmt: skip
def test_arguments_are_validated_early(btcv: Layout, kwargs: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        BTCVDataModule(root=str(btcv[0]), **kwargs)
