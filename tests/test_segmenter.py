"""``delinea.Segmenter``: arrays and files segmented alike and as ``delinea predict`` segments them, probabilities on
the input's grid, and every checkpoint and scan read once per command."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import nibabel as nib
import numpy as np
import pytest
import torch

import delinea
import delinea.datamodules.index
import delinea.datamodules.utils
import delinea.models.weights
import delinea.segmenter
from delinea import Segmenter
from delinea.datamodules import FolderDataModule
from delinea.errors import OptionError
from delinea.geometry import Plan
from delinea.labels import NUM_CLASSES
from delinea.main import main
from delinea.tasks import MedDelineaTask, UNetTask
from delinea.tasks.export import save_model_folder
from delinea.testing.backbones import write_backbones
from delinea.testing.phantoms import make_phantom, write_case

QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
UNET = {"channels": [4, 8, 16], "num_res_units": 1}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A MedDelinea model folder over backbone folders (as shipped) and a UNet checkpoint, both at 1 mm, 32 px."""
    root = tmp_path_factory.mktemp("models")
    backbones = write_backbones(root)
    torch.manual_seed(0)
    med = MedDelineaTask(**backbones, image_size=32, control_blocks=2, sampler="ddim", sampling_steps=2)
    med.set_plan(Plan.uniform(1.0, 32))
    save_model_folder(med, root / "meddelinea")
    unet = UNetTask(**UNET)
    unet.set_plan(Plan.uniform(1.0, 32))
    checkpoint: dict[str, Any] = {"state_dict": unet.state_dict(), "hyper_parameters": dict(unet.hparams)}
    unet.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, root / "unet.ckpt")
    return {"meddelinea": root / "meddelinea", "unet": root / "unet.ckpt"}


def write_scan(path: Path, seed: int = 0, orientation: str = "LPS") -> nib.Nifti1Image:
    """A phantom CT stored in another orientation than RAS, as int16 HU."""
    phantom = make_phantom(seed, "ct", orientation)
    stored, affine = phantom.stored(np.round(phantom.image).astype(np.int16))
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(stored, affine), str(path))
    return nib.load(str(path))


