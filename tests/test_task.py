"""The MedDelinea task: what trains and what stays frozen, learning, checkpoints, fine-tuning init, latent cache."""

from __future__ import annotations

import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from delinea.errors import CheckpointError
from delinea.models import save_dit
from delinea.tasks import MedDelineaTask
from delinea.testing.backbones import write_backbones
from delinea.testing.slices import SyntheticSlices, make_batch

TINY = {"dit": "DiT-tiny/2", "vae": "tiny", "image_size": 32, "control_blocks": 2}


def trainer(tmp_path: Path, steps: int, **kwargs) -> pl.Trainer:
    return pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        **kwargs,
    )


def loader(n: int = 8, seed: int = 0) -> DataLoader:
    return DataLoader(SyntheticSlices(n, 32, seed), batch_size=4)


class EvalModeProbe(pl.Callback):
    """Records, at every training batch, whether any frozen module is in train mode."""

    def __init__(self) -> None:
        self.frozen_training: list[bool] = []
        self.control_training: list[bool] = []

    def on_train_batch_start(self, trainer: pl.Trainer, task: MedDelineaTask, *args: object) -> None:
        frozen = [m for f in task.model.frozen_modules() for m in f.modules()]
        self.frozen_training.append(any(m.training for m in frozen))
        self.control_training.append(task.model.control.training)


def test_exactly_the_trainable_parameters_change(tmp_path: Path) -> None:
    torch.manual_seed(0)
    task = MedDelineaTask(**_backbone_files(tmp_path), lr=1e-3, seg_max_timestep=1000)
    before = {k: v.clone() for k, v in task.state_dict().items()}
    probe = EvalModeProbe()
    # Validation runs in between, so Lightning's train/eval switching is exercised too.
    trainer(tmp_path, 4, callbacks=[probe], val_check_interval=2, num_sanity_val_steps=1).fit(
        task, loader(), loader(4, 1)
    )
    after = task.state_dict()
    trainable = {n for n, p in task.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("model.control.", "model.vae.head.")) for n in trainable)
    assert any(n.startswith("model.vae.head.") for n in trainable)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    # Every trainable tensor moved except the zero conv's: it gets gradient only once the zero Linears
    # and the image path's patch weights have moved, which takes a few steps.
    assert changed <= trainable
    assert trainable - changed <= {"model.control.zero_conv.weight", "model.control.zero_conv.bias"}
    assert probe.frozen_training and not any(probe.frozen_training)
    assert all(probe.control_training)


def test_head_frozen_ablation_and_counts() -> None:
    task = MedDelineaTask(**TINY, train_head=False)
    trainable = {n for n, p in task.named_parameters() if p.requires_grad}
    assert not any(n.startswith("model.vae.head.") for n in trainable)
    control = sum(p.numel() for p in task.model.control.parameters())
    assert sum(p.numel() for p in task.parameters() if p.requires_grad) == control


def _decoded_dice(task: MedDelineaTask, batch: dict, organ: int) -> float:
    """Dice of the masks decoded from one-step Tweedie estimates at a small t (fixed noise)."""
    task.eval()
    with torch.no_grad():
        image_latent = task.model.vae.encode(batch["image"])
        mask_latent = task.model.vae.encode_mask(batch["mask"])
        t = torch.full((len(image_latent),), 50)
        schedule = task.model.schedule
        noisy = schedule.add_noise(
            mask_latent, torch.randn(mask_latent.shape, generator=torch.Generator().manual_seed(0)), t
        )
        latent0 = schedule.tweedie(noisy, task.model.predict_noise(noisy, t, image_latent), t)
        pred = task.model.vae.decode_logits(latent0).argmax(1) == organ
    truth = batch["mask"] == organ
    return float(2 * (pred & truth).sum() / (pred.sum() + truth.sum()))


