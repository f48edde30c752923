"""Section 3, fast paths: each against plain fp32 eager in the same run, interleaved, on four workloads.

* ``denoiser``: one MedDelinea ε̂ evaluation (Control DiT + base DiT) at the measured preset's geometry;
* ``vae_decode``: the frozen VAE decoding latents to class logits (the L_seg and final decoding pass);
* ``sample``: end-to-end segmentation of the held-out CT slab with the inference model (DDIM, 10 steps);
* ``unet``: the UNet baseline's forward on the same slab.

Variants: ``sdpa`` vs ``classic_attention`` (diffusers' ``AttnProcessor``: explicit ``baddbmm`` + softmax; the
blocks' default processor is recorded), ``inference_mode`` (vs ``no_grad``), ``bf16_autocast``, ``bf16_weights``
(a bf16 copy of the network; inputs cast), ``channels_last`` (convolutional parts), ``compile``
(``torch.compile``, default inductor; the compile time is reported apart). ``speedup`` is the median of the
per-round ratios fp32-eager time / variant time; ``max_rel_diff`` compares outputs with fp32 eager, and for
segmentations ``agreement`` is the share of pixels with the same label and ``mDSC`` the slab's Dice.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from typing import Any

import torch
from diffusers.models.attention_processor import AttnProcessor

from benchmarks.common import autocast, flash_attention, median, paired_ratio, side_by_side, sync
from benchmarks.models import CTData, slab_dice
from benchmarks.training import PRESETS
from delinea.models import MaskVAE, MedDelinea, build_dit, build_vae


def attention_processors(model: torch.nn.Module) -> list[str]:
    """Class names of the attention processors the model's attention layers use."""
    return sorted({type(m.processor).__name__ for m in model.modules() if hasattr(m, "processor")})


def _set_processor(model: torch.nn.Module, processor_factory: Callable[[], Any] | None) -> dict:
    """Swap every attention layer's processor; returns the previous ones (by module) for restoring."""
    old = {}
    for module in model.modules():
        if hasattr(module, "set_processor") and hasattr(module, "processor"):
            old[module] = module.processor
            if processor_factory is not None:
                module.set_processor(processor_factory())
    return old


def _restore(old: dict) -> None:
    for module, processor in old.items():
        module.set_processor(processor)


def _compare(out: Any, ref: Any) -> float:
    out, ref = out.float(), ref.float()
    return float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


