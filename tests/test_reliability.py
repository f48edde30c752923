"""Bad data, bad options, unreadable and hostile checkpoints: each stops in one line (exit 2) naming the file or
value, before any work, and runs no code from a checkpoint; NaN voxels are refused in training data and replaced
(and recorded) in scans to predict."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from delinea.datamodules import BTCVDataModule, FolderDataModule
from delinea.datamodules.dataset import SliceDataset
from delinea.errors import NonFiniteLossError
from delinea.io import DatasetError
from delinea.main import main
from delinea.testing.phantoms import make_phantom, write_btcv, write_case
from delinea.testing.slices import make_batch

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "tests" / "conf"
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


@pytest.fixture(scope="module")
def btcv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("btcv")
    write_btcv(root, n=4)
    return root


@pytest.fixture(scope="module")
def checkpoints(btcv: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One-step UNet and MedDelinea checkpoints on the tiny BTCV."""
    out = {}
    for name in ("unet", "meddelinea"):
        run = tmp_path_factory.mktemp(name)
        main(["fit", "--config", str(CONF / f"{name}_btcv.yaml"), "--data.root", str(btcv),
              "--data.split_file", str(run / "split.json"), "--trainer.max_steps", "1",
              "--trainer.limit_val_batches", "0", "--trainer.default_root_dir", str(run), *QUIET])  # fmt: skip
        out[name] = next(run.rglob("*.ckpt"))
    return out


def one_line_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run the CLI in-process; it must exit 2 with one ``delinea: error:`` line and no traceback."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.strip()]
    assert not any("Traceback" in line for line in err), err[-5:]
    assert err[-1].startswith("delinea: error:"), err[-5:]
    return err[-1]


def cli(argv: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "delinea", *argv], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)  # fmt: skip


