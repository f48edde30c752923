"""The networks: exact initial equivalence, checkpoint conversion, the palette head, samplers, bad input."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from delinea.labels import PALETTE, rgb_to_mask
from delinea.models import (
    SCHEDULERS,
    MaskVAE,
    MedDelinea,
    build_dit,
    build_vae,
    convert_original_dit,
    load_dit,
    load_vae,
    make_sampler,
    save_dit,
    save_vae,
)
from delinea.testing.backbones import pretrained_like


@pytest.fixture(scope="module")
def model() -> MedDelinea:
    torch.manual_seed(0)
    dit = build_dit("DiT-tiny/2", sample_size=16)
    _randomise(dit)
    return MedDelinea(dit, MaskVAE(build_vae("tiny")), control_blocks=3).eval()


def _randomise(module: torch.nn.Module) -> None:
    """DiT initialises its adaLN and output layers to zero; tests need weights that make every term count."""
    pretrained_like(module)


def test_init_output_equals_base_dit_exactly(model: MedDelinea) -> None:
    latent = torch.randn(3, 4, 16, 16)
    image_latent = torch.randn(3, 4, 16, 16)
    timestep = torch.tensor([0, 500, 999])
    steered = model.predict_noise(latent, timestep, image_latent)
    base = model.dit(latent, timestep=timestep, class_labels=torch.full((3,), 1000)).sample[:, :4]
    assert steered.shape == (3, 4, 16, 16)
    assert torch.equal(steered, base)
    assert steered.abs().mean() > 0.01  # not trivially zero


def test_frozen_parts_stay_in_eval_mode(model: MedDelinea) -> None:
    model.train()
    assert all(not m.training for m in model.dit.modules())
    assert all(not m.training for m in model.vae.vae.modules())
    assert model.control.training
    label_table = model.dit.transformer_blocks[0].norm1.emb.class_embedder
    torch.manual_seed(1)
    # In train mode diffusers drops 10% of labels; a frozen DiT in eval mode never does.
    assert torch.equal(label_table(torch.zeros(2000, dtype=torch.long)), label_table.embedding_table.weight[[0] * 2000])
    model.eval()


def _original_timestep_embedding(t: torch.Tensor, dim: int = 256) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _original_pos_embed(dim: int, grid: int) -> np.ndarray:
    def one_d(d: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    w, h = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))
    return np.concatenate([one_d(dim // 2, w), one_d(dim // 2, h)], axis=1)


def _original_dit_forward(
    sd: dict, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, depth: int, heads: int, patch: int
) -> torch.Tensor:
    """The facebookresearch/DiT forward written from its equations, over an original-format state dict."""

    def linear(h: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(h, sd[f"{name}.weight"], sd[f"{name}.bias"])

    def modulate(h: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return h * (1 + scale[:, None]) + shift[:, None]

    n = x.shape[0]
    h = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=patch)
    h = h.flatten(2).transpose(1, 2) + sd["pos_embed"]  # (N, T, D)
    dim = h.shape[-1]
    c = linear(F.silu(linear(_original_timestep_embedding(t), "t_embedder.mlp.0")), "t_embedder.mlp.2")
    c = c + sd["y_embedder.embedding_table.weight"][y]
    for d in range(depth):
        b = f"blocks.{d}."
        sm, cm, gm, sf, cf, gf = linear(F.silu(c), b + "adaLN_modulation.1").chunk(6, dim=1)
        a = modulate(F.layer_norm(h, (dim,), eps=1e-6), sm, cm)
        q, k, v = linear(a, b + "attn.qkv").reshape(n, -1, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) / math.sqrt(dim // heads)).softmax(-1) @ v
        h = h + gm[:, None] * linear(attn.transpose(1, 2).reshape(n, -1, dim), b + "attn.proj")
        m = modulate(F.layer_norm(h, (dim,), eps=1e-6), sf, cf)
        h = h + gf[:, None] * linear(F.gelu(linear(m, b + "mlp.fc1"), approximate="tanh"), b + "mlp.fc2")
    shift, scale = linear(F.silu(c), "final_layer.adaLN_modulation.1").chunk(2, dim=1)
    h = linear(modulate(F.layer_norm(h, (dim,), eps=1e-6), shift, scale), "final_layer.linear")
    side = int(h.shape[1] ** 0.5)
    out_ch = h.shape[-1] // patch**2
    h = h.reshape(n, side, side, patch, patch, out_ch)
    return torch.einsum("nhwpqc->nchpwq", h).reshape(n, out_ch, side * patch, side * patch)


def _original_state_dict(depth: int = 2, dim: int = 384, patch: int = 2, grid: int = 4) -> dict:
    g = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.05

    sd = {
        "x_embedder.proj.weight": rand(dim, 4, patch, patch),
        "x_embedder.proj.bias": rand(dim),
        "pos_embed": torch.from_numpy(_original_pos_embed(dim, grid)).float()[None],
        "t_embedder.mlp.0.weight": rand(dim, 256),
        "t_embedder.mlp.0.bias": rand(dim),
        "t_embedder.mlp.2.weight": rand(dim, dim),
        "t_embedder.mlp.2.bias": rand(dim),
        "y_embedder.embedding_table.weight": rand(1001, dim),
        "final_layer.adaLN_modulation.1.weight": rand(2 * dim, dim),
        "final_layer.adaLN_modulation.1.bias": rand(2 * dim),
        "final_layer.linear.weight": rand(patch * patch * 8, dim),
        "final_layer.linear.bias": rand(patch * patch * 8),
    }
    for d in range(depth):
        b = f"blocks.{d}."
        sd |= {
            b + "attn.qkv.weight": rand(3 * dim, dim),
            b + "attn.qkv.bias": rand(3 * dim),
            b + "attn.proj.weight": rand(dim, dim),
            b + "attn.proj.bias": rand(dim),
            b + "mlp.fc1.weight": rand(4 * dim, dim),
            b + "mlp.fc1.bias": rand(4 * dim),
            b + "mlp.fc2.weight": rand(dim, 4 * dim),
            b + "mlp.fc2.bias": rand(dim),
            b + "adaLN_modulation.1.weight": rand(6 * dim, dim),
            b + "adaLN_modulation.1.bias": rand(6 * dim),
        }
    return sd


def test_original_checkpoint_converts_to_the_same_function(tmp_path: Path) -> None:
    sd = _original_state_dict()
    torch.save({"model": {}, "ema": sd, "opt": {}}, tmp_path / "dit.pt")  # a train.py checkpoint
    dit = load_dit(tmp_path / "dit.pt", num_heads=6).eval()  # depth 2: no preset, so the heads are given
    assert dit.config.num_layers == 2 and dit.config.patch_size == 2 and dit.config.sample_size == 8
    x = torch.randn(3, 4, 8, 8)
    t = torch.tensor([3, 250, 999])
    y = torch.tensor([7, 1000, 42])
    expected = _original_dit_forward(sd, x, t, y, depth=2, heads=6, patch=2)
    got = dit(x, timestep=t, class_labels=y).sample
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()


def test_diffusers_timestep_sinusoid_fixed_to_the_original() -> None:
    dit = build_dit("DiT-tiny/2", sample_size=8)
    t = torch.tensor([0, 1, 10, 500, 999])
    ours = dit.transformer_blocks[0].norm1.emb.time_proj(t)
    assert torch.allclose(ours, _original_timestep_embedding(t), atol=1e-5)


def test_diffusers_folder_round_trip_and_bad_folders(tmp_path: Path) -> None:
    dit = build_dit("DiT-tiny/4", sample_size=16)
    _randomise(dit)
    save_dit(dit, tmp_path / "transformer")
    loaded = load_dit(tmp_path)  # the repo root: its transformer/ is found
    x, t, y = torch.randn(2, 4, 16, 16), torch.tensor([5, 600]), torch.tensor([1000, 3])
    assert torch.equal(
        dit.eval()(x, timestep=t, class_labels=y).sample, loaded.eval()(x, timestep=t, class_labels=y).sample
    )
    weights = tmp_path / "transformer" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    state.pop("proj_out_2.bias")
    state["extra.weight"] = torch.zeros(1)
    save_file(state, str(weights))
    with pytest.raises(ValueError, match=r"1 missing \(e\.g\. \['proj_out_2\.bias'\]\), 1 unexpected"):
        load_dit(tmp_path)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_dit(tmp_path / "nowhere")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"junk\.pt"):
        load_dit(tmp_path / "junk.pt")


def test_vae_folder_round_trip(tmp_path: Path) -> None:
    vae = build_vae("tiny")
    save_vae(vae, tmp_path / "vae")
    loaded = load_vae(tmp_path)
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    assert torch.equal(vae.encode(x).latent_dist.mean, loaded.encode(x).latent_dist.mean)


def test_head_argmax_is_nearest_palette_decoding(model: MedDelinea) -> None:
    latent = torch.randn(4, 4, 16, 16) * 3
    with torch.no_grad():
        rgb = model.vae.decode_rgb(latent)
        logits = model.vae.decode_logits(latent)
    nearest = rgb_to_mask(rgb)
    assert len(nearest.unique()) > 3  # a real test: many classes appear
    assert torch.equal(logits.argmax(1), nearest)


def test_palette_round_trip() -> None:
    mask = torch.arange(9).repeat(2, 3, 1)
    from delinea.labels import mask_to_rgb

    assert torch.equal(rgb_to_mask(mask_to_rgb(mask) + 0.3 * torch.rand(2, 3, 3, 9) - 0.15), mask)
    assert PALETTE.shape == (9, 3)


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_every_scheduler_samples(model: MedDelinea, scheduler: str) -> None:
    image = torch.rand(2, 1, 32, 32) * 2 - 1
    probabilities, uncertainty = model.sample(
        image, scheduler=scheduler, steps=3, ensemble=2, generator=torch.Generator().manual_seed(0)
    )
    assert probabilities.shape == (2, 9, 32, 32) and uncertainty.shape == (2, 32, 32)
    assert torch.allclose(probabilities.sum(1), torch.ones(2, 32, 32), atol=1e-5)
    assert torch.isfinite(probabilities).all()
    assert 0 <= uncertainty.min() and uncertainty.max() <= 1 + 1e-6


def test_ensemble_uncertainty_is_the_normalised_entropy(model: MedDelinea) -> None:
    image = torch.rand(1, 1, 32, 32) * 2 - 1
    probabilities, uncertainty = model.sample(
        image, scheduler="ddim", steps=2, ensemble=3, generator=torch.Generator().manual_seed(0)
    )
    entropy = -(probabilities * probabilities.log()).sum(1) / math.log(9)
    assert torch.allclose(uncertainty, entropy, atol=1e-5)
    single, _ = model.sample(
        image, scheduler="euler_ancestral", steps=2, ensemble=1, generator=torch.Generator().manual_seed(0)
    )
    assert not torch.allclose(single, probabilities)


def test_bad_inputs_name_the_value(model: MedDelinea) -> None:
    with pytest.raises(ValueError, match=r"image must be \(N, 1 or 3, H, W\), got shape \(2, 2, 32, 32\)"):
        model.check_inputs(torch.zeros(2, 2, 32, 32))
    with pytest.raises(ValueError, match=r"mask shape \(2, 16, 32\) does not match image shape"):
        model.check_inputs(torch.zeros(2, 1, 32, 32), torch.zeros(2, 16, 32))
    with pytest.raises(ValueError, match=r"image size 34x32 is not divisible by 4 \(VAE factor 2 x patch 2\)"):
        model.check_inputs(torch.zeros(2, 1, 34, 32))
    with pytest.raises(ValueError, match="control_blocks K=5 must be between 1 and the base DiT's 4 blocks"):
        MedDelinea(build_dit("DiT-tiny/2", sample_size=16), MaskVAE(build_vae("tiny")), control_blocks=5)
    with pytest.raises(ValueError, match="unknown scheduler 'heun'"):
        make_sampler("heun")
    with pytest.raises(ValueError, match="unknown DiT preset 'DiT-XXL/2'"):
        build_dit("DiT-XXL/2")
    with pytest.raises(ValueError, match="class_label 1001 is outside"):
        MedDelinea(build_dit("DiT-tiny/2", sample_size=16), MaskVAE(build_vae("tiny")), 2, class_label=1001)


def test_convert_rejects_foreign_checkpoints() -> None:
    with pytest.raises(ValueError, match="not an original DiT checkpoint"):
        convert_original_dit({"weight": torch.zeros(1)})
    sd = _original_state_dict(depth=1)
    sd["blocks.0.attn.extra"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"unexpected keys.*blocks\.0\.attn\.extra"):
        convert_original_dit(sd)
