"""The frozen base Diffusion Transformer: diffusers' ``DiTTransformer2DModel``, size presets and weight loading.

The base network is diffusers' DiT so that pretrained ``facebook/DiT-XL-2-256`` folders load as they are. Its
forward is re-run here block by block (:func:`embed`, :func:`final_layer`) so that the Control DiT can add a
residual after each block. Original facebookresearch/DiT ``.pt`` checkpoints are converted key by key.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DiTTransformer2DModel
from torch import nn

from delinea.errors import CheckpointError
from delinea.models.weights import is_weight_file, load_torch_file, load_weights, read_weights
from delinea.outputs import atomic_files

# DiT size presets (depth, hidden size, heads) from the DiT paper, plus a tiny one for tests and CPU demos.
DIT_SIZES: dict[str, tuple[int, int, int]] = {
    "tiny": (4, 64, 4),
    "mini": (6, 192, 6),
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}
DIT_PRESETS: tuple[str, ...] = tuple(f"DiT-{size}/{patch}" for size in DIT_SIZES for patch in (2, 4, 8))


def build_dit(
    preset: str = "DiT-XL/2",
    sample_size: int = 32,
    in_channels: int = 4,
    learn_sigma: bool = True,
    num_classes: int = 1000,
    depth: int | None = None,
) -> DiTTransformer2DModel:
    """Build a randomly initialised DiT from a preset name such as ``DiT-B/4`` or ``DiT-tiny/2``.

    Args:
        preset: ``DiT-{tiny,mini,S,B,L,XL}/{2,4,8}``.
        sample_size: latent height and width the positional embedding is laid out for.
        in_channels: latent channels.
        learn_sigma: output twice the latent channels (ε and σ) like the released DiTs.
        num_classes: class labels; one more row is kept for the null class.
        depth: blocks, if not the preset's (e.g. one DiT-XL block to measure its memory).
    """
    if preset not in DIT_PRESETS:
        raise ValueError(f"unknown DiT preset {preset!r}; expected one of {', '.join(DIT_PRESETS)}")
    size, patch = preset.removeprefix("DiT-").split("/")
    preset_depth, hidden, heads = DIT_SIZES[size]
    depth = preset_depth if depth is None else depth
    if sample_size % int(patch):
        raise ValueError(f"sample_size {sample_size} is not divisible by the patch size {patch} of {preset}")
    dit = DiTTransformer2DModel(
        num_attention_heads=heads,
        attention_head_dim=hidden // heads,
        in_channels=in_channels,
        out_channels=2 * in_channels if learn_sigma else in_channels,
        num_layers=depth,
        sample_size=sample_size,
        patch_size=int(patch),
        num_embeds_ada_norm=num_classes,
        norm_eps=1e-6,
    )
    _init_like_original(dit)
    return match_original_dit(dit)


def _init_like_original(dit: DiTTransformer2DModel) -> None:
    """DiT's initialisation: xavier linears, normal embeddings, zero adaLN modulation and output (adaLN-Zero)."""
    for module in dit.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)
    weight = dit.pos_embed.proj.weight
    nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
    for block in dit.transformer_blocks:
        emb = block.norm1.emb
        nn.init.normal_(emb.class_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(emb.timestep_embedder.linear_1.weight, std=0.02)
        nn.init.normal_(emb.timestep_embedder.linear_2.weight, std=0.02)
        nn.init.zeros_(block.norm1.linear.weight)
        nn.init.zeros_(block.norm1.linear.bias)
    # One shared embedder in the original: start every block's copy equal.
    first = dit.transformer_blocks[0].norm1.emb.state_dict()
    for block in dit.transformer_blocks[1:]:
        block.norm1.emb.load_state_dict(first)
    for layer in (dit.proj_out_1, dit.proj_out_2):
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)


def match_original_dit(dit: DiTTransformer2DModel) -> DiTTransformer2DModel:
    """Make diffusers' DiT compute the original DiT's equations, which the pretrained weights were trained with.

    diffusers builds the timestep sinusoid with ``downscale_freq_shift=1`` (exponent divided by half - 1) where
    the original divides by half, and its pre-MLP LayerNorm uses eps 1e-5 where the original uses 1e-6.
    """
    for block in dit.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0
        block.norm3.eps = 1e-6
    return dit


def run_block(
    block: nn.Module,
    hidden: torch.Tensor,
    timestep: torch.Tensor,
    class_labels: torch.Tensor,
    checkpoint: bool = False,
) -> torch.Tensor:
    """One adaLN-Zero transformer block: (N, T, D) -> (N, T, D). With ``checkpoint`` (and gradients on), its
    activations are recomputed in the backward pass instead of kept (``torch.utils.checkpoint``, non-reentrant)."""
    if checkpoint and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(
            block, hidden, timestep=timestep, class_labels=class_labels, use_reentrant=False
        )
    return block(hidden, timestep=timestep, class_labels=class_labels)


