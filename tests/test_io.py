"""Volume reading/writing: canonical orientation, exact round trips, DICOM series, bad inputs."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from delinea.io import DatasetError, Geometry, read_geometry, read_volume, save_nifti
from delinea.labels import ORGAN_IDS
from delinea.testing.phantoms import ORIENTATIONS, make_phantom, write_dicom_series


def _save(array: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


@pytest.mark.parametrize("orientation", [*ORIENTATIONS, "ILA"])
def test_reorientation_round_trip_is_exact(tmp_path: Path, orientation: str) -> None:
    phantom = make_phantom(1, "ct", orientation)
    stored, affine = phantom.stored(np.round(phantom.image).astype(np.int16))
    assert nib.aff2axcodes(affine) == tuple(orientation)
    volume = read_volume(_save(stored, affine, tmp_path / "x.nii.gz"))
    assert volume.array.shape == (24, 20, 6)
    np.testing.assert_array_equal(volume.values(), np.round(phantom.image))  # canonical == the RAS phantom
    np.testing.assert_allclose(volume.geometry.canonical_affine, phantom.affine)
    assert volume.geometry.spacing == pytest.approx((1.6, 1.4, 3.0))
    assert volume.geometry.original_shape == stored.shape
    back = volume.geometry.to_original(volume.array)
    assert back.shape == stored.shape and np.array_equal(back, stored)
    # Same as nibabel's own canonicalisation.
    canonical = nib.as_closest_canonical(nib.load(str(tmp_path / "x.nii.gz")))
    np.testing.assert_array_equal(volume.array, np.asanyarray(canonical.dataobj))


def test_left_kidney_has_smaller_ras_x_after_reorienting_lps(tmp_path: Path) -> None:
    phantom = make_phantom(0, "ct", "LPS")
    stored, affine = phantom.stored(phantom.label)
    # Stored LPS: array axis 0 runs towards the patient's left, so the left kidney has the LARGER stored index.
    left, right = (np.argwhere(stored == ORGAN_IDS[k])[:, 0].mean() for k in ("kidney_left", "kidney_right"))
    assert left > right
    volume = read_volume(_save(stored, affine, tmp_path / "l.nii.gz"))
    world = {}
    for organ in ("kidney_left", "kidney_right", "liver", "spleen"):
        voxels = np.argwhere(volume.array == ORGAN_IDS[organ])
        world[organ] = (volume.geometry.canonical_affine @ np.c_[voxels, np.ones(len(voxels))].T)[0].mean()
    # RAS+: x grows towards the patient's right.
    assert world["kidney_left"] < world["kidney_right"]
    assert world["spleen"] < world["liver"]


def test_scaled_nifti_keeps_stored_dtype_and_applies_scaling(tmp_path: Path) -> None:
    hu = np.arange(-1024, -1024 + 24 * 20 * 6, dtype=np.int32).reshape(24, 20, 6) % 3000 - 1024
    img = nib.Nifti1Image((hu + 1024).astype(np.uint16), np.eye(4))
    img.header.set_slope_inter(1.0, -1024.0)
    nib.save(img, str(tmp_path / "s.nii.gz"))
    volume = read_volume(tmp_path / "s.nii.gz")
    assert volume.array.dtype == np.uint16 and (volume.slope, volume.intercept) == (1.0, -1024.0)
    np.testing.assert_array_equal(volume.values(), hu.astype(np.float32))


def test_uncompressed_nifti_is_memory_mapped(tmp_path: Path) -> None:
    volume = read_volume(_save(np.zeros((8, 8, 4), np.int16), np.eye(4), tmp_path / "m.nii"))
    chain, array = [], volume.array
    while array is not None:
        chain.append(type(array))
        array = getattr(array, "base", None)
    assert np.memmap in chain  # a view of the file, not a copy in memory


def test_trailing_singleton_4d_is_squeezed(tmp_path: Path) -> None:
    array = np.random.default_rng(0).normal(size=(6, 5, 4, 1)).astype(np.float32)
    volume = read_volume(_save(array, np.eye(4), tmp_path / "v4.nii.gz"))
    np.testing.assert_array_equal(volume.values(), array[..., 0])


@pytest.mark.parametrize(("shape", "ndim"), [((6, 5), 2), ((6, 5, 4, 2), 4)])
def test_non_3d_volumes_are_refused(tmp_path: Path, shape: tuple[int, ...], ndim: int) -> None:
    path = _save(np.zeros(shape, np.float32), np.eye(4), tmp_path / "bad.nii.gz")
    with pytest.raises(DatasetError, match=rf"bad\.nii\.gz.*3D volume.*got a {ndim}D"):
        read_volume(path)
    with pytest.raises(DatasetError, match=r"bad\.nii\.gz"):
        read_geometry(path)


def test_corrupt_missing_and_wrong_type_files(tmp_path: Path) -> None:
    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(b"this is not a volume" * 10)
    with pytest.raises(DatasetError, match=r"junk\.nii\.gz: cannot read as NIfTI"):
        read_volume(junk)
    with pytest.raises(DatasetError, match=r"nothere\.nii\.gz: file not found"):
        read_volume(tmp_path / "nothere.nii.gz")
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(DatasetError, match=r"notes\.txt: expected a NIfTI file"):
        read_volume(text)
    # A valid header with truncated data fails when the data are read, naming the file.
    good = _save(
        np.random.default_rng(0).normal(size=(32, 32, 16)).astype(np.float32), np.eye(4), tmp_path / "t.nii.gz"
    )
    raw = gzip.decompress(good.read_bytes())
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(gzip.compress(raw[: len(raw) // 2]))
    read_geometry(truncated)  # the header alone is fine
    with pytest.raises(DatasetError, match=r"truncated\.nii\.gz"):
        read_volume(truncated)


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_dicom_series_matches_the_nifti_it_came_from(tmp_path: Path, orientation: str) -> None:
    phantom = make_phantom(2, "ct", orientation)
    stored, affine = phantom.stored(2 * np.round(phantom.image / 2))  # even values: exact with RescaleSlope 2
    nifti = read_volume(_save(stored.astype(np.int16), affine, tmp_path / "ct.nii.gz"))
    write_dicom_series(stored, affine, tmp_path / "series", slope=2.0, intercept=-2048.0)
    (tmp_path / "series" / "README.txt").write_text("not dicom")  # ignored
    dicom = read_volume(tmp_path / "series")
    assert dicom.array.dtype == np.float32
    np.testing.assert_array_equal(dicom.values(), nifti.values())
    np.testing.assert_allclose(dicom.geometry.canonical_affine, nifti.geometry.canonical_affine, atol=1e-4)
    assert dicom.geometry.spacing == pytest.approx(nifti.geometry.spacing, abs=1e-5)
    assert read_geometry(tmp_path / "series").canonical_shape == (24, 20, 6)


def test_dicom_bad_folders(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match=r"empty: no readable DICOM"):
        read_volume(empty)
    (empty / "a.dcm").write_bytes(b"garbage" * 50)
    with pytest.raises(DatasetError, match=r"empty: no readable DICOM"):
        read_volume(empty)
    phantom = make_phantom(0, "ct", "LPS")
    write_dicom_series(phantom.image[:, :, :3], phantom.affine, tmp_path / "two")
    shifted = phantom.affine.copy()
    shifted[2, 3] += 100
    write_dicom_series(phantom.image[:, :, :3], shifted, tmp_path / "two_b")
    for file in (tmp_path / "two_b").iterdir():
        file.rename(tmp_path / "two" / f"b_{file.name}")
    with pytest.raises(DatasetError, match=r"two: holds 2 DICOM series"):
        read_volume(tmp_path / "two")


def test_save_nifti_refuses_to_overwrite_and_restores_the_input_grid(tmp_path: Path) -> None:
    phantom = make_phantom(0, "ct", "PSL")
    stored, affine = phantom.stored(phantom.image)
    volume = read_volume(_save(stored, affine, tmp_path / "in.nii.gz"))
    prediction = (volume.values() > 0).astype(np.uint8)  # something computed in canonical space
    out = save_nifti(
        volume.geometry.to_original(prediction), volume.geometry.original_affine, tmp_path / "o" / "p.nii.gz"
    )
    written = nib.load(str(out))
    assert written.shape == stored.shape
    np.testing.assert_allclose(written.affine, affine, atol=1e-5)
    np.testing.assert_array_equal(np.asanyarray(written.dataobj), (stored > 0).astype(np.uint8))
    with pytest.raises(FileExistsError, match=r"p\.nii\.gz exists; pass overwrite=True"):
        save_nifti(prediction, affine, out)
    save_nifti(np.zeros(stored.shape, np.uint8), affine, out, overwrite=True)
    assert np.asanyarray(nib.load(str(out)).dataobj).max() == 0
    with pytest.raises(ValueError, match=r"must end in \.nii"):
        save_nifti(prediction, affine, tmp_path / "p.png")


def test_geometry_rejects_wrong_shapes() -> None:
    geometry = Geometry.from_affine(np.diag([-1.0, -1.0, 1.0, 1.0]), (4, 3, 2))
    with pytest.raises(ValueError, match="original shape"):
        geometry.to_canonical(np.zeros((3, 4, 2)))
    with pytest.raises(ValueError, match="canonical shape"):
        geometry.to_original(np.zeros((3, 4, 2)))
