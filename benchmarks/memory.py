"""Section ``memory``: what each part of MedDelinea keeps for the backward pass, per sample, and the memory plan.

    .venv/bin/python benchmarks/memory.py --resolutions 256 512      # the reference table of delinea.models.memory
    .venv/bin/python benchmarks/run.py --sections memory

The parts are profiled at the paper's widths with one block each (a DiT-XL block, a Control DiT block with its
zero Linear, the SD VAE decoder with the class head and L_seg), at micro-batches 1 and 2, by counting the bytes of
the tensors autograd saves (:func:`delinea.models.memory.profile_part`): exact and device-independent, so the CPU
measures what a GPU keeps, up to autocast's op lists. bf16 autocast is measured directly for the DiT blocks; the
SD decoder in bf16 on a CPU without bf16 instructions is emulated and too slow at 256² and 512², so its bf16 bytes
are its fp32 bytes times the bf16/fp32 ratio measured at ``bf16_decoder_at`` (64²; the decoder's saved tensors
scale with pixels). ``step`` then checks the plan against the measured peak of a whole training step (CUDA
``max_memory_allocated``, or the process's RSS on a CPU) for a small model.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from delinea.models import MaskVAE, MedDelinea, build_dit, build_vae
from delinea.models.memory import GiB, PartProfile, estimate, profile_model

MiB = 2**20


def reference_model(resolution: int, dit: str = "DiT-XL/2", vae: str = "sd", blocks: int = 1) -> MedDelinea:
    """A MedDelinea at the paper's widths with ``blocks`` base blocks (one is enough to profile a block)."""
    torch.manual_seed(0)
    mask_vae = MaskVAE(build_vae(vae))
    base = build_dit(dit, sample_size=resolution // mask_vae.downsampling, depth=blocks)
    model = MedDelinea(base, mask_vae, control_blocks=1)
    for module in model.frozen_modules():
        module.requires_grad_(False)
    return model


def profiles(
    device: torch.device,
    resolutions: tuple[int, ...] = (256, 512),
    dit: str = "DiT-XL/2",
    vae: str = "sd",
    bf16_decoder_at: int | None = 64,
) -> dict[str, dict[int, dict[str, dict[str, list[float]]]]]:
    """The reference table: ``{dtype: {resolution: {part: PartProfile.to_dict()}}}``."""
    table: dict[str, dict[int, dict[str, dict[str, list[float]]]]] = {"fp32": {}, "bf16": {}}
    ratio: dict[str, list[float]] | None = None
    if bf16_decoder_at is not None:
        small = reference_model(bf16_decoder_at, dit, vae).to(device)
        fp32 = profile_model(small, bf16_decoder_at, torch.float32)["decoder"].to_dict()
        bf16 = profile_model(small, bf16_decoder_at, torch.bfloat16)["decoder"].to_dict()
        ratio = {k: [b / a if a > 0 else 0.0 for a, b in zip(fp32[k], bf16[k])] for k in fp32}
    for resolution in resolutions:
        model = reference_model(resolution, dit, vae).to(device)
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            if name == "bf16" and ratio is not None:
                # DiT blocks measured in bf16; the decoder from its fp32 bytes and the small-size ratio
                dit_parts = profile_model(model, resolution, dtype, parts=("base", "control"))
                blocks = {k: v.to_dict() for k, v in dit_parts.items()}
                decoder = table["fp32"][resolution]["decoder"]
                # the recomputed block's ratio at 64² is another block's: take the ratio of the kept bytes
                scale = {k: ratio["kept" if k == "recompute" else k] for k in decoder}
                blocks["decoder"] = {k: [v * r for v, r in zip(decoder[k], scale[k])] for k in decoder}
                table[name][resolution] = blocks
            else:
                table[name][resolution] = {k: v.to_dict() for k, v in profile_model(model, resolution, dtype).items()}
        del model
    return table


def render(table: dict[str, Any]) -> str:
    """A markdown table of MiB per sample (kept, kept with checkpointing, recomputed block) and per block."""
    lines = [
        "| part | res | dtype | kept / sample | kept, checkpointed / sample | recompute / sample | fixed |",
        "|---|---|---|---|---|---|---|",
    ]
    for dtype, by_res in table.items():
        for resolution, parts in sorted(by_res.items(), key=lambda kv: int(kv[0])):
            for part, data in parts.items():
                profile = PartProfile.from_dict(data)
                unit = " (per block)" if part in ("base", "control") else ""
                lines.append(
                    f"| {part}{unit} | {resolution} | {dtype} | {profile.kept[1] / MiB:.1f} MiB | "
                    f"{profile.kept_checkpointed[1] / MiB:.1f} MiB | {profile.recompute[1] / MiB:.1f} MiB | "
                    f"{max(0.0, profile.kept[0]) / MiB:.1f} MiB |"
                )
    return "\n".join(lines)


def paper_plans(precision: str = "bf16-mixed") -> list[dict[str, Any]]:
    """The plan of the paper's network (DiT-XL/2, SD VAE, K = 15) at 256 and 512, per micro-batch and
    checkpointing, with 8-GPU DDP: built on the meta device (no memory, no time)."""
    with torch.device("meta"):
        model = MedDelinea(build_dit("DiT-XL/2", sample_size=32), MaskVAE(build_vae("sd")), control_blocks=15)
    for module in model.frozen_modules():
        module.requires_grad_(False)
    rows = []
    for resolution, micro in ((256, 32), (256, 16), (512, 32), (512, 8), (512, 4)):
        for parts in ((), ("base", "control", "decoder")):
            plan = estimate(model, resolution, micro, precision, parts, ddp=True)
            rows.append(
                {
                    "resolution": resolution,
                    "micro_batch": micro,
                    "precision": precision,
                    "checkpointing": list(parts),
                    "peak_gib": round(plan.peak / GiB, 1),
                    "lines_gib": {k: round(v / GiB, 2) for k, v in plan.lines.items()},
                }
            )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--resolutions", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--dit", default="DiT-XL/2")
    parser.add_argument("--vae", default="sd")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    start = time.perf_counter()
    table = profiles(device, tuple(args.resolutions), args.dit, args.vae)
    print(render(table))
    print(f"\nREFERENCE = {table!r}\n({time.perf_counter() - start:.0f} s on {device})")


if __name__ == "__main__":
    main()
