"""The backbone pretraining tasks on a real datamodule: the VAE and the base DiT learn, export what MedDelinea
loads, keep what must stay frozen, and run through ``delinea-pretrain``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer

from delinea.datamodules import FolderDataModule
from delinea.errors import OptionError
from delinea.labels import mask_to_rgb
from delinea.main import pretrain
from delinea.models.dit import load_dit
from delinea.models.vae import MaskVAE, load_vae
from delinea.tasks import MedDelineaTask
from delinea.tasks.pretraining import DiTPretrainTask, VAEPretrainTask, synthetic_mask
from delinea.testing.phantoms import write_folder

TINY_VAE = dict(block_out_channels=[8, 16], norm_num_groups=4, lr=3e-3, warmup_steps=0, lr_schedule="constant")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("phantoms")
    write_folder(root, {f"case{i}": "ct" for i in range(3)}, shape=(48, 40, 6), spacing=(1.5, 1.5, 3.0))
    return root


def datamodule(root: Path, tmp: Path) -> FolderDataModule:
    return FolderDataModule(
        root=str(root), modality="ct", split="all", resolution=32, batch_size=4, split_file=str(tmp / "split.json")
    )


def fit(task: VAEPretrainTask | DiTPretrainTask, dm: FolderDataModule, steps: int) -> None:
    Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    ).fit(task, datamodule=dm)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny convolutions run faster on one thread, and far faster when other jobs hold the second core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_vae_folder(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    tmp = tmp_path_factory.mktemp("vae")
    fit(VAEPretrainTask(**TINY_VAE, export_dir=str(tmp / "vae")), datamodule(data_root, tmp), steps=2)
    return tmp / "vae"


def test_vae_task_learns_and_exports(data_root: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    dm = datamodule(data_root, tmp_path)
    batch = next(iter(dm.train_dataloader()))
    task = VAEPretrainTask(**TINY_VAE, export_dir=str(tmp_path / "vae"))
    with torch.no_grad():
        torch.manual_seed(1)
        before = task.losses(dict(batch))
    fit(task, dm, steps=25)
    with torch.no_grad():
        torch.manual_seed(1)
        after = task.losses(dict(batch))
    assert after["loss"] < 0.7 * before["loss"] and after["mask_ce"] < before["mask_ce"]
    # on_train_end exported, with the scaling factor fitted to the last training masks' latents
    vae = load_vae(tmp_path / "vae")
    assert vae.config.scaling_factor == pytest.approx(1.0 / task.latent_std(task._last_masks), rel=1e-5)
    assert tuple(vae.config.block_out_channels) == (8, 16)
    task.vae.eval()
    rgb = mask_to_rgb(batch["mask"])
    with torch.no_grad():
        expected = task.vae.decode(task.vae.encode(rgb).latent_dist.mean).sample
        got = vae.decode(vae.encode(rgb).latent_dist.mean).sample
    torch.testing.assert_close(got, expected)


def test_vae_validation_scores_the_codec_on_whole_slices(data_root: Path, tmp_path: Path) -> None:
    task = VAEPretrainTask(**TINY_VAE)
    dm = datamodule(data_root, tmp_path)
    metrics = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False).validate(
        task, datamodule=dm
    )[0]
    assert 0 <= metrics["val/codec_mDSC"] <= 1 and metrics["val/image_l1"] > 0


def test_bad_options_are_refused(tmp_path: Path) -> None:
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text("{}")
    with pytest.raises(OptionError, match=r"export_dir .* exists and is not empty"):
        VAEPretrainTask(**TINY_VAE, export_dir=str(tmp_path / "vae"))
    with pytest.raises(OptionError, match="multiples of norm_num_groups"):
        VAEPretrainTask(block_out_channels=[6, 16], norm_num_groups=4)
    with pytest.raises(OptionError, match="is not a diffusers AutoencoderKL folder"):
        DiTPretrainTask(vae=str(tmp_path / "nothing"))
    masks = synthetic_mask(32, torch.Generator().manual_seed(0))
    assert masks.shape == (32, 32) and 0 < (masks > 0).float().mean() < 1


def test_dit_task_learns_exports_and_loads_into_meddelinea(
    tiny_vae_folder: Path, data_root: Path, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    dm = datamodule(data_root, tmp_path)
    batch = next(iter(dm.train_dataloader()))
    task = DiTPretrainTask(
        vae=str(tiny_vae_folder),
        dit="DiT-tiny/2",
        image_size=32,
        lr=2e-3,
        warmup_steps=0,
        lr_schedule="constant",
        noise_repeats=4,
        ema_decay=0.5,
        export_dir=str(tmp_path / "dit"),
    )
    assert task.dit.config.sample_size == 16
    frozen = {k: v.clone() for k, v in task.vae.state_dict().items()}

    def loss() -> float:
        generator = torch.Generator().manual_seed(3)
        with torch.no_grad():
            return sum(float(task.epsilon_loss(task.dit, batch["mask"], 1, generator)) for _ in range(4)) / 4

    before = loss()
    fit(task, dm, steps=30)
    assert loss() < 0.85 * before
    assert all(torch.equal(frozen[k], v) for k, v in task.vae.state_dict().items())  # the VAE stayed frozen
    # What is exported is the moving average, not the live weights, and the average never trains itself.
    assert task.exported_dit() is task.ema.module
    live, averaged = task.dit.pos_embed.proj.weight, task.ema.module.pos_embed.proj.weight
    assert not torch.equal(live, averaged) and not averaged.requires_grad
    dit = load_dit(tmp_path / "dit")
    latent, t, y = torch.randn(2, 4, 16, 16), torch.tensor([10, 500]), torch.tensor([1, 1])
    with torch.no_grad():
        torch.testing.assert_close(
            dit(latent, timestep=t, class_labels=y).sample,
            task.exported_dit()(latent, timestep=t, class_labels=y).sample,
        )
    # the pair is a MedDelinea backbone: the steered model starts as the pretrained DiT
    md = MedDelineaTask(dit=str(tmp_path / "dit"), vae=str(tiny_vae_folder), image_size=32, control_blocks=2)
    assert isinstance(md.model.vae, MaskVAE) and md.model.class_label == 1


def test_delinea_pretrain_command(data_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    vae = tmp_path / "vae"
    pretrain(
        [
            "fit",
            "--model",
            "VAEPretrainTask",
            "--model.block_out_channels",
            "[8, 16]",
            "--model.norm_num_groups",
            "4",
            "--model.export_dir",
            str(vae),
            "--data",
            "FolderDataModule",
            "--data.root",
            str(data_root),
            "--data.split",
            "all",
            "--data.resolution",
            "32",
            "--data.split_file",
            str(tmp_path / "s.json"),
            "--trainer.max_steps",
            "1",
            "--trainer.logger",
            "false",
            "--trainer.limit_val_batches",
            "0",
            "--trainer.default_root_dir",
            str(tmp_path),
            "--trainer.enable_progress_bar",
            "false",
        ]
    )
    assert (vae / "config.json").is_file()
    with pytest.raises(SystemExit) as exit_info:
        pretrain(
            [
                "fit",
                "--model",
                "DiTPretrainTask",
                "--model.vae",
                str(tmp_path / "none"),
                "--data",
                "FolderDataModule",
                "--data.root",
                str(data_root),
            ]
        )
    assert exit_info.value.code == 2
    assert "is not a diffusers AutoencoderKL folder" in capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("name", ["vae.yaml", "dit.yaml"])
def test_demo_backbone_configs_parse_and_never_target_the_shipped_weights(name: str, tmp_path: Path) -> None:
    """The recipes of the demo's backbones build through ``delinea-pretrain``; their export folder is not the
    shipped one, and a non-empty export folder is refused rather than overwritten."""
    from delinea.demo.protocol import CONFIGS, SAMPLE, WEIGHTS
    from delinea.main import OneLineErrorsCLI
    from delinea.tasks.pretraining import BackbonePretrainTask

    args = ["--config", str(CONFIGS / name), "--data.root", str(SAMPLE), "--data.split_file", str(tmp_path / "s.json")]
    cli = OneLineErrorsCLI(BackbonePretrainTask, FolderDataModule, subclass_mode_model=True, subclass_mode_data=True,
                           args=args, run=False)  # fmt: skip
    export = Path(cli.model.hparams.export_dir)
    assert WEIGHTS.resolve() not in export.resolve().parents and not cli.model.hparams.overwrite
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "config.json").write_text("{}")
    cli.model.hparams.export_dir = str(tmp_path / "taken")
    with pytest.raises(OptionError, match="exists and is not empty"):
        cli.model._check_export_dir()