def test_short_run_lowers_loss_and_raises_dice() -> None:
    torch.manual_seed(0)
    task = MedDelineaTask(**TINY, lr=1e-3, seg_max_timestep=500)
    train, held_out = make_batch(8, 32, 0), make_batch(8, 32, 1)
    dice_before = _decoded_dice(task, held_out, organ=5)
    task.train()
    optimizer = torch.optim.AdamW([p for p in task.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(60):
        total = task.losses(train)
        optimizer.zero_grad()
        total["loss"].backward()
        optimizer.step()
        losses.append(float(total["loss"]))
    dice_after = _decoded_dice(task, held_out, organ=5)
    assert sum(losses[-10:]) / 10 < 0.97 * sum(losses[:10]) / 10
    assert dice_before < 0.02 and dice_after > dice_before + 0.05, (dice_before, dice_after)


def _backbone_files(tmp_path: Path) -> dict:
    return {**TINY, **write_backbones(tmp_path)}


def test_checkpoint_leaves_out_frozen_weights_loaded_from_files(tmp_path: Path) -> None:
    config = _backbone_files(tmp_path)
    task = MedDelineaTask(**config, lr=1e-3)
    run = trainer(tmp_path, 2)
    run.fit(task, loader())
    run.save_checkpoint(tmp_path / "lean.ckpt")
    state = torch.load(tmp_path / "lean.ckpt", weights_only=False)["state_dict"]
    assert not any(k.startswith(("model.dit.", "model.vae.vae.")) for k in state)
    assert any(k.startswith("model.control.") for k in state)
    restored = MedDelineaTask.load_from_checkpoint(tmp_path / "lean.ckpt")
    for key, value in task.state_dict().items():
        assert torch.equal(value, restored.state_dict()[key]), key
    # Other backbones behind the same path: refused, not silently mixed.
    save_dit(
        __import__("delinea.models", fromlist=["build_dit"]).build_dit("DiT-tiny/2", sample_size=16), tmp_path / "dit"
    )
    with pytest.raises(ValueError, match="other frozen backbones"):
        MedDelineaTask.load_from_checkpoint(tmp_path / "lean.ckpt")


def test_preset_backbones_are_kept_in_checkpoints(tmp_path: Path) -> None:
    task = MedDelineaTask(**TINY)
    run = trainer(tmp_path, 1)
    run.fit(task, loader(4))
    run.save_checkpoint(tmp_path / "full.ckpt")
    restored = MedDelineaTask.load_from_checkpoint(tmp_path / "full.ckpt")
    assert torch.equal(restored.model.dit.proj_out_1.weight, task.model.dit.proj_out_1.weight)
    assert torch.equal(restored.model.vae.vae.encoder.conv_in.weight, task.model.vae.vae.encoder.conv_in.weight)


def test_init_from_copies_control_branch_and_head(tmp_path: Path) -> None:
    config = _backbone_files(tmp_path)
    task = MedDelineaTask(**config, lr=1e-3)
    run = trainer(tmp_path, 3)
    run.fit(task, loader())
    run.save_checkpoint(tmp_path / "pretrained.ckpt")
    finetune = MedDelineaTask(**config, init_from=str(tmp_path / "pretrained.ckpt"), lr=1e-12)
    fresh_linear = finetune.model.control.zero_linears[0].weight.detach().clone()
    trainer(tmp_path, 1).fit(finetune, loader(4))  # the weights are loaded when fitting starts
    for key, value in task.state_dict().items():
        if key.startswith(("model.control.", "model.vae.head.")):
            assert torch.allclose(finetune.state_dict()[key], value, atol=1e-6), key
    assert not torch.equal(fresh_linear, finetune.model.control.zero_linears[0].weight)
    with pytest.raises(ValueError, match="does not fit this model"):
        trainer(tmp_path, 1).fit(
            MedDelineaTask(**{**config, "control_blocks": 3}, init_from=str(tmp_path / "pretrained.ckpt")), loader(4)
        )
    with pytest.raises(CheckpointError, match=r"init_from 'missing\.ckpt': no such checkpoint"):
        trainer(tmp_path, 1).fit(MedDelineaTask(**config, init_from="missing.ckpt"), loader(4))
    # Its own checkpoint loads for testing even once the init_from file is gone
    run = trainer(tmp_path, 1)
    run.fit(MedDelineaTask(**config, init_from=str(tmp_path / "pretrained.ckpt")), loader(4))
    run.save_checkpoint(tmp_path / "finetuned.ckpt")
    (tmp_path / "pretrained.ckpt").unlink()
    MedDelineaTask.load_from_checkpoint(tmp_path / "finetuned.ckpt")


def test_latent_cache_returns_what_the_encoder_gives(tmp_path: Path) -> None:
    task = MedDelineaTask(**TINY, latent_cache=str(tmp_path / "cache"))
    batch = make_batch(4, 32, 0)
    batch["cache_key"][3] = ""  # an augmented slice: never cached
    first = task.latents(batch)
    second = task.latents(batch)
    assert task.latent_cache.misses == 4 + 1 and task.latent_cache.hits == 3
    with torch.no_grad():
        direct = (task.model.vae.encode(batch["image"]), task.model.vae.encode_mask(batch["mask"]))
    for a, b, c in zip(first, second, direct):
        assert torch.allclose(a, c, atol=1e-6) and torch.allclose(b, c, atol=1e-6)
    files = list((tmp_path / "cache").rglob("*.safetensors"))
    assert len(files) == 3 and files[0].parent.parent.name == task.vae_fingerprint()


def test_bad_task_arguments() -> None:
    with pytest.raises(ValueError, match="unknown scheduler 'fast'"):
        MedDelineaTask(**TINY, sampler="fast")
    with pytest.raises(FileNotFoundError, match="dit='no/such/dit' is neither a preset nor an existing path"):
        MedDelineaTask(**{**TINY, "dit": "no/such/dit"})
    with pytest.raises(ValueError, match="control_blocks K=9"):
        MedDelineaTask(**{**TINY, "control_blocks": 9})


def test_ema_tracks_the_trainable_weights_and_is_used_for_evaluation(tmp_path: Path) -> None:
    torch.manual_seed(0)
    task = MedDelineaTask(**_backbone_files(tmp_path), lr=1e-2, ema_decay=0.5)
    trainer(tmp_path, 3).fit(task, loader())
    live = task.model.control.zero_linears[0].weight.detach().clone()
    averaged = task.ema.module["control"].zero_linears[0].weight.detach().clone()
    assert not torch.equal(live, averaged) and averaged.abs().sum() > 0
    with task.ema_weights():
        assert torch.equal(task.model.control.zero_linears[0].weight, averaged)
    assert torch.equal(task.model.control.zero_linears[0].weight, live)  # trained weights restored
    assert any(k.startswith("ema.module.control.") for k in task.state_dict())
    assert not any(k.startswith("trainable.") for k in task.state_dict())


def test_schedule_decays_over_steps_or_max_time_whichever_ends_first() -> None:
    from types import SimpleNamespace

    from lightning.pytorch.callbacks import Timer

    from delinea.tasks.optim import adamw_with_schedule

    task = MedDelineaTask(**TINY, lr=1.0, lr_schedule="cosine", warmup_steps=0)
    timer = Timer(duration="00:00:01:40")  # 100 s
    elapsed = {"s": 0.0}
    timer.time_elapsed = lambda stage="train": elapsed["s"]
    task._trainer = SimpleNamespace(estimated_stepping_batches=1000, callbacks=[timer])
    factor = adamw_with_schedule(task)["lr_scheduler"]["scheduler"].lr_lambdas[0]
    assert factor(500) == pytest.approx(0.5)  # by steps: half way
    elapsed["s"] = 50.0
    assert factor(0) == pytest.approx(0.5)  # by time: half way
    assert factor(900) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.9)))  # steps ahead of time
    elapsed["s"] = 100.0
    assert factor(10) == pytest.approx(0.0)
    # anneal_seconds overrides the Trainer's max_time; without either only steps count
    assert adamw_with_schedule(task, anneal_seconds=200)["lr_scheduler"]["scheduler"].lr_lambdas[0](0) == pytest.approx(
        0.5
    )
    task._trainer = SimpleNamespace(estimated_stepping_batches=1000, callbacks=[])
    assert adamw_with_schedule(task)["lr_scheduler"]["scheduler"].lr_lambdas[0](250) == pytest.approx(
        0.5 * (1 + math.cos(math.pi * 0.25))
    )


