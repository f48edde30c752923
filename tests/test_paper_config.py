"""The paper's configuration on the paper's hardware: checkpoints users have, activation checkpointing, the memory
plan, per-resolution micro-batches, and (``slow``) one paper-size training step."""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from delinea.datamodules import FolderDataModule, SliceBatchSampler
from delinea.errors import CheckpointError, OptionError
from delinea.models import MaskVAE, MedDelinea, build_dit, build_vae, load_dit
from delinea.models.dit import check_square
from delinea.models.meddelinea import CHECKPOINT_PARTS
from delinea.models.memory import estimate, profile_model
from delinea.tasks import MedDelineaTask
from delinea.testing.backbones import pretrained_like
from tests.test_models import _original_dit_forward, _original_state_dict

# -- checkpoints users have ------------------------------------------------------------------------------------


def test_train_py_checkpoint_loads_its_ema_weights_weights_only(tmp_path: Path) -> None:
    ema = _original_state_dict(depth=12, dim=384)  # DiT-S/2's shape
    raw = {k: v + 1 for k, v in ema.items()}
    args = argparse.Namespace(model="DiT-S/2", image_size=64, num_classes=1000, results_dir="results")
    torch.save({"model": raw, "ema": ema, "opt": {"state": {}, "param_groups": []}, "args": args}, tmp_path / "c.pt")
    dit = load_dit(tmp_path / "c.pt").eval()
    assert dit.config.num_attention_heads == 6 and dit.config.num_layers == 12
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 999]), torch.tensor([7, 1000])
    expected = _original_dit_forward(ema, x, t, y, depth=12, heads=6, patch=2)  # the EMA, not the raw weights
    assert torch.allclose(dit(x, timestep=t, class_labels=y).sample, expected, atol=1e-5)


class Gadget:
    """Any class a pickle could name: unpickling it could run code."""


def test_a_checkpoint_with_another_class_is_refused_in_one_line(tmp_path: Path) -> None:
    sd = _original_state_dict(depth=2)
    torch.save({"ema": sd, "args": argparse.Namespace(model="DiT-S/2"), "extra": Gadget()}, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match=r"x\.pt weights-only: .*Gadget.*argparse\.Namespace") as error:
        load_dit(tmp_path / "x.pt")
    assert "\n" not in str(error.value)


def test_head_count_from_the_option_else_refused_when_ambiguous(tmp_path: Path) -> None:
    sd = _original_state_dict(depth=2, dim=384)  # hidden 384 with 16 heads of 24: no preset
    torch.save(sd, tmp_path / "d.pt")
    with pytest.raises(CheckpointError, match=r"depth 2 and hidden size 384 is no preset.*num_heads"):
        load_dit(tmp_path / "d.pt")
    dit = load_dit(tmp_path / "d.pt", num_heads=16).eval()
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([3, 250, 999]), torch.tensor([7, 1000, 42])
    expected = _original_dit_forward(sd, x, t, y, depth=2, heads=16, patch=2)
    wrong = _original_dit_forward(sd, x, t, y, depth=2, heads=6, patch=2)
    got = dit(x, timestep=t, class_labels=y).sample
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
    assert (got - wrong).abs().max() > 1e-3  # the head count matters: a wrong guess would be silently wrong
    torch.save({"ema": sd, "args": argparse.Namespace(model="DiT-XL/2")}, tmp_path / "e.pt")
    with pytest.raises(CheckpointError, match=r"num_heads=12 contradicts its args\.model 'DiT-XL/2' \(16 heads\)"):
        load_dit(tmp_path / "e.pt", num_heads=12)
    with pytest.raises(CheckpointError, match="num_heads=5 does not divide the hidden size 384"):
        load_dit(tmp_path / "d.pt", num_heads=5)


