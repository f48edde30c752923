"""The memory plan: peak training memory per micro-batch of a MedDelinea model, before the first step runs.

    peak ≈ weights (all, fp32) + gradients + AdamW state (trainable, fp32; + DDP's gradient buckets)
         + Σ over parts of what autograd keeps for the backward pass: fixed + per sample x micro-batch
         + the largest recomputed block of a checkpointed part (its activations live during its backward)

The parts are the frozen VAE encoder (no gradients: only its working set, before the rest runs), the frozen base
DiT (its activations are kept for the backward pass to the residuals), the Control DiT and the VAE decoder of
L_seg with its class head and loss. What autograd keeps is *measured*, not modelled: :func:`profile_part` counts
the bytes of every tensor saved for backward (unique storages, parameters excluded) during one forward pass of a
part at micro-batches 1 and 2, at the paper's widths (a DiT-XL block, the SD VAE decoder). ``benchmarks/memory.py``
measures :data:`REFERENCE` that way at 256² and 512², fp32 and bf16 autocast, and checks the sum against the peak
memory of whole training steps; :func:`estimate` scales it to other models (DiT parts by tokens x hidden size x
blocks, the decoder by pixels x its channel widths) and resolutions (by tokens or pixels).
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from delinea.models.losses import bce_dice_loss

GiB = 2**30
#: The parts whose activations autograd keeps (the frozen VAE encoder runs without gradients, before them).
PARTS = ("base", "control", "decoder")

# ----------------------------------------------------------------------------------------------------------
# Measuring


@dataclass
class PartProfile:
    """What one forward pass of a part keeps for its backward pass, in bytes: ``fixed + per_sample * n``.

    ``kept`` without activation checkpointing; ``kept_checkpointed`` with it (the inputs of each checkpointed
    block plus what is saved outside the blocks); ``recompute`` the largest single block's activations, alive
    while that block's backward runs under checkpointing.
    """

    kept: tuple[float, float]  # (fixed, per sample)
    kept_checkpointed: tuple[float, float]
    recompute: tuple[float, float]

    def to_dict(self) -> dict[str, list[float]]:
        return {k: [round(v) for v in getattr(self, k)] for k in ("kept", "kept_checkpointed", "recompute")}

    @classmethod
    def from_dict(cls, data: Mapping[str, Sequence[float]]) -> PartProfile:
        kept, checkpointed, recompute = (data[k] for k in ("kept", "kept_checkpointed", "recompute"))
        return cls(
            (float(kept[0]), float(kept[1])),
            (float(checkpointed[0]), float(checkpointed[1])),
            (float(recompute[0]), float(recompute[1])),
        )


@dataclass
class _Saved:
    """Bytes saved for backward while a forward pass runs, attributed to the block running at the time."""

    exclude: set[tuple[str, int]]
    current: list[str] = field(default_factory=lambda: ["outside"])
    storages: dict[tuple[str, int], tuple[str, int]] = field(default_factory=dict)
    inputs: dict[tuple[str, int], int] = field(default_factory=dict)

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key = (str(tensor.device), storage.data_ptr())
        if key not in self.exclude and key not in self.storages:
            self.storages[key] = (self.current[-1], storage.nbytes())
        return tensor

    def by_block(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for block, nbytes in self.storages.values():
            out[block] = out.get(block, 0) + nbytes
        return out


def saved_bytes(
    fn: Callable[[], Any], exclude: Iterable[torch.Tensor] = (), blocks: dict[str, nn.Module] | None = None
) -> tuple[dict[str, int], int, Any]:
    """Run ``fn`` and count the bytes autograd saves for the backward pass (each storage once; ``exclude``,
    e.g. the parameters, not counted), attributed to the named ``blocks`` that were running (else ``outside``).

    Returns:
        ``(saved bytes per block, bytes of the blocks' tensor inputs, fn's result)``; keep the result alive until
        done with the numbers, it holds the graph.
    """
    saved = _Saved({(str(t.device), t.untyped_storage().data_ptr()) for t in exclude})
    handles = []
    for name, module in (blocks or {}).items():

        def enter(module: nn.Module, args: tuple, name: str = name) -> None:
            saved.current.append(name)
            for arg in args:
                if torch.is_tensor(arg):
                    storage = arg.untyped_storage()
                    saved.inputs[(str(arg.device), storage.data_ptr())] = storage.nbytes()

        def leave(module: nn.Module, args: tuple, output: Any) -> None:
            saved.current.pop()

        handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    try:
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda tensor: tensor):
            result = fn()
    finally:
        for handle in handles:
            handle.remove()
    return saved.by_block(), sum(saved.inputs.values()), result


def profile_part(
    run: Callable[[int], Any], parameters: Iterable[torch.Tensor], blocks: dict[str, nn.Module]
) -> PartProfile:
    """Profile a part from two forward passes, ``run(1)`` and ``run(2)`` (micro-batches of 1 and 2 samples):
    the per-sample bytes are their difference, the fixed bytes (e.g. bf16 copies of frozen weights) the rest."""
    parameters = list(parameters)
    numbers = []
    for n in (1, 2):
        by_block, inputs, result = saved_bytes(functools.partial(run, n), parameters, blocks)
        inside = {k: v for k, v in by_block.items() if k != "outside"}
        total = sum(by_block.values())
        numbers.append((total, by_block.get("outside", 0) + inputs, max(inside.values(), default=0)))
        del result
    one, two = numbers

    def line(i: int) -> tuple[float, float]:
        per = float(two[i] - one[i])
        return (float(one[i]) - per, per)

    return PartProfile(kept=line(0), kept_checkpointed=line(1), recompute=line(2))


def autocast_context(device: torch.device | str, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """bf16/fp16 autocast on the device's type; float32: none."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def profile_model(
    model: Any, resolution: int, dtype: torch.dtype = torch.float32, parts: Iterable[str] = PARTS
) -> dict[str, PartProfile]:
    """Profile each part of a :class:`~delinea.models.MedDelinea` at ``resolution`` and ``dtype`` autocast (one
    base block, one control block with its zero Linear, the decoder with the head and L_seg; the encoder keeps
    nothing). Costs about the activations of one micro-batch of 3 samples of each part."""
    device = next(model.parameters()).device
    dit, control = model.dit, model.control
    f, p = model.vae.downsampling, dit.patch_size
    latent = resolution // f
    tokens, hidden = (latent // p) ** 2, dit.inner_dim
    labels = model.class_label

    def block_run(block: nn.Module, extra: nn.Module | None) -> Callable[[int], Any]:
        def run(n: int) -> Any:
            x = torch.randn(n, tokens, hidden, device=device, requires_grad=True)
            t = torch.full((n,), 500, device=device)
            y = torch.full((n,), labels, device=device)
            with autocast_context(device, dtype):
                out = block(x, timestep=t, class_labels=y)
                return extra(out) if extra is not None else out

        return run

    def decoder_run(n: int) -> Any:
        z = torch.randn(n, model.latent_channels, latent, latent, device=device, requires_grad=True)
        mask = torch.randint(0, model.vae.head.out_channels, (n, resolution, resolution), device=device)
        labelled = torch.ones(n, model.vae.head.out_channels, dtype=torch.bool, device=device)
        with autocast_context(device, dtype):
            logits = model.vae.decode_logits(z).float()
        return bce_dice_loss(logits, mask, labelled)

    params = list(model.parameters())  # counted as weights, not as activations
    decoder = model.vae.vae.decoder
    decoder_blocks = {"mid": decoder.mid_block, **{f"up{i}": b for i, b in enumerate(decoder.up_blocks)}}
    runs: dict[str, tuple[Callable[[int], Any], dict[str, nn.Module]]] = {
        "base": (block_run(dit.transformer_blocks[0], None), {"b": dit.transformer_blocks[0]}),
        "control": (block_run(control.blocks[0], control.zero_linears[0]), {"b": control.blocks[0]}),
        "decoder": (decoder_run, decoder_blocks),
    }
    with _checkpointing_off(model):
        return {part: profile_part(runs[part][0], params, runs[part][1]) for part in parts}


@contextlib.contextmanager
def _checkpointing_off(model: Any) -> Any:
    parts = model.checkpointing
    model.set_activation_checkpointing(())
    try:
        yield
    finally:
        model.set_activation_checkpointing(parts)


# ----------------------------------------------------------------------------------------------------------
# The reference table and the estimate

#: Where :data:`REFERENCE` was measured: DiT-XL/2 widths (hidden 1152, 16 heads), the SD VAE (f = 8, channels
#: 128-256-512-512, 2 layers per block), 9 classes. Written by ``benchmarks/memory.py`` (CPU, torch 2.14).
REFERENCE_MODEL: dict[str, Any] = {
    "hidden": 1152,
    "patch": 2,
    "vae_channels": (128, 256, 512, 512),
    "vae_layers": 2,
    "f": 8,
}
#: Bytes per part (see :class:`PartProfile`) by dtype and resolution, printed by ``benchmarks/memory.py`` (CPU,
#: 2026-12-02, 356 s). 512² is scaled from 256² (tokens, pixels); the slow paper-size test checks it against a
#: measured 512² step. bf16 decoder bytes: fp32 x the bf16/fp32 ratio of its kept bytes at 64² (module docstring of
#: benchmarks/memory.py).
REFERENCE: dict[str, dict[int, dict[str, dict[str, list[float]]]]] = {
    "fp32": {
        256: {
            "base": {"kept": [0, 11853824], "kept_checkpointed": [0, 1179648], "recompute": [0, 11853824]},
            "control": {"kept": [0, 24849416], "kept_checkpointed": [0, 2359296], "recompute": [0, 23669768]},
            "decoder": {"kept": [4, 1498197612], "kept_checkpointed": [4, 221020524], "recompute": [0, 704644608]},
        }
    },
    "bf16": {
        256: {
            "base": {
                "kept": [31850496, 7116800],
                "kept_checkpointed": [0, 1179648],
                "recompute": [31850496, 7116800],
            },
            "control": {
                "kept": [53084160, 15976200],
                "kept_checkpointed": [2654208, 1769472],
                "recompute": [50429952, 15386376],
            },
            "decoder": {
                "kept": [98918692, 752701821],
                "kept_checkpointed": [57636, 114052031],
                "recompute": [0, 354016904],
            },
        }
    },
}


@dataclass
class MemoryPlan:
    """The estimated peak of one training micro-batch, line by line (bytes)."""

    resolution: int
    micro_batch: int
    precision: str
    checkpointing: tuple[str, ...]
    lines: dict[str, float]

    @property
    def peak(self) -> float:
        return sum(self.lines.values())

    def describe(self, device_bytes: float | None = None) -> str:
        parts = ", ".join(self.checkpointing) or "none"
        head = (
            f"memory plan at {self.resolution}² x {self.micro_batch} per micro-batch, {self.precision}, "
            f"activation checkpointing: {parts}: peak ≈ {self.peak / GiB:.1f} GiB"
        )
        if device_bytes:
            head += f" of {device_bytes / GiB:.1f} GiB"
        body = "; ".join(f"{name} {value / GiB:.2f}" for name, value in self.lines.items() if value)
        return f"{head} ({body} GiB)"


def _scaled(profile: PartProfile, which: str, n: int, per_sample_scale: float, fixed_scale: float) -> float:
    fixed, per = getattr(profile, which)
    return max(0.0, fixed) * fixed_scale + per * per_sample_scale * n


def nearest_reference(resolution: int, dtype: str) -> int:
    measured = sorted(REFERENCE.get(dtype, {}))
    if not measured:
        raise KeyError(f"no measured memory table for {dtype}: run benchmarks/memory.py")
    return min(measured, key=lambda r: abs(math.log(r / resolution)))


def estimate(
    model: Any,
    resolution: int,
    micro_batch: int,
    precision: str = "32-true",
    checkpointing: Iterable[str] = (),
    ddp: bool = False,
    profiles: dict[str, PartProfile] | None = None,
) -> MemoryPlan:
    """Estimated peak memory of one training micro-batch of a :class:`~delinea.models.MedDelinea` (built, so its
    parameter counts are known) at ``resolution``, Lightning ``precision`` and checkpointed parts.

    ``profiles`` (from :func:`profile_model` on this model at this resolution) replace the scaled reference table.
    """
    parts = tuple(sorted(set(checkpointing)))
    bf16 = "bf16" in precision or "16" in precision
    dtype = "bf16" if bf16 else "fp32"
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    weight_bytes = 2 if precision in ("bf16-true", "16-true") else 4
    lines: dict[str, float] = {
        "weights": total * weight_bytes,
        "gradients": trainable * weight_bytes,
        "AdamW state": trainable * 8,
        "DDP buckets": trainable * weight_bytes if ddp else 0.0,
    }
    dit = model.dit
    tokens = (resolution // model.vae.downsampling // dit.patch_size) ** 2
    hidden = dit.inner_dim
    blocks = {"base": len(dit.transformer_blocks), "control": len(model.control.blocks)}
    vae_config = model.vae.vae.config
    channels = tuple(vae_config.block_out_channels)
    width = sum(channels) * (vae_config.layers_per_block + 1)
    if profiles is None:
        reference = nearest_reference(resolution, dtype)
        table = {part: PartProfile.from_dict(d) for part, d in REFERENCE[dtype][reference].items()}
        ref = REFERENCE_MODEL
        ref_tokens = (reference // ref["f"] // ref["patch"]) ** 2
        ref_width = sum(ref["vae_channels"]) * (ref["vae_layers"] + 1)
        token_scale = tokens * hidden / (ref_tokens * ref["hidden"])
        scales = {
            "base": (token_scale, (hidden / ref["hidden"]) ** 2),
            "control": (token_scale, (hidden / ref["hidden"]) ** 2),
            "decoder": ((resolution / reference) ** 2 * width / ref_width, (width / ref_width) ** 2),
        }
    else:
        table = profiles
        scales = {part: (1.0, 1.0) for part in table}
    recompute = 0.0
    for part in ("base", "control", "decoder"):
        profile, (per_scale, fixed_scale) = table[part], scales[part]
        count = blocks.get(part, 1)
        which = "kept_checkpointed" if part in parts else "kept"
        lines[f"{part} activations"] = count * _scaled(profile, which, micro_batch, per_scale, fixed_scale)
        if part in parts:
            recompute = max(recompute, _scaled(profile, "recompute", micro_batch, per_scale, fixed_scale))
    lines["recomputed block"] = recompute
    return MemoryPlan(resolution, micro_batch, precision, parts, lines)


def device_memory(device: torch.device | str) -> float | None:
    """Bytes the device can give a training process: a CUDA GPU's total memory, or the CPU's available RAM."""
    device = torch.device(device)
    if device.type == "cuda":
        return float(torch.cuda.get_device_properties(device).total_memory)
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    return None


__all__ = [
    "PARTS",
    "REFERENCE",
    "MemoryPlan",
    "PartProfile",
    "device_memory",
    "estimate",
    "profile_model",
    "profile_part",
    "saved_bytes",
]