def measure(
    variants: dict[str, Callable[[], Any]],
    device: torch.device,
    repeats: int,
    check: Callable[[Any, Any], dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Time the variants interleaved with ``fp32_eager`` (which must be the first); one row per variant."""
    outputs = {name: fn() for name, fn in variants.items()}  # also the warm-up
    timing = side_by_side(variants, device, repeats=repeats, warmup=0)
    base = timing["fp32_eager"]["seconds"]
    rows = []
    for name in variants:
        seconds = timing[name]["seconds"]
        row = {
            "variant": name,
            "seconds": round(median(seconds), 5),
            "speedup": round(paired_ratio(base, seconds), 3),
            "runs": repeats,
        }
        if check is not None:
            row |= check(outputs[name], outputs["fp32_eager"])
        else:
            row["max_rel_diff"] = round(_compare(outputs[name], outputs["fp32_eager"]), 5)
        rows.append(row)
    return rows


def _compiled(fn: Callable, device: torch.device, *args: Any) -> tuple[Callable, float]:
    compiled = torch.compile(fn)
    sync(device)
    start = time.perf_counter()
    with torch.no_grad():
        compiled(*args)
        compiled(*args)  # guards settle on the second call
    sync(device)
    return compiled, time.perf_counter() - start


def denoiser(
    device: torch.device, preset: str, resolution: int, batch: int, repeats: int, compile: bool
) -> dict[str, Any]:
    p = PRESETS[preset]
    torch.manual_seed(0)
    vae = MaskVAE(build_vae(p.vae))
    latent = resolution // vae.downsampling
    model = MedDelinea(build_dit(p.dit, sample_size=latent), vae, control_blocks=p.control_blocks).to(device).eval()
    with torch.no_grad():  # the zero-initialised layers would make every output 0 and hide numerical differences
        for parameter in model.parameters():
            if not parameter.any():
                parameter.normal_(0, 0.02)
    z = torch.randn(batch, 4, latent, latent, device=device)
    zo = torch.randn(batch, 4, latent, latent, device=device)
    t = torch.randint(0, 1000, (batch,), device=device)
    processors = attention_processors(model)
    bf16 = copy.deepcopy(model).to(torch.bfloat16)

    def run(
        m: MedDelinea = model,
        mode: Callable = torch.no_grad,
        dtype: torch.dtype | None = None,
        cast: torch.dtype = torch.float32,
    ) -> Callable:
        def call() -> torch.Tensor:
            with mode(), autocast(device, dtype), flash_attention(device):
                return m.predict_noise(z.to(cast), t, zo.to(cast))

        return call

    classic_model = copy.deepcopy(model)
    _set_processor(classic_model, AttnProcessor)
    variants = {
        "fp32_eager": run(),
        "classic_attention": run(classic_model),
        "inference_mode": run(mode=torch.inference_mode),
        "bf16_autocast": run(dtype=torch.bfloat16),
        "bf16_weights": run(bf16, cast=torch.bfloat16),
    }
    extra = {}
    if compile:
        compiled, seconds = _compiled(model.predict_noise, device, z, t, zo)
        extra["compile_seconds"] = round(seconds, 1)

        def call_compiled() -> torch.Tensor:
            with torch.no_grad(), flash_attention(device):
                return compiled(z, t, zo)

        variants["compile"] = call_compiled
    rows = measure(variants, device, repeats)
    return {
        "workload": f"denoiser {p.dit} + control K={p.control_blocks}, batch {batch}, "
        f"{(latent // model.dit.patch_size) ** 2} tokens",
        "rows": rows,
        "attention_processors": processors,
        **extra,
    }


def vae_decode(device: torch.device, preset: str, resolution: int, batch: int, repeats: int) -> dict[str, Any]:
    p = PRESETS[preset]
    torch.manual_seed(0)
    vae = MaskVAE(build_vae(p.vae)).to(device).eval()
    latent = torch.randn(batch, 4, resolution // vae.downsampling, resolution // vae.downsampling, device=device)
    last = copy.deepcopy(vae).to(memory_format=torch.channels_last)
    latent_last = latent.contiguous(memory_format=torch.channels_last)

    def run(
        m: MaskVAE = vae, x: torch.Tensor = latent, dtype: torch.dtype | None = None, mode: Callable = torch.no_grad
    ) -> Callable:
        def call() -> torch.Tensor:
            with mode(), autocast(device, dtype):
                return m.decode_logits(x)

        return call

    variants = {
        "fp32_eager": run(),
        "inference_mode": run(mode=torch.inference_mode),
        "channels_last": run(last, latent_last),
        "bf16_autocast": run(dtype=torch.bfloat16),
    }
    return {
        "workload": f"VAE '{p.vae}' decode to logits, batch {batch} at {resolution}²",
        "rows": measure(variants, device, repeats),
    }


def segmentation_check(data: CTData) -> Callable[[Any, Any], dict[str, Any]]:
    def check(labels: torch.Tensor, reference: torch.Tensor) -> dict[str, Any]:
        return {
            "agreement": round(float((labels == reference).float().mean()), 4),
            "mDSC": round(slab_dice(labels, data)["mDSC"], 4),
        }

    return check


def sample(
    md: Any, data: CTData, device: torch.device, repeats: int, compile: bool, scheduler: str = "ddim", steps: int = 10
) -> dict[str, Any]:
    """End-to-end ``model.sample`` on the slab with the given settings."""
    model: MedDelinea = md.model
    images = data.test_images.to(device)

    def run(
        m: MedDelinea = model,
        mode: Callable = torch.no_grad,
        dtype: torch.dtype | None = None,
        x: torch.Tensor = images,
        **options: Any,
    ) -> Callable:
        def call() -> torch.Tensor:
            generator = torch.Generator(device).manual_seed(0)
            with mode(), autocast(device, dtype), flash_attention(device):
                probabilities, _ = m.sample(x, scheduler=scheduler, steps=steps, generator=generator, **options)
            return probabilities.argmax(1)

        return call

    last = copy.deepcopy(model)
    last.vae.to(memory_format=torch.channels_last)
    variants = {
        "fp32_eager": run(),
        "inference_mode": run(mode=torch.inference_mode),
        "bf16_autocast": run(dtype=torch.bfloat16),
        "channels_last": run(last, x=images.contiguous(memory_format=torch.channels_last)),
    }
    extra = {}
    if compile:
        z = torch.randn(len(images), model.latent_channels, *model.vae.encode(images[:1]).shape[-2:], device=device)
        t = torch.tensor(500, device=device)
        compiled, seconds = _compiled(model.predict_noise, device, z, t, z)
        extra["compile_seconds"] = round(seconds, 1)

        def call_compiled() -> torch.Tensor:
            model.predict_noise = compiled  # instance attribute shadows the method for this call only
            try:
                return run()()
            finally:
                del model.predict_noise

        variants["compile"] = call_compiled
    return {
        "workload": f"sample: {scheduler}, {steps} steps, ensemble 1, {len(images)} slices of "
        f"{data.resolution}² ({md.hparams.dit}, VAE {md.hparams.vae})",
        "rows": measure(variants, device, repeats, segmentation_check(data)),
        **extra,
    }


def unet(task: Any, data: CTData, device: torch.device, repeats: int) -> dict[str, Any]:
    net = task.model
    images = data.test_images.to(device)
    last = copy.deepcopy(net).to(memory_format=torch.channels_last)

    def run(
        m: torch.nn.Module = net,
        mode: Callable = torch.no_grad,
        dtype: torch.dtype | None = None,
        x: torch.Tensor = images,
    ) -> Callable:
        def call() -> torch.Tensor:
            with mode(), autocast(device, dtype):
                return m(x).float().argmax(1)

        return call

    variants = {
        "fp32_eager": run(),
        "inference_mode": run(mode=torch.inference_mode),
        "bf16_autocast": run(dtype=torch.bfloat16),
        "channels_last": run(last, x=images.contiguous(memory_format=torch.channels_last)),
    }
    return {
        "workload": f"UNet forward, {len(images)} slices of {data.resolution}²",
        "rows": measure(variants, device, repeats, segmentation_check(data)),
    }


def run(
    device: torch.device,
    md: Any,
    unet_task: Any,
    data: CTData,
    preset: str = "B",
    resolution: int = 256,
    batch: int = 4,
    repeats: int = 3,
    compile: bool = True,
    compile_denoiser: bool = False,
    vae_batch: int = 1,
    sample_steps: int = 10,
) -> dict[str, Any]:
    workloads = {
        "denoiser": denoiser(device, preset, resolution, batch, repeats, compile=compile_denoiser),
        "vae_decode": vae_decode(device, preset, resolution, vae_batch, repeats),
        "sample": sample(md, data, device, repeats, compile, steps=sample_steps),
        "unet": unet(unet_task, data, device, repeats),
    }
    return {"workloads": workloads, "method": __doc__.split("\n\n", 1)[1].strip().replace("\n", " ")}