def test_checkpoint_cannot_name_a_module_to_import(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    """Point 4: a weights-only-safe checkpoint naming another class is refused by name; the module it names (a
    file in the working folder, which ``python -m`` puts on the path) is never imported."""
    (tmp_path / "evilmod.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w').write('ran')\nclass X: pass\n")
    for name in ("evilmod.X", "this.Zen"):
        checkpoint = torch.load(checkpoints["unet"], weights_only=True)
        checkpoint["delinea_task"] = name
        checkpoint["hyper_parameters"]["_class_path"] = name
        torch.save(checkpoint, tmp_path / "crafted.ckpt")
        result = cli(["test", "--ckpt", "crafted.ckpt", "--data", "btcv", "--data.root", str(tmp_path)], tmp_path)
        assert result.returncode == 2
        assert f"names task {name!r}, which is not one of delinea's (MedDelineaTask, UNetTask)" in result.stderr
        assert "Beautiful is better" not in result.stdout + result.stderr
    assert not (tmp_path / "ran").exists()


class Payload:
    """Unpickling this touches a file: the proof that pickled code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


def test_pickle_payloads_never_run_even_when_the_environment_asks(
    btcv: Path, checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    """Point 5: with TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1, a payload in a checkpoint given to resume, test or
    init_from does not run: each stops in one line."""
    checkpoint = torch.load(checkpoints["unet"], weights_only=True)
    checkpoint["extra"] = Payload(tmp_path / "ran")
    torch.save(checkpoint, tmp_path / "payload.ckpt")
    data = ["--data.root", str(btcv), "--data.split_file", str(tmp_path / "split.json")]
    runs = [
        ["fit", "--config", str(CONF / "unet_btcv.yaml"), *data, "--ckpt_path", "payload.ckpt"],
        ["test", "--ckpt", "payload.ckpt", "--data", "btcv", *data],
        ["fit", "--config", str(CONF / "unet_btcv.yaml"), *data, "--model.init_from", "payload.ckpt"],
    ]
    for argv in runs:
        result = cli([*argv, "--trainer.default_root_dir", str(tmp_path / "run")], tmp_path,
                     {"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"})  # fmt: skip
        assert result.returncode == 2, result.stderr[-1500:]
        last = result.stderr.strip().splitlines()[-1]
        assert "payload.ckpt" in last and "could run code" in last, last
    assert not (tmp_path / "ran").exists()


@pytest.mark.parametrize(
    ("content", "reason"),
    [(os.urandom(4096), "not a file written by torch.save"), (b"hello\n", "not a file written by torch.save"),
     (b"", "the file is empty")],
    ids=["random-bytes", "text", "empty"],
)  # fmt: skip
def test_unreadable_checkpoints_are_one_line(
    content: bytes, reason: str, btcv: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Point 11: one line naming the file and what is wrong, never advice to switch the safe loader off."""
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(content)
    data = ["--data.root", str(btcv), "--data.split_file", str(tmp_path / "split.json")]
    for argv in (["test", "--ckpt", str(bad), "--data", "btcv", *data],
                 ["fit", "--config", str(CONF / "unet_btcv.yaml"), *data, "--model.init_from", str(bad)]):  # fmt: skip
        line = one_line_error([*argv, "--trainer.default_root_dir", str(tmp_path / "run")], capsys)
        assert str(bad) in line and reason in line, line
        assert "weights_only" not in line


def test_nan_voxels_refused_for_training_and_replaced_for_predict(
    checkpoints: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Point 6: a 5x5 NaN patch in a training image stops fit with the file and the count; a scan with 22 NaN
    voxels is predicted as if they held the scan's lowest value, and the sidecar says so."""
    root = tmp_path / "btcv"
    write_btcv(root, n=4)
    for image_path in (root / "RawData" / "Training" / "img").iterdir():  # every case: the first batch meets one
        image = nib.load(image_path)
        array = np.asarray(image.dataobj).astype(np.float32)
        array[10:15, 10:15, :] = np.nan
        nib.save(nib.Nifti1Image(array, image.affine), image_path)
    line = one_line_error(["fit", "--config", str(CONF / "unet_btcv.yaml"), "--data.root", str(root),
                           "--data.split_file", str(tmp_path / "split.json"), "--data.num_workers", "1",
                           "--trainer.default_root_dir", str(tmp_path / "run"), *QUIET], capsys)  # fmt: skip
    depth = nib.load(image_path).shape[2]
    assert str(image_path.parent) in line and f"{25 * depth} voxel(s) are NaN or infinite" in line, line

    scan = make_phantom(7, "ct")
    clean = scan.image.astype(np.float32)
    nan = clean.copy()
    nan.reshape(-1)[np.random.default_rng(0).choice(nan.size, 22, replace=False)] = np.nan
    filled = np.where(np.isnan(nan), np.nanmin(nan), nan)
    for name, values in (("nan", nan), ("filled", filled)):
        nib.save(nib.Nifti1Image(values, scan.affine), tmp_path / f"{name}.nii.gz")
        main(["predict", "--ckpt", str(checkpoints["unet"]), "--data", "scan", "--data.path",
              str(tmp_path / f"{name}.nii.gz"), "--output", str(tmp_path / "out"), "--trainer.default_root_dir",
              str(tmp_path / "run"), *QUIET])  # fmt: skip
    with_nan = np.asarray(nib.load(tmp_path / "out" / "nan_seg.nii.gz").dataobj)
    assert np.array_equal(with_nan, np.asarray(nib.load(tmp_path / "out" / "filled_seg.nii.gz").dataobj))
    sidecar = json.loads((tmp_path / "out" / "nan_seg.json").read_text())
    assert sidecar["nonfinite_voxels_replaced"] == 22
    assert "nonfinite_voxels_replaced" not in json.loads((tmp_path / "out" / "filled_seg.json").read_text())


def test_a_non_finite_loss_stops_training_naming_the_cases() -> None:
    from delinea.tasks import UNetTask

    task = UNetTask(channels=[4, 8, 16], num_res_units=1)
    batch = make_batch(4, 32)
    batch["image"][2, 0, 5, 5] = float("nan")
    batch["case_id"] = ["a", "b", "c", "d"]
    with pytest.raises(NonFiniteLossError, match=r"training loss is nan at step 0 on cases \['a', 'b', 'c', 'd'\]"):
        task.training_step(batch, 0)


def test_data_errors_name_the_file_in_one_line(
    btcv: Path, checkpoints: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Point 7: a singular affine and a control_blocks mismatch on load, both once tracebacks, now name the
    file; a truncated volume met by a loader worker reaches the user as its own one line."""
    header = nib.Nifti1Header()  # a flat sform and no qform: nibabel writes it, the affine has no inverse
    header.set_data_shape((8, 8, 4))
    header.set_sform(np.diag([1.0, 1.0, 0.0, 1.0]), code=1)
    header.set_qform(None, code=0)
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 4), np.int16), None, header), tmp_path / "flat.nii.gz")
    predict = ["predict", "--ckpt", str(checkpoints["unet"]), "--data", "scan", "--trainer.default_root_dir",
               str(tmp_path)]  # fmt: skip
    line = one_line_error([*predict, "--data.path", str(tmp_path / "flat.nii.gz")], capsys)
    assert str(tmp_path / "flat.nii.gz") in line and "singular or not finite" in line

    data = ["--data.root", str(btcv), "--data.split_file", str(tmp_path / "split.json")]
    line = one_line_error(["test", "--ckpt", str(checkpoints["meddelinea"]), "--data", "btcv", *data,
                           "--model.control_blocks", "1", "--trainer.default_root_dir", str(tmp_path)],
                          capsys)  # fmt: skip
    assert str(checkpoints["meddelinea"]) in line and "control_blocks=1 (checkpoint: 2)" in line, line

    root = tmp_path / "truncated"
    write_btcv(root, n=4)
    for image in (root / "RawData" / "Training" / "img").iterdir():  # headers intact: the loader meets it first
        image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])
    line = one_line_error(["fit", "--config", str(CONF / "unet_btcv.yaml"), "--data.root", str(root),
                           "--data.split_file", str(tmp_path / "s2.json"), "--data.num_workers", "1",
                           "--trainer.default_root_dir", str(tmp_path), *QUIET], capsys)  # fmt: skip
    assert line.startswith(f"delinea: error: {image.parent}") and "truncated" in line, line


def _bad_cases(root: Path) -> dict[str, str]:
    """A BTCV of six cases, three broken in ways only reading the data shows."""
    write_btcv(root, n=6)
    base = root / "RawData" / "Training"
    truncated = base / "img" / "img0002.nii.gz"
    truncated.write_bytes(gzip.compress(gzip.decompress(truncated.read_bytes())[:-5000]))
    label = base / "label" / "label0003.nii.gz"
    raw = nib.load(label)
    values = np.asarray(raw.dataobj).astype(np.int16)
    values[0, 0, 0] = 77  # not a BTCV id
    nib.save(nib.Nifti1Image(values, raw.affine), label)
    label = base / "label" / "label0004.nii.gz"
    raw = nib.load(label)
    nib.save(nib.Nifti1Image(np.asarray(raw.dataobj).astype(np.float32) + 0.5, raw.affine), label)
    return {"0002": "truncated", "0003": "77", "0004": "non-integer"}


def test_skip_bad_cases_leaves_out_cases_only_the_data_show(tmp_path: Path) -> None:
    """Point 8: with skip_bad_cases, truncated image data, unknown label ids and float labels are found when
    the case index is built (each case read whole once), skipped and listed with their errors."""
    bad = _bad_cases(tmp_path / "btcv")
    dm = BTCVDataModule(root=str(tmp_path / "btcv"), split_file=str(tmp_path / "split.json"), resolution=32,
                        skip_bad_cases=True, spacing=6.0)  # fmt: skip
    with pytest.warns(UserWarning, match="skipped"):
        dm.setup("fit")
        dm.setup("test")
    assert set(dm.skipped_cases) == set(bad)
    for case, reason in bad.items():
        assert reason in dm.skipped_cases[case], dm.skipped_cases[case]
    assert not set(bad) & set(dm.train_cases() + dm.val_cases() + dm.test_cases())
    # without skipping, the same data stop at the first bad case
    strict = BTCVDataModule(root=str(tmp_path / "btcv"), split_file=str(tmp_path / "split.json"), resolution=32,
                            spacing=6.0)  # fmt: skip
    with pytest.raises(DatasetError):
        for split in ("train", "val", "test"):
            strict.dataset(split)[0]
            strict.dataset(split)[(0, 32, 1)]


def test_skip_bad_cases_serves_another_case_when_the_loader_meets_one(tmp_path: Path) -> None:
    """Point 8, loader time: a case that turns bad after indexing (here: truncated afterwards) is warned about
    and its training windows come from the next case; evaluation still refuses it."""
    root = tmp_path / "btcv"
    write_btcv(root, n=6)
    dm = BTCVDataModule(root=str(root), split_file=str(tmp_path / "split.json"), resolution=32, spacing=6.0,
                        skip_bad_cases=True)  # fmt: skip
    dataset: SliceDataset = dm.dataset("train")
    first = dataset.files[0].image
    first.write_bytes(first.read_bytes()[:200])
    with pytest.warns(UserWarning, match=f"skipped case '{dataset.files[0].case_id}' while training"):
        sample = dataset[(0, 32, 5)]
    assert sample["case_id"] != dataset.files[0].case_id and sample["image"].shape == (1, 32, 32)
    assert str(first) in dataset.bad[0]
    with pytest.raises(DatasetError, match=str(first)):
        dataset[0]


def test_two_files_for_one_case_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Point 9: b.nii.gz beside b_0000.nii.gz (a folder dataset), c.nii beside c.nii.gz (scans to predict)."""
    root = tmp_path / "folder"
    phantom = make_phantom(0, "ct")
    write_case(phantom, root / "images" / "b.nii.gz", root / "labels" / "b.nii.gz", None, binary=True)
    write_case(phantom, root / "images" / "b_0000.nii.gz", None, None)
    with pytest.raises(DatasetError, match=r"b\.nii\.gz and b_0000\.nii\.gz are both case 'b'"):
        _ = FolderDataModule(root=str(root), split_file=str(tmp_path / "split.json")).files
    scans = tmp_path / "scans"
    write_case(phantom, scans / "c.nii", None, None)
    write_case(phantom, scans / "c.nii.gz", None, None)
    line = one_line_error(["predict", "--model", "UNetTask", "--data", "scan", "--data.path", str(scans)], capsys)
    assert "c.nii and c.nii.gz are both case 'c'" in line


def test_bad_inputs_stop_before_any_work(
    btcv: Path, checkpoints: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Point 10: a missing or mismatched init_from, an output that is a file, a partly filled output folder and
    sampling_steps 0 each stop in one line before a model runs or a file is written."""
    data = ["--data.root", str(btcv), "--data.split_file", str(tmp_path / "split.json")]
    fit = ["fit", "--config", str(CONF / "meddelinea_btcv.yaml"), *data, "--trainer.default_root_dir",
           str(tmp_path / "run")]  # fmt: skip
    line = one_line_error([*fit, "--model.init_from", str(tmp_path / "none.ckpt")], capsys)
    assert "init_from" in line and "none.ckpt" in line and "no such checkpoint" in line
    line = one_line_error([*fit, "--model.init_from", str(checkpoints["unet"])], capsys)
    assert "holds no MedDelinea control branch" in line
    assert not (tmp_path / "split.json").exists()  # stopped before the dataset was read
    line = one_line_error([*fit, "--model.sampling_steps", "0"], capsys)
    assert "sampling_steps must be a positive integer, got 0" in line

    scans = tmp_path / "scans"
    for i in range(2):
        write_case(make_phantom(i, "ct"), scans / f"s{i}.nii.gz", None, None)
    (tmp_path / "a_file").write_text("not a folder")
    predict = ["predict", "--ckpt", str(checkpoints["unet"]), "--data", "scan", "--data.path", str(scans),
               "--trainer.default_root_dir", str(tmp_path / "run")]  # fmt: skip
    line = one_line_error([*predict, "--output", str(tmp_path / "a_file" / "out")], capsys)
    assert "is a file, not a folder" in line
    partly = tmp_path / "partly"
    partly.mkdir()
    (partly / "s1_seg.nii.gz").write_bytes(b"an earlier result")
    line = one_line_error([*predict, "--output", str(partly)], capsys)
    assert "s1_seg.nii.gz exist(s)" in line
    assert sorted(p.name for p in partly.iterdir()) == ["s1_seg.nii.gz"]  # s0's outputs were not written first


def test_contradictions_and_unlisted_cases(
    btcv: Path, checkpoints: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Point 12: --model MedDelineaTask with a UNet checkpoint is refused; cases added after the split file was
    written are warned about with their count."""
    data = ["--data.root", str(btcv), "--data.split_file", str(tmp_path / "split.json")]
    line = one_line_error(["test", "--ckpt", str(checkpoints["unet"]), "--model", "MedDelineaTask", "--data",
                           "btcv", *data], capsys)  # fmt: skip
    assert "--model MedDelineaTask contradicts checkpoint" in line and "UNetTask" in line
    root = tmp_path / "grown"
    write_btcv(root, n=4)
    _ = BTCVDataModule(root=str(root), split_file=str(tmp_path / "grown.json")).split
    write_btcv(root, n=6)
    with pytest.warns(UserWarning, match=r"2 case\(s\) in .* are not in the split file .*grown.json"):
        _ = BTCVDataModule(root=str(root), split_file=str(tmp_path / "grown.json")).split