def test_an_array_a_file_and_the_cli_segment_alike(
    models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scan = write_scan(tmp_path / "in" / "scan.nii.gz")
    segmenter = Segmenter.from_pretrained(models["meddelinea"])
    assert segmenter.window == 32 and segmenter.plan == Plan.uniform(1.0, 32)
    labels = segmenter.predict(np.asanyarray(scan.dataobj), scan.affine, "ct")
    assert labels.shape == scan.shape and labels.dtype == np.uint8
    written = segmenter.predict_files([tmp_path / "in" / "scan.nii.gz"], tmp_path / "python", save_uncertainty=True)
    assert [sorted(files) for files in written] == [["labels", "sidecar", "uncertainty"]]
    main(["predict", "--ckpt", str(models["meddelinea"]), "--data", "scan", "--data.path", str(tmp_path / "in"),
          "--output", str(tmp_path / "cli"), "--save_uncertainty", "true",
          "--trainer.default_root_dir", str(tmp_path / "run"), *QUIET])  # fmt: skip
    for folder in ("python", "cli"):
        seg = nib.load(tmp_path / folder / "scan_seg.nii.gz")
        np.testing.assert_allclose(seg.affine, scan.affine, atol=1e-6)
        np.testing.assert_array_equal(np.asanyarray(seg.dataobj), labels)  # the same voxels, whatever the route
    uncertainty = [nib.load(tmp_path / f / "scan_uncertainty.nii.gz").get_fdata() for f in ("python", "cli")]
    np.testing.assert_array_equal(*uncertainty)
    sidecars = [json.loads((tmp_path / f / "scan_seg.json").read_text()) for f in ("python", "cli")]
    assert {**sidecars[0], "files": None} == {**sidecars[1], "files": None}  # the same record but for the folder
    assert sidecars[0]["model"] == "MedDelineaTask" and sidecars[0]["plan"]["window"] == [32]
    with pytest.raises(FileExistsError, match="scan_seg"):  # nothing is overwritten unless asked
        segmenter.predict_files(tmp_path / "in", tmp_path / "python")
    sidecar = (tmp_path / "python" / "scan_seg.json").read_bytes()
    monkeypatch.setattr(delinea.segmenter, "check_outputs", lambda *args: None)  # Segmenter.write's own refusal
    with pytest.raises(FileExistsError, match="scan_seg"):
        segmenter.predict_files(tmp_path / "in", tmp_path / "python")
    assert (tmp_path / "python" / "scan_seg.json").read_bytes() == sidecar  # refused before anything was removed


def test_probabilities_and_uncertainty_come_back_on_the_input_grid(models: dict[str, Path], tmp_path: Path) -> None:
    scan = write_scan(tmp_path / "scan.nii.gz", seed=1, orientation="PSL")
    segmenter = Segmenter.from_pretrained(models["unet"])
    result = segmenter.predict(torch.as_tensor(np.asanyarray(scan.dataobj)), scan.affine, "ct", probabilities=True)
    assert result.probabilities.shape == (NUM_CLASSES, *scan.shape) and result.uncertainty.shape == scan.shape
    np.testing.assert_allclose(result.probabilities.sum(0), 1.0, atol=1e-4)
    np.testing.assert_array_equal(result.probabilities.argmax(0), result.labels)
    assert 0 <= result.uncertainty.min() and result.uncertainty.max() <= 1
    np.testing.assert_array_equal(result.labels, segmenter.predict(np.asanyarray(scan.dataobj), scan.affine))
    with pytest.raises(OptionError, match=r"volume must be a 3D array \(X, Y, Z\), got shape \(4, 4\)"):
        segmenter.predict(np.zeros((4, 4)), np.eye(4))


def test_options_replace_the_models_and_training_ones_are_dropped(models: dict[str, Path]) -> None:
    segmenter = Segmenter.from_pretrained(models["meddelinea"], ensemble=3, sampling_steps=1)
    task = segmenter.task
    assert (task.hparams.ensemble, task.hparams.sampling_steps) == (3, 1) and not task.training
    assert task.segmenter is segmenter and "init_from" not in {k for k, v in task.hparams.items() if v}


def test_a_task_segments_whole_cases_only_through_a_segmenter(models: dict[str, Path], tmp_path: Path) -> None:
    root = tmp_path / "data"
    write_case(make_phantom(0, "ct"), root / "images" / "a.nii.gz", root / "labels" / "a.nii.gz", None)
    task = UNetTask(**UNET)
    task.set_plan(Plan.uniform(1.0, 32))
    dm = FolderDataModule(root=str(root), split="all", modality="ct", split_file=str(tmp_path / "split.json"))
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(OptionError, match=r"through a delinea\.Segmenter: attach one with delinea\.Segmenter\(task\)"):
        trainer.test(task, dm)
    Segmenter(task).prepare(dm, "test")
    assert dm.plan == task.plan  # given by the Segmenter: the datamodule does not read the model
    (metrics,) = trainer.test(task, dm)
    assert 0 <= metrics["test/mDSC"] <= 1 and len(task.test_rows) == 8  # one row per organ of the one case


class Reads:
    """Counts the whole-volume and weight-file reads of a command by the file read."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.counts: Counter[str] = Counter()
        self.monkeypatch = monkeypatch
        self.wrap(torch, "load")  # checkpoints (delinea's reading and Lightning's)
        self.wrap(delinea.models.weights, "load_file")  # model folders' and backbone folders' safetensors
        for module in (delinea.io, delinea.datamodules.utils, delinea.datamodules.index):
            self.wrap(module, "read_volume")  # whole scans and labels

    def wrap(self, module: Any, name: str) -> None:
        original: Callable[..., Any] = getattr(module, name)

        def counted(path: Any, *args: Any, **kwargs: Any) -> Any:
            where = path if isinstance(path, (str, Path)) else getattr(path, "name", repr(path))
            self.counts[str(Path(where).resolve())] += 1
            return original(path, *args, **kwargs)

        self.monkeypatch.setattr(module, name, counted)

    def run(self, argv: list[str]) -> Counter[str]:
        self.counts.clear()
        main(argv)
        return Counter(self.counts)


def test_every_checkpoint_and_scan_is_read_once_per_command(
    models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "data"
    cases = [root / kind / f"{c}.nii.gz" for c in ("a", "b") for kind in ("images", "labels")]
    for seed, c in enumerate(("a", "b")):
        write_case(make_phantom(seed, "ct"), root / "images" / f"{c}.nii.gz", root / "labels" / f"{c}.nii.gz", None)
    data = ["--data", "folder", "--data.root", str(root), "--data.split", "all", "--data.modality", "ct",
            "--data.split_file", str(tmp_path / "split.json")]  # fmt: skip
    reads = Reads(monkeypatch)
    weights = sorted(models["meddelinea"].glob("*.safetensors"))
    backbones = sorted((models["meddelinea"].parent / "dit").glob("*.safetensors"))
    backbones += sorted((models["meddelinea"].parent / "vae").glob("*.safetensors"))
    # test: the checkpoint, each image and each label once (labels and images reach the report through the batches)
    for model in ("unet", "meddelinea"):
        counts = reads.run(["test", "--ckpt", str(models[model]), *data, "--output", str(tmp_path / f"test_{model}"),
                            "--trainer.default_root_dir", str(tmp_path / "runs"), *QUIET])  # fmt: skip
        files = [models["unet"]] if model == "unet" else weights + backbones
        assert counts == Counter({str(p.resolve()): 1 for p in [*files, *cases]}), model
    # predict: the model folder, its backbones and the scan once
    counts = reads.run(["predict", "--ckpt", str(models["meddelinea"]), "--data", "scan", "--data.path",
                        str(root / "images" / "a.nii.gz"), "--output", str(tmp_path / "pred"),
                        "--trainer.default_root_dir", str(tmp_path / "runs"), *QUIET])  # fmt: skip
    assert counts == Counter({str(p.resolve()): 1 for p in [*weights, *backbones, cases[0]]})
    # fit, resumed: the checkpoint it resumes from once
    fit = ["fit", "--model", "UNetTask", *[f"--model.{k}={json.dumps(v)}" for k, v in UNET.items()], *data,
           "--data.resolution", "32", "--data.spacing", "1.0", "--trainer.limit_val_batches", "0",
           "--trainer.default_root_dir", str(tmp_path / "fit"), "--trainer.logger", "false", *QUIET]  # fmt: skip
    reads.run([*fit, "--trainer.max_steps", "1"])
    (last,) = (tmp_path / "fit").rglob("*.ckpt")
    counts = reads.run([*fit, "--trainer.max_steps", "2", "--ckpt_path", str(last)])
    assert counts[str(last.resolve())] == 1
    assert {p: n for p, n in counts.items() if p in {str(c.resolve()) for c in cases}} == {
        str(c.resolve()): 1 for c in cases
    }  # the training data once too


def test_the_segmenter_is_the_packages_public_api() -> None:
    assert delinea.Segmenter is Segmenter and "Segmenter" in delinea.__all__
    with pytest.raises(AttributeError, match="no attribute 'Segmentr'"):
        _ = delinea.Segmentr  # type: ignore[attr-defined]  # a typo under test