def test_odd_inputs_are_refused_by_name_and_oblong_ones_run() -> None:
    torch.manual_seed(0)
    dit = pretrained_like(build_dit("DiT-tiny/2", sample_size=16))
    model = MedDelinea(dit, MaskVAE(build_vae("tiny")), control_blocks=2).eval()
    with pytest.raises(ValueError, match=r"image size 2x32 \(shape \(1, 1, 2, 32\)\) is smaller than 4"):
        model.check_inputs(torch.zeros(1, 1, 2, 32))
    with pytest.raises(ValueError, match=r"image size 32x38 is not divisible by 4"):
        model.check_inputs(torch.zeros(1, 1, 32, 38))
    probabilities, _ = model.sample(torch.rand(1, 1, 32, 48) * 2 - 1, steps=2)  # oblong: the block loop's grid
    assert probabilities.shape == (1, 9, 32, 48)
    with pytest.raises(ValueError, match=r"DiT latent must be \(N, 4, h, w\), got shape \(1, 3, 16, 16\)"):
        model.predict_noise(torch.zeros(1, 3, 16, 16), torch.tensor(5), torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match=r"DiT latent 16x15 .* multiples of the patch size 2"):
        model.predict_noise(torch.zeros(1, 4, 16, 15), torch.tensor(5), torch.zeros(1, 4, 16, 15))
    with pytest.raises(ValueError, match=r"needs a square latent, got 16x24"):
        check_square(dit, torch.zeros(1, 4, 16, 24))


# -- activation checkpointing ----------------------------------------------------------------------------------


def _tiny_task(**kwargs: object) -> MedDelineaTask:
    torch.manual_seed(0)
    task = MedDelineaTask(
        dit="DiT-tiny/2", vae="tiny", image_size=32, control_blocks=2, seg_max_timestep=1000, **kwargs
    )
    pretrained_like(task.model, std=0.05, only_zero=True)  # DiT's zero-initialised gates would stop every gradient
    pretrained_like(task.model.control.patch_embed)  # and the zero Z_o half of this one the zero conv's
    return task


def _batch(n: int = 2, size: int = 32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "image": torch.rand(n, 1, size, size, generator=g) * 2 - 1,
        "mask": torch.randint(0, 9, (n, size, size), generator=g),
        "labelled": torch.ones(n, 9, dtype=torch.bool),
    }


@pytest.mark.parametrize("parts", [True, ["control"], ["base"], ["decoder"]])
def test_activation_checkpointing_keeps_the_gradients(parts: bool | list[str]) -> None:
    plain, checkpointed = _tiny_task(), _tiny_task(activation_checkpointing=parts)
    checkpointed.load_state_dict(plain.state_dict())
    assert checkpointed.model.checkpointing == (set(CHECKPOINT_PARTS) if parts is True else set(parts))
    grads, calls = [], []
    for task in (plain, checkpointed):
        task.train()
        model = task.model
        watched = {"control": model.control.blocks[0], "base": model.dit.transformer_blocks[-1]}
        watched["decoder"] = model.vae.vae.decoder.up_blocks[0]
        count = dict.fromkeys(watched, 0)
        for part, module in watched.items():
            module.register_forward_pre_hook(
                lambda *_, part=part, count=count: count.__setitem__(part, count[part] + 1)
            )
        losses = task.losses(_batch(), generator=torch.Generator().manual_seed(2))
        assert losses["loss_seg"] > 0  # the decoder of L_seg ran with gradients
        losses["loss"].backward()
        grads.append({k: p.grad for k, p in task.named_parameters() if p.requires_grad})
        calls.append(count)
    assert calls[0] == dict.fromkeys(CHECKPOINT_PARTS, 1)  # one forward each ...
    assert calls[1] == {
        part: 1 + (part in checkpointed.model.checkpointing) for part in CHECKPOINT_PARTS
    }  # + recompute
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name, grad in grads[0].items():
        assert grad is not None and grad.abs().sum() > 0, name  # every trainable part receives a gradient
        assert torch.allclose(grad, grads[1][name], rtol=1e-5, atol=1e-7), name