def test_moving_average_is_kept_out_of_the_optimiser() -> None:
    task = MedDelineaTask(**TINY, ema_decay=0.9)
    optimised = {id(p) for group in task.configure_optimizers()["optimizer"].param_groups for p in group["params"]}
    assert not any(id(p) in optimised for p in task.ema.module.parameters())
    assert {id(p) for p in task.trainable.parameters()} == optimised


def test_training_timesteps_follow_the_requested_density() -> None:
    from delinea.models.diffusion import NoiseSchedule

    timesteps = NoiseSchedule().timesteps
    generator = torch.Generator().manual_seed(0)
    for bias, mean in [(0.0, 499.5), (1.0, 1000 * 2 / 3), (2.0, 1000 * 3 / 4)]:  # E[t] = 1000 (b+1)/(b+2)
        t = timesteps(200_000, bias, "cpu", generator)
        assert t.min() >= 0 and t.max() <= 999 and t.dtype == torch.long
        assert t.float().mean().item() == pytest.approx(mean, abs=3)
    # bias 1: density ∝ t, so P(t < 500) = 1/4
    assert (timesteps(200_000, 1.0, "cpu", generator) < 500).float().mean().item() == pytest.approx(0.25, abs=0.01)
    with pytest.raises(ValueError, match="timestep_bias"):
        MedDelineaTask(**TINY, timestep_bias=-1)
