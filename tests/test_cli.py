"""The real `delinea` CLI on tiny configs and generated data: fit -> test -> predict, configs, errors, DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from delinea.main import build_cli, main
from delinea.testing.phantoms import write_btcv, write_dicom_series

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "tests" / "conf"
SAMPLE_MR = ROOT / "delinea" / "sample" / "images" / "mr.nii.gz"
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


@pytest.fixture(scope="module")
def btcv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("btcv")
    write_btcv(root, n=10)
    return root


def data_args(root: Path, tmp: Path) -> list[str]:
    return ["--data.root", str(root), "--data.split_file", str(tmp / "split.json")]


def test_fit_test_predict_round_trip(btcv: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    main(
        [
            "fit",
            "--config",
            str(CONF / "meddelinea_btcv.yaml"),
            *data_args(btcv, tmp_path),
            "--trainer.default_root_dir",
            str(run),
            *QUIET,
        ]
    )
    checkpoints = list(run.rglob("*.ckpt"))
    assert len(checkpoints) == 1
    # test with the checkpoint and the dataset name only: the model comes from the checkpoint
    main(
        [
            "test",
            "--ckpt",
            str(checkpoints[0]),
            "--data",
            "BTCV",
            *data_args(btcv, tmp_path),
            "--data.resolution",
            "32",
            "--output",
            str(tmp_path / "test"),
            "--trainer.default_root_dir",
            str(run),
            *QUIET,
        ]
    )
    summary = json.loads((tmp_path / "test" / "metrics_summary.json").read_text())
    split = json.loads((tmp_path / "split.json").read_text())
    assert summary["cases"] == len(split["test"]) >= 1
    assert set(summary["organs"]) == {
        "aorta",
        "gallbladder",
        "kidney_left",
        "kidney_right",
        "liver",
        "pancreas",
        "spleen",
        "stomach",
    }
    assert 0 <= summary["mDSC"] <= 1
    rows = (tmp_path / "test" / "metrics_per_case.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 8 * summary["cases"]
    assert (tmp_path / "test" / "metrics_table.md").read_text().count("|") > 20
    assert list((tmp_path / "test" / "overlays").glob("*.png"))
    # explicit settings win over the checkpoint's; the rest (the architecture) comes from the checkpoint
    main(
        [
            "test",
            "--ckpt",
            str(checkpoints[0]),
            "--data",
            "btcv",
            *data_args(btcv, tmp_path),
            "--config",
            str(ROOT / "configs" / "ablations" / "sampler_ddim.yaml"),
            "--model.zero_image",
            "true",
            "--model.sampling_steps",
            "1",
            "--data.resolution",
            "32",
            "--output",
            str(tmp_path / "test_ddim"),
            "--trainer.default_root_dir",
            str(tmp_path / "ablation"),
            *QUIET,
        ]
    )
    hparams = yaml.safe_load(next((tmp_path / "ablation").rglob("hparams.yaml")).read_text())
    assert (hparams["sampler"], hparams["sampling_steps"], hparams["zero_image"]) == ("ddim", 1, True)
    assert (hparams["dit"], hparams["control_blocks"], hparams["image_size"]) == ("DiT-tiny/2", 2, 32)
    # predict on the real MR sample (LPS) at the model's 1.5 mm (with 64-pixel windows, for speed): the label map has
    # the input's shape and affine
    out = tmp_path / "predicted"
    args = [
        "predict",
        "--ckpt",
        str(checkpoints[0]),
        "--data",
        "scan",
        "--data.path",
        str(SAMPLE_MR),
        "--data.modality",
        "mr",
        "--data.resolution",
        "64",
        "--output",
        str(out),
        "--save_uncertainty",
        "true",
        "--trainer.default_root_dir",
        str(run),
        *QUIET,
    ]
    main(args)
    source, predicted = nib.load(SAMPLE_MR), nib.load(out / "mr_seg.nii.gz")
    assert predicted.shape == source.shape and np.array_equal(predicted.affine, source.affine)
    assert set(np.unique(np.asarray(predicted.dataobj))) <= set(range(9))
    uncertainty = np.asarray(nib.load(out / "mr_uncertainty.nii.gz").dataobj)
    assert uncertainty.shape == source.shape and 0 <= uncertainty.min() and uncertainty.max() <= 1
    sidecar = json.loads((out / "mr_seg.json").read_text())
    assert sidecar["labels"]["5"] == "liver" and sidecar["source"] == str(SAMPLE_MR)
    before = (out / "mr_seg.nii.gz").read_bytes()
    with pytest.raises(SystemExit) as exit_info:  # nothing is overwritten unless asked
        main(args)
    assert exit_info.value.code == 2 and (out / "mr_seg.nii.gz").read_bytes() == before


def test_unet_baseline_through_the_cli(btcv: Path, tmp_path: Path) -> None:
    main(
        [
            "fit",
            "--config",
            str(CONF / "unet_btcv.yaml"),
            *data_args(btcv, tmp_path),
            "--trainer.default_root_dir",
            str(tmp_path / "run"),
            *QUIET,
        ]
    )
    checkpoint = next((tmp_path / "run").rglob("*.ckpt"))
    main(
        [
            "test",
            "--ckpt",
            str(checkpoint),
            "--data",
            "btcv",
            *data_args(btcv, tmp_path),
            "--data.resolution",
            "32",
            "--output",
            str(tmp_path / "test"),
            "--trainer.default_root_dir",
            str(tmp_path / "run"),
            *QUIET,
        ]
    )
    summary = json.loads((tmp_path / "test" / "metrics_summary.json").read_text())
    assert summary["cases"] >= 1 and "UNetTask" in (tmp_path / "test" / "metrics_table.md").read_text()
    # A DICOM series of real CT slices predicts into the same labels, in space, as its NIfTI does
    ct = nib.load(ROOT / "delinea" / "sample" / "images" / "ct.nii.gz").slicer[:, :, 86:94]
    nib.save(ct, tmp_path / "slab.nii.gz")
    to_lps = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"), nib.orientations.axcodes2ornt("LPS"))
    lps = ct.as_reoriented(to_lps)  # rows and columns as a scanner stores them
    write_dicom_series(np.asarray(lps.dataobj), lps.affine, tmp_path / "series", intercept=-2048.0)
    for name, path in (("nifti", tmp_path / "slab.nii.gz"), ("dicom", tmp_path / "series")):
        main(
            [
                "predict",
                "--ckpt",
                str(checkpoint),
                "--data",
                "scan",
                "--data.path",
                str(path),
                "--data.modality",
                "ct",
                "--data.resolution",
                "32",
                "--output",
                str(tmp_path / name),
                "--trainer.default_root_dir",
                str(tmp_path / "run"),
                *QUIET,
            ]
        )
    from_nifti = nib.as_closest_canonical(nib.load(next((tmp_path / "nifti").glob("*_seg.nii.gz"))))
    from_dicom = nib.load(next((tmp_path / "dicom").glob("*_seg.nii.gz")))
    assert nib.aff2axcodes(from_dicom.affine) != ("R", "A", "S")  # stored as the series lies (LPS)
    from_dicom = nib.as_closest_canonical(from_dicom)
    labels = np.asarray(from_nifti.dataobj)
    assert len(np.unique(labels)) > 1
    assert np.allclose(from_dicom.affine, from_nifti.affine, atol=1e-3)
    assert np.array_equal(np.asarray(from_dicom.dataobj), labels)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["fit", "--data", "nope"], "unknown dataset 'nope'; choose one of atlas8k, btcv, amos"),
        (
            ["fit", "--config", str(CONF / "unet_btcv.yaml"), "--data.fraction", "1.5"],
            "btcv: fraction must be in (0, 1], got 1.5",
        ),
        (["test", "--ckpt", "missing.ckpt", "--data", "btcv"], "checkpoint not found: missing.ckpt"),
        (["fit", "--config", str(CONF / "unet_btcv.yaml"), "--data.root", "/no/such/btcv"], "/no/such/btcv"),
        (
            ["fit", "--config", str(CONF / "meddelinea_btcv.yaml"), "--model.control_blocks", "9"],
            "control_blocks K=9 must be between 1 and the base DiT's 4 blocks",
        ),
    ],
)
def test_user_errors_are_one_line_with_exit_code_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("delinea: error:") and message in err[-1]
    assert not any("Traceback" in line for line in err)


def test_version_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    import delinea

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and delinea.__version__ in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    assert "--ckpt_path" in capsys.readouterr().out


SHIPPED = sorted((ROOT / "configs").rglob("*.yaml"))
DEMO = [p for p in sorted((ROOT / "delinea" / "demo" / "configs").glob("*.yaml")) if "Pretrain" not in p.read_text()]
STAGES = [p for p in SHIPPED if p.parent.name == "configs" and p.stem in ("pretrain", "finetune", "unet")]
TINY_MODEL = [
    "--model.dit",
    "DiT-tiny/2",
    "--model.vae",
    "tiny",
    "--model.image_size",
    "32",
    "--model.control_blocks",
    "2",
    "--model.init_from",
    "null",
]


def _overrides(config: Path, btcv: Path, tmp: Path) -> list[str]:
    """Tiny shapes and local data for a stage config; ablations and layers sit on finetune.yaml."""
    text = config.read_text()
    if config in DEMO:  # complete configs of their own, on the bundled sample
        args = ["--config", str(config), "--trainer.default_root_dir", str(tmp)]
        if "FolderDataModule" in text:
            args += ["--data.root", str(ROOT / "delinea" / "sample"), "--data.split_file", str(tmp / "s.json")]
        if "MedDelineaTask" in text:
            args += ["--model.latent_cache", str(tmp / "cache")]
        if "init_from:" in text:  # the parent run's output is not in a fresh clone
            args += ["--model.init_from", "null"]
        return args
    stage = config if config in STAGES else ROOT / "configs" / "finetune.yaml"
    args = ["--config", str(stage)] + (["--config", str(config)] if config != stage else [])
    is_unet = "UNetTask" in stage.read_text()
    keep_k = "control_blocks:" in text and config.parent.name == "ablations"
    model = [] if is_unet else (TINY_MODEL[:6] + TINY_MODEL[8:] if keep_k else TINY_MODEL)
    data = [
        "--data",
        "btcv",
        "--data.root",
        str(btcv),
        "--data.split_file",
        str(tmp / "s.json"),
        "--data.resolution",
        "32",
        "--data.num_workers",
        "0",
    ]
    trainer = [
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        "1",
        "--trainer.strategy",
        "auto",
        "--trainer.num_nodes",
        "1",
        "--trainer.precision",
        "32-true",
        "--trainer.default_root_dir",
        str(tmp),
    ]
    return args + model + data + trainer


@pytest.mark.parametrize("config", SHIPPED + DEMO, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_config_parses_and_instantiates(
    config: Path, btcv: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    argv = _overrides(config, btcv, tmp_path)
    if "control_blocks" in config.name:
        # K up to 28 needs DiT-XL depth; building that is a memory test, not a config test: check the
        # K against the tiny DiT's 4 blocks only through the parsed hyperparameters.
        from delinea.tasks import MedDelineaTask

        monkeypatch.setattr(MedDelineaTask, "configure_models", lambda self: None)
    cli = build_cli(argv, run=False)  # run=False: no subcommand, the fit parser alone
    assert cli.model is not None and cli.datamodule is not None
    if "control_blocks" in config.name:
        assert cli.model.hparams.control_blocks == int(config.stem.rsplit("_", 1)[1])
    if config.name == "fewshot.yaml":
        assert cli.datamodule.fraction == 0.1


def test_ddp_two_processes_on_cpu(tmp_path: Path) -> None:
    """Two gloo ranks through the real command: both run, one checkpoint, test metrics reduced over ranks."""
    root = tmp_path / "btcv"
    write_btcv(root, n=20)
    run = tmp_path / "run"
    ddp = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp", *QUIET]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    fit = subprocess.run(
        [
            sys.executable,
            "-m",
            "delinea",
            "fit",
            "--config",
            str(CONF / "meddelinea_btcv.yaml"),
            *data_args(root, tmp_path),
            "--trainer.default_root_dir",
            str(run),
            *ddp,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert fit.returncode == 0, fit.stderr[-3000:]
    log = fit.stdout + fit.stderr
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in log and "GLOBAL_RANK: 1, MEMBER: 2/2" in log
    checkpoints = list(run.rglob("*.ckpt"))
    assert len(checkpoints) == 1
    test = subprocess.run(
        [
            sys.executable,
            "-m",
            "delinea",
            "test",
            "--ckpt",
            str(checkpoints[0]),
            "--data",
            "btcv",
            *data_args(root, tmp_path),
            "--data.resolution",
            "32",
            "--output",
            str(tmp_path / "test"),
            "--trainer.default_root_dir",
            str(run),
            *ddp,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert test.returncode == 0, test.stderr[-3000:]
    summary = json.loads((tmp_path / "test" / "metrics_summary.json").read_text())
    split = json.loads((tmp_path / "split.json").read_text())
    # each rank evaluated whole cases of its own; the report counts every test case exactly once
    assert len(split["test"]) == 2 and summary["cases"] == 2


def test_model_folders_carry_a_trained_model_without_pickles(btcv: Path, tmp_path: Path) -> None:
    """A run's checkpoint exported as safetensors + JSON: ``test --ckpt FOLDER`` gives the checkpoint's numbers,
    ``init_from`` takes the folder, and the folder moves with its backbones."""
    from delinea.models import build_dit, build_vae, save_dit, save_vae
    from delinea.tasks import MedDelineaTask
    from delinea.tasks.export import read_model_folder, save_model_folder

    torch.manual_seed(0)
    backbones = tmp_path / "shipped"
    save_dit(build_dit("DiT-tiny/2", sample_size=16), backbones / "dit")
    save_vae(build_vae("tiny"), backbones / "vae")
    run = tmp_path / "run"
    main(
        [
            "fit",
            "--config",
            str(CONF / "meddelinea_btcv.yaml"),
            "--model.dit",
            str(backbones / "dit"),
            "--model.vae",
            str(backbones / "vae"),
            *data_args(btcv, tmp_path),
            "--trainer.default_root_dir",
            str(run),
            *QUIET,
        ]
    )
    checkpoint = next(run.rglob("*.ckpt"))
    task = MedDelineaTask.load_from_checkpoint(checkpoint, weights_only=False)
    save_model_folder(task, backbones / "meddelinea")
    config = json.loads((backbones / "meddelinea" / "config.json").read_text())
    assert config["hyper_parameters"]["dit"] == "../dit" and config["delinea_plan"]["window"] == [32]
    assert not any(k.startswith("model.dit.") for k in read_model_folder(backbones / "meddelinea")["state_dict"])
    moved = tmp_path / "moved"
    for name, ckpt in (("from_ckpt", str(checkpoint)), ("from_folder", str(moved / "meddelinea"))):
        if name == "from_folder":
            backbones.rename(moved)  # the folder and its backbones travel together
        main(
            [
                "test",
                "--ckpt",
                ckpt,
                "--data",
                "btcv",
                *data_args(btcv, tmp_path),
                "--output",
                str(tmp_path / name),
                "--trainer.default_root_dir",
                str(tmp_path / f"r_{name}"),
                *QUIET,
            ]
        )
    ckpt_rows = (tmp_path / "from_ckpt" / "metrics_per_case.csv").read_text()
    assert (tmp_path / "from_folder" / "metrics_per_case.csv").read_text() == ckpt_rows  # the same model
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--ckpt_path", str(moved / "meddelinea"), "--data", "btcv", *data_args(btcv, tmp_path)])
    assert exit_info.value.code == 2