def test_unknown_checkpointing_parts_are_refused() -> None:
    with pytest.raises(OptionError, match=r"activation_checkpointing \['vae'\] unknown"):
        MedDelineaTask(dit="DiT-tiny/2", vae="tiny", image_size=32, control_blocks=1, activation_checkpointing=["vae"])


# -- per-resolution micro-batches ------------------------------------------------------------------------------


@pytest.mark.parametrize("ranks", [1, 2])
def test_every_optimiser_step_holds_the_papers_composition(ranks: int) -> None:
    case_of = np.repeat(np.arange(9), 40)  # 360 slices
    accumulate = 10  # 2 cycles of (1 x 8 at 256 + 4 x 2 at 512): 2 batches of 8 at each size
    for rank in range(ranks):
        sampler = SliceBatchSampler(
            batch_size=8, case_of=case_of, resolutions=[256, 512], shuffle=True, num_replicas=ranks, rank=rank,
            micro_batch_sizes={256: 8, 512: 2}, accumulate=accumulate,
        )  # fmt: skip
        for epoch in (0, 1):
            sampler.set_epoch(epoch)
            batches = list(sampler)
            assert len(batches) == len(sampler) and len(batches) % accumulate == 0
            for start in range(0, len(batches), accumulate):
                step = batches[start : start + accumulate]
                sizes = Counter(window for batch in step for _, window, _ in batch)
                assert sizes == {256: 16, 512: 16}  # samples per step constant, half at each size
                assert [len(b) for b in step] == [8, 2, 2, 2, 2] * 2 and all(
                    len({w for _, w, _ in b}) == 1 for b in step
                )
            flat = [i for batch in batches for i, _, _ in batch]
            assert len(set(flat)) == len(flat)  # no slice twice within an epoch
    with pytest.raises(ValueError, match=r"accumulate 8 is not a whole number of resolution cycles of 5"):
        SliceBatchSampler(batch_size=8, case_of=case_of, resolutions=[256, 512], shuffle=True,
                          micro_batch_sizes={256: 8, 512: 2}, accumulate=8)  # fmt: skip


def test_micro_batch_options_are_checked_and_weighted(tmp_path: Path) -> None:
    dm = FolderDataModule(root=str(tmp_path), resolution=[256, 512], batch_size=32, micro_batch_size={256: 32, 512: 8})
    cycle, weights = dm.micro_batch_plan(accumulate=20)
    assert cycle == [(256, 32)] + [(512, 8)] * 4 and weights == {256: 2.5, 512: 0.625}
    # 20 micro-batches, each loss x weight / 20: 4 x 32 x 2.5 + 16 x 8 x 0.625 = 400 = 256 samples x 20 / 12.8
    with pytest.raises(OptionError, match=r"accumulate_grad_batches 8 counts micro-batches.*e\.g\. 20 for 8 batches"):
        dm.micro_batch_plan(accumulate=8)
    with pytest.raises(OptionError, match=r"micro_batch_size for 512 px must be a positive divisor of batch_size 32"):
        FolderDataModule(root=str(tmp_path), resolution=[256, 512], batch_size=32, micro_batch_size={256: 32, 512: 5})


# -- the memory plan -------------------------------------------------------------------------------------------


def test_memory_plan_scales_with_the_micro_batch_and_checkpointing_saves() -> None:
    with torch.device("meta"):  # the paper's network, built without memory
        model = MedDelinea(build_dit("DiT-XL/2", sample_size=32), MaskVAE(build_vae("sd")), control_blocks=15)
    for module in model.frozen_modules():
        module.requires_grad_(False)
    plain = estimate(model, 512, 8, "bf16-mixed")
    assert plain.lines["weights"] == pytest.approx(1253.7e6 * 4, rel=1e-3)
    assert plain.lines["AdamW state"] == pytest.approx(420.2e6 * 8, rel=1e-3)
    assert estimate(model, 512, 16, "bf16-mixed").peak > plain.peak > estimate(model, 256, 8, "bf16-mixed").peak
    checkpointed = estimate(model, 512, 8, "bf16-mixed", CHECKPOINT_PARTS)
    assert checkpointed.peak < plain.peak and checkpointed.lines["recomputed block"] > 0
    assert "512² x 8 per micro-batch, bf16-mixed" in checkpointed.describe(48e9)