def final_layer(
    dit: DiTTransformer2DModel,
    hidden: torch.Tensor,
    timestep: torch.Tensor,
    class_labels: torch.Tensor,
    grid: tuple[int, int],
) -> torch.Tensor:
    """adaLN output layer and unpatchify of a ``grid`` of (rows, columns) tokens: (N, T, D) -> (N, C_out, H, W)."""
    conditioning = dit.transformer_blocks[0].norm1.emb(timestep, class_labels, hidden_dtype=hidden.dtype)  # (N, D)
    shift, scale = dit.proj_out_1(F.silu(conditioning)).chunk(2, dim=1)
    hidden = dit.norm_out(hidden) * (1 + scale[:, None]) + shift[:, None]
    hidden = dit.proj_out_2(hidden)  # (N, T, p*p*C_out)
    p, c = dit.patch_size, dit.out_channels
    rows, cols = grid
    hidden = hidden.reshape(hidden.shape[0], rows, cols, p, p, c)
    return torch.einsum("nhwpqc->nchpwq", hidden).reshape(hidden.shape[0], c, rows * p, cols * p)


def forward(
    dit: DiTTransformer2DModel,
    latent: torch.Tensor,
    timestep: torch.Tensor,
    class_labels: torch.Tensor,
    residual: Callable[[int, torch.Tensor], torch.Tensor | None] | None = None,
    checkpoint: bool = False,
) -> torch.Tensor:
    """The DiT forward run block by block, for square or oblong latents; ``residual(i, h)`` may return a tensor
    added after block i; ``checkpoint`` recomputes block activations in the backward pass."""
    check_latent(dit, latent)
    grid = (latent.shape[-2] // dit.patch_size, latent.shape[-1] // dit.patch_size)
    hidden = dit.pos_embed(latent)  # (N, T, D), T = rows * columns of patches
    for i, block in enumerate(dit.transformer_blocks):
        hidden = run_block(block, hidden, timestep, class_labels, checkpoint)
        extra = residual(i, hidden) if residual is not None else None
        if extra is not None:
            hidden = hidden + extra
    return final_layer(dit, hidden, timestep, class_labels, grid)


def check_latent(dit: DiTTransformer2DModel, latent: torch.Tensor) -> None:
    """Raise a ValueError naming the shape unless ``latent`` is (N, in_channels, h, w) with h and w positive
    multiples of the patch size (the block loop then unpatchifies any such grid, square or oblong)."""
    channels, patch = int(dit.config.in_channels), int(dit.patch_size)
    if latent.ndim != 4 or latent.shape[1] != channels:
        raise ValueError(f"DiT latent must be (N, {channels}, h, w), got shape {tuple(latent.shape)}")
    height, width = latent.shape[-2:]
    if height < patch or width < patch or height % patch or width % patch:
        raise ValueError(
            f"DiT latent {height}x{width} (shape {tuple(latent.shape)}) is not a grid of {patch}x{patch} patches: "
            f"height and width must be positive multiples of the patch size {patch}"
        )


def check_square(dit: DiTTransformer2DModel, latent: torch.Tensor) -> None:
    """diffusers' own ``DiTTransformer2DModel.forward`` unpatchifies a square token grid: refuse anything else by
    name rather than with a reshape error (:func:`forward` takes oblong latents)."""
    check_latent(dit, latent)
    if latent.shape[-2] != latent.shape[-1]:
        raise ValueError(
            f"diffusers' DiT forward needs a square latent, got {latent.shape[-2]}x{latent.shape[-1]} "
            f"(shape {tuple(latent.shape)}): crop to a square, or run delinea.models.dit.forward"
        )


# ----------------------------------------------------------------------------------------------------------
# Loading


def load_dit(path: str | Path, num_heads: int | None = None) -> DiTTransformer2DModel:
    """Load a DiT from a local diffusers folder (``transformer/`` of ``facebook/DiT-XL-2-256`` or its parent)
    or from an original facebookresearch/DiT ``.pt`` file: a released state dict (``DiT-XL-2-256x256.pt``) or a
    ``train.py`` checkpoint ``{"model", "ema", "opt", "args"}`` (its EMA weights). Nothing is downloaded.

    Args:
        path: the folder or file.
        num_heads: attention heads of an original ``.pt``, whose tensors do not carry the head count (a diffusers
            folder's config does). None: from a ``train.py`` checkpoint's ``args.model``, else from the DiT preset
            of the same depth and hidden size; a shape matching no preset needs it.

    Raises:
        FileNotFoundError: the path does not exist.
        CheckpointError: the file cannot be read safely, or its head count cannot be determined.
        ValueError: the weights do not fit the architecture (missing or unexpected keys are listed).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"DiT weights not found at {path}: expected a diffusers folder or a DiT .pt file")
    if path.is_file():
        return convert_original_dit(load_torch_file(path), source=str(path), num_heads=num_heads)
    folder = path / "transformer" if (path / "transformer" / "config.json").is_file() else path
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{folder} has no config.json: expected a diffusers DiTTransformer2DModel folder")
    config = json.loads(config_file.read_text())
    if num_heads is not None and num_heads != config.get("num_attention_heads"):
        raise CheckpointError(
            f"num_heads={num_heads} contradicts {config_file}, which has num_attention_heads="
            f"{config.get('num_attention_heads')}: leave num_heads unset for a diffusers folder"
        )
    if config.get("norm_type", "ada_norm_zero") != "ada_norm_zero":
        raise ValueError(f"{config_file}: norm_type {config['norm_type']!r} is not a DiT (expected 'ada_norm_zero')")
    # The hub config names the legacy Transformer2DModel; from_config reads its DiT arguments all the same.
    dit = DiTTransformer2DModel.from_config(config)
    load_weights(dit, read_weights(folder), source=str(folder))
    return match_original_dit(dit)


def save_dit(dit: DiTTransformer2DModel, folder: str | Path, max_shard_size: str = "4MB") -> None:
    """Write a DiT as a diffusers folder (config.json + safetensors shards) that :func:`load_dit` reads.

    Small shards keep every file of weights shipped in the repository under 5 MB. Each file is written whole, and
    an earlier save's weights that the new one does not replace are removed (:func:`~delinea.outputs.atomic_files`).
    """
    with atomic_files(folder, stale=is_weight_file) as staging:
        dit.save_pretrained(str(staging), safe_serialization=True, max_shard_size=max_shard_size)


def _heads_of_args(args: object, source: str) -> int | None:
    """Heads of the model a ``train.py`` checkpoint's ``args.model`` names (``DiT-XL/2``), or None."""
    name = getattr(args, "model", None)
    if not isinstance(name, str):
        return None
    size = name.removeprefix("DiT-").split("/")[0]
    if size not in DIT_SIZES:
        raise CheckpointError(
            f"{source}: args.model {name!r} is no DiT preset ({', '.join(DIT_PRESETS)}); pass num_heads"
        )
    return DIT_SIZES[size][2]


def original_num_heads(
    checkpoint: dict, hidden: int, depth: int, source: str = "checkpoint", num_heads: int | None = None
) -> int:
    """The head count of an original DiT checkpoint, which its tensors do not carry.

    In order: ``num_heads`` if given (it must agree with a ``train.py`` checkpoint's ``args.model``); the preset
    that ``args.model`` names; the preset with this depth and hidden size (the released ``.pt`` files), a guess
    that is warned about. Anything else is ambiguous: hidden 384 could be 6 heads of 64 or 16 of 24, and a wrong
    guess loads silently wrong.

    Raises:
        CheckpointError: the count cannot be determined, contradicts ``args.model``, or does not divide ``hidden``.
    """
    from_args = _heads_of_args(checkpoint.get("args"), source)
    if num_heads is not None:
        if from_args is not None and from_args != num_heads:
            raise CheckpointError(
                f"{source}: num_heads={num_heads} contradicts its args.model {checkpoint['args'].model!r} "
                f"({from_args} heads)"
            )
    elif from_args is not None:
        num_heads = from_args
    else:
        presets = [name for name, (d, h, _) in DIT_SIZES.items() if (d, h) == (depth, hidden)]
        if not presets:
            raise CheckpointError(
                f"{source}: a DiT of depth {depth} and hidden size {hidden} is no preset, and the head count is not "
                "stored in its weights: pass num_heads (--model.dit_num_heads)"
            )
        num_heads = DIT_SIZES[presets[0]][2]
        warnings.warn(
            f"{source}: the head count is not stored in a DiT .pt's weights; assuming {num_heads}, that of the "
            f"DiT-{presets[0]} preset of the same depth and width. A DiT trained with another count loads without "
            "error and computes wrong outputs: if so, pass --model.dit_num_heads (num_heads)",
            stacklevel=2,
        )
    if num_heads < 1 or hidden % num_heads:
        raise CheckpointError(f"{source}: num_heads={num_heads} does not divide the hidden size {hidden}")
    return num_heads


def convert_original_dit(
    checkpoint: dict[str, torch.Tensor], source: str = "checkpoint", num_heads: int | None = None
) -> DiTTransformer2DModel:
    """Convert a facebookresearch/DiT state dict (or a ``train.py`` checkpoint: ``ema`` weights preferred, else
    ``model``) to diffusers.

    The architecture is read off the tensor shapes; the head count, which shapes do not carry, as
    :func:`original_num_heads` decides.
    """
    state = checkpoint.get("ema", checkpoint.get("model", checkpoint)) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or "x_embedder.proj.weight" not in state:
        raise ValueError(f"{source} is not an original DiT checkpoint: no 'x_embedder.proj.weight' key")
    hidden, in_channels, patch, _ = state["x_embedder.proj.weight"].shape
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    expected = {"pos_embed", "x_embedder.proj.weight", "x_embedder.proj.bias", "y_embedder.embedding_table.weight"}
    expected |= {f"t_embedder.mlp.{i}.{kind}" for i in (0, 2) for kind in ("weight", "bias")}
    expected |= {
        f"final_layer.{name}.{kind}" for name in ("linear", "adaLN_modulation.1") for kind in ("weight", "bias")
    }
    block_parts = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1")
    expected |= {
        f"blocks.{d}.{part}.{kind}" for d in range(depth) for part in block_parts for kind in ("weight", "bias")
    }
    unexpected = sorted(set(state) - expected)
    if unexpected:
        raise ValueError(f"{source}: unexpected keys for an original DiT checkpoint: {unexpected[:5]}")
    num_heads = original_num_heads(checkpoint, hidden, depth, source, num_heads)
    out_channels = state["final_layer.linear.weight"].shape[0] // (patch * patch)
    table_rows = state["y_embedder.embedding_table.weight"].shape[0]
    tokens = state["pos_embed"].shape[1] if "pos_embed" in state else None
    sample_size = math.isqrt(tokens) * patch if tokens else 32
    dit = DiTTransformer2DModel(
        num_attention_heads=num_heads,
        attention_head_dim=hidden // num_heads,
        in_channels=in_channels,
        out_channels=out_channels,
        num_layers=depth,
        sample_size=sample_size,
        patch_size=patch,
        num_embeds_ada_norm=table_rows - 1,  # the extra row is the null class
        norm_eps=1e-6,
    )
    converted: dict[str, torch.Tensor] = {
        "pos_embed.proj.weight": state["x_embedder.proj.weight"],
        "pos_embed.proj.bias": state["x_embedder.proj.bias"],
        "proj_out_1.weight": state["final_layer.adaLN_modulation.1.weight"],
        "proj_out_1.bias": state["final_layer.adaLN_modulation.1.bias"],
        "proj_out_2.weight": state["final_layer.linear.weight"],
        "proj_out_2.bias": state["final_layer.linear.bias"],
    }
    for d in range(depth):
        new, old = f"transformer_blocks.{d}.", f"blocks.{d}."
        # The original shares one timestep and one label embedder; diffusers keeps a copy in every block.
        for kind in ("weight", "bias"):
            converted[new + f"norm1.emb.timestep_embedder.linear_1.{kind}"] = state[f"t_embedder.mlp.0.{kind}"]
            converted[new + f"norm1.emb.timestep_embedder.linear_2.{kind}"] = state[f"t_embedder.mlp.2.{kind}"]
            converted[new + f"norm1.linear.{kind}"] = state[old + f"adaLN_modulation.1.{kind}"]
            q, k, v = state[old + f"attn.qkv.{kind}"].chunk(3, dim=0)
            converted[new + f"attn1.to_q.{kind}"] = q
            converted[new + f"attn1.to_k.{kind}"] = k
            converted[new + f"attn1.to_v.{kind}"] = v
            converted[new + f"attn1.to_out.0.{kind}"] = state[old + f"attn.proj.{kind}"]
            converted[new + f"ff.net.0.proj.{kind}"] = state[old + f"mlp.fc1.{kind}"]
            converted[new + f"ff.net.2.{kind}"] = state[old + f"mlp.fc2.{kind}"]
        converted[new + "norm1.emb.class_embedder.embedding_table.weight"] = state["y_embedder.embedding_table.weight"]
    load_weights(dit, converted, source)
    if "pos_embed" in state and not torch.allclose(state["pos_embed"].float(), dit.pos_embed.pos_embed, atol=1e-5):
        raise ValueError(f"{source}: its fixed sin-cos positional embedding differs from the DiT layout")
    return match_original_dit(dit)
