"""ScanDataModule: predict on a NIfTI file, a folder of them, or a DICOM series; write predictions back."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import nibabel as nib
import numpy as np
import pytest
import torch

from delinea.datamodules import DatasetError, PredictBatch, ScanDataModule
from delinea.geometry import Plan, Region, resolve_plan
from delinea.io import save_nifti
from delinea.testing.phantoms import make_phantom, write_dicom_series
from delinea.volumes import VolumeAssembler


def _write(path: Path, orientation: str = "LPS", seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    phantom = make_phantom(seed, "ct", orientation)
    stored, affine = phantom.stored(np.round(phantom.image).astype(np.int16))
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(stored, affine), str(path))
    return stored, affine


def test_single_file_predict_batches_and_load_case(tmp_path: Path) -> None:
    _write(tmp_path / "scan.nii.gz")
    dm = ScanDataModule(str(tmp_path / "scan.nii.gz"), resolution=32, batch_size=4, spacing=0.8)
    batches = list(dm.predict_dataloader())
    assert [len(b["case_id"]) for b in batches] == [4, 2]
    batch = batches[0]
    assert set(batch) == set(PredictBatch.__annotations__)  # the typed contract, exactly
    # whole slices at 0.8 mm: the body box (the phantom's whole 38.4 x 28 mm) + 10 mm a side, aspect kept
    rows, cols = Region.from_tensor(batch["region"][0]).size
    assert abs(rows * 0.8 - 58.4) <= 1.6 and abs(cols * 0.8 - 48.0) <= 1.6
    assert batch["image"].shape == (4, 1, rows, cols) and batch["image"].dtype == torch.float32
    assert batch["case_id"] == ["scan"] * 4 and batch["slice_index"].tolist() == [0, 1, 2, 3]
    case = dm.load_case("scan")
    assert case.label is None and not case.labelled.any() and case.modality == "ct"
    assert case.image.shape == (24, 20, 6) and dm.predict_cases() == dm.test_cases() == ["scan"]


def test_folder_of_scans_and_prediction_written_on_the_input_grid(tmp_path: Path) -> None:
    stored = {
        name: _write(tmp_path / "in" / f"{name}.nii.gz", o, i)
        for i, (name, o) in enumerate([("a", "PSL"), ("b", "LPI")])
    }
    dm = ScanDataModule(str(tmp_path / "in"), resolution=48, batch_size=5, spacing=1.0)
    assembler = VolumeAssembler(dm.case_geometry)
    done = {}
    for batch in dm.predict_dataloader():
        bright = (batch["image"] > 0).float()  # a "prediction": class 1 where the image is bright
        probabilities = torch.cat([1 - bright, bright], 1)
        for case in assembler.add(batch, probabilities, bright[:, 0]):
            done[case.case_id] = case
    assert list(done) == ["a", "b"] and not assembler.incomplete()
    for case_id, predicted in done.items():
        case = dm.load_case(case_id)
        assert predicted.geometry.canonical_shape == case.geometry.canonical_shape
        volume = predicted.labels
        out = save_nifti(
            case.geometry.to_original(volume).astype(np.uint8),
            case.geometry.original_affine,
            tmp_path / "out" / f"{case_id}.nii.gz",
        )
        written = nib.load(str(out))
        image, affine = stored[case_id]
        assert written.shape == image.shape
        np.testing.assert_allclose(written.affine, affine, atol=1e-6)
        # Thresholding at 0 in [-1, 1] is 37.5 HU in the default window. Through the slices resampled to 1 mm and
        # back the voxels agree up to interpolation at edges; straight from the canonical case they agree exactly.
        truth = image > 37.5
        assert (np.asanyarray(written.dataobj).astype(bool) == truth).mean() > 0.9
        np.testing.assert_array_equal(case.geometry.to_original(case.image > 0), truth)


def test_dicom_series_folder(tmp_path: Path) -> None:
    phantom = make_phantom(0, "ct", "LPS")
    write_dicom_series(np.round(phantom.image), phantom.affine, tmp_path / "series")
    dm = ScanDataModule(str(tmp_path / "series"), resolution=32, batch_size=8, spacing=1.5)
    batch = next(iter(dm.predict_dataloader()))
    assert batch["case_id"] == ["series"] * 6
    case = dm.load_case("series")
    np.testing.assert_allclose(case.geometry.canonical_affine, phantom.affine, atol=1e-4)
    expected = np.clip((np.round(phantom.image) + 175) / 425 * 2 - 1, -1, 1)
    np.testing.assert_allclose(case.image, expected, atol=1e-5)


def test_bad_scan_inputs(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"nope\.nii\.gz: no such file or folder"):
        ScanDataModule(str(tmp_path / "nope.nii.gz"))
    text = tmp_path / "notes.txt"
    text.write_text("hi")
    with pytest.raises(DatasetError, match=r"notes\.txt: not a NIfTI file"):
        ScanDataModule(str(text)).setup("predict")
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "x.dcm").write_bytes(b"not dicom at all")
    with pytest.raises(DatasetError, match=r"junk: no readable DICOM"):
        ScanDataModule(str(junk)).setup("predict")
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"garbage")
    with pytest.raises(DatasetError, match=r"bad\.nii\.gz: cannot read as NIfTI"):
        ScanDataModule(str(bad)).setup("predict")
    with pytest.raises(ValueError, match="modality must be 'ct', 'mr' or 'auto'"):
        ScanDataModule(str(bad), modality="xray")  # type: ignore[arg-type]  # the bad value under test


class _MeanModel(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(()))

    def predict_step(self, batch: dict, batch_idx: int) -> list[tuple[str, int]]:
        return list(zip(batch["case_id"], batch["slice_index"].tolist()))


def test_lightning_predict_gets_every_slice_in_order(tmp_path: Path) -> None:
    _write(tmp_path / "s" / "one.nii.gz")
    _write(tmp_path / "s" / "two.nii.gz", "RAS", 1)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_checkpointing=False
    )
    out = trainer.predict(
        _MeanModel(), datamodule=ScanDataModule(str(tmp_path / "s"), resolution=32, batch_size=4, spacing=2.0)
    )
    assert [x for batch in out for x in batch] == [(c, k) for c in ("one", "two") for k in range(6)]


def test_without_a_model_plan_the_scan_needs_a_spacing(tmp_path: Path) -> None:
    _write(tmp_path / "scan.nii.gz")
    with pytest.raises(DatasetError, match="no model plan and no training cases to plan a spacing from"):
        ScanDataModule(str(tmp_path / "scan.nii.gz")).predict_dataloader()
    dm = ScanDataModule(str(tmp_path / "scan.nii.gz"), spacing=1.6)
    assert resolve_plan(None, "predict", dm.plan_request()).plan == Plan.uniform(1.6, 256)
    # a checkpoint's plan wins; an explicit spacing that contradicts it is refused, naming both
    model = Plan({"ct": 3.0}, (64,))
    assert resolve_plan(model, "predict", ScanDataModule(str(tmp_path / "scan.nii.gz")).plan_request()).plan == model
    with pytest.raises(DatasetError, match=r"spacing=1\.6 .* disagrees with the model's plan \(ct 3 mm"):
        resolve_plan(model, "predict", dm.plan_request())