def test_profiles_count_what_autograd_keeps() -> None:
    task = _tiny_task()
    profiles = profile_model(task.model, 32)
    base, control = profiles["base"], profiles["control"]
    assert base.kept[1] > 0 and control.kept[1] > base.kept[1]  # trainable weights also keep their inputs
    hidden = task.model.dit.inner_dim * (32 // 2 // 2) ** 2 * 4  # (T, D) float32: a checkpointed block's input
    assert base.kept_checkpointed[1] == pytest.approx(hidden, abs=64)  # + the timestep and label
    assert base.kept_checkpointed[1] < base.kept[1]
    assert profiles["decoder"].kept_checkpointed[1] < profiles["decoder"].kept[1]
    plan = estimate(task.model, 32, 4, "32-true", (), profiles=profiles)
    assert plan.lines["base activations"] == pytest.approx(4 * 4 * base.kept[1] + 4 * max(0, base.kept[0]))


def test_fit_prints_the_memory_plan_and_warns_when_it_does_not_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    import delinea.tasks.meddelinea as module

    task = _tiny_task()
    printed: list[str] = []
    monkeypatch.setattr(task, "print", lambda text: printed.append(text))
    monkeypatch.setattr(task, "memory_plans", lambda: [estimate(task.model, 512, 8, "bf16-mixed")])
    monkeypatch.setattr(module, "device_memory", lambda device: 1e6)
    with pytest.warns(UserWarning, match=r"a 512² micro-batch of 8 needs about .* GiB, more than the 0\.0 GiB"):
        task.report_memory_plan()
    assert printed and printed[0].startswith("delinea: memory plan at 512² x 8")


# -- the paper's network, one training step (slow: 11-16 GiB of RAM, minutes on 2 cores) ------------------------


@pytest.mark.slow
@pytest.mark.parametrize("resolution", [256, 512])
def test_paper_size_training_step_reaches_the_control_branch_within_the_plan(resolution: int) -> None:
    from benchmarks.common import PeakMemory

    device = torch.device("cpu")
    with PeakMemory(device) as peak:
        torch.manual_seed(0)
        task = MedDelineaTask(
            dit="DiT-XL/2", vae="sd", image_size=resolution, control_blocks=15, seg_max_timestep=1000
        )  # the paper's network on random weights
        pretrained_like(task.model, std=0.02, only_zero=True)  # zero-initialised gates perturbed: gradients flow
        pretrained_like(task.model.control.patch_embed, std=0.02)
        task.train()
        optimizer = torch.optim.AdamW([p for p in task.parameters() if p.requires_grad], lr=2e-5)
        losses = task.losses(_batch(1, resolution), generator=torch.Generator().manual_seed(2))
        losses["loss"].backward()
        control = [p.grad for p in task.model.control.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in control)
        assert sum(float(g.abs().sum()) for g in control) > 0  # the control branch learns
        assert all(float(g.abs().sum()) > 0 for g in (p.grad for p in task.model.control.zero_linears.parameters()))
        optimizer.step()
    plan = estimate(task.model, resolution, 1, "32-true")
    measured = peak.mib * 2**20
    print(f"{resolution}²: measured {measured / 2**30:.2f} GiB, plan {plan.peak / 2**30:.2f} GiB ({plan.describe()})")
    assert measured < plan.peak * 1.15 + 2**30  # the plan plus a margin (RSS counts allocator slack too)
