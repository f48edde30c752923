"""Section 4, the physical limit: achieved FLOP/s of the DiT forward against a matmul peak measured in the same run.

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convolutions and attention; the
element-wise work, norms and activations, is not counted: it is the overhead the fraction exposes). The peak is
the best of a few large matmuls (square ones and the DiT's own GEMM shapes) of the same dtype, timed
interleaved with the DiT forward so that both see the same load.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import autocast, flash_attention, median, side_by_side
from delinea.models import build_dit
from delinea.models import dit as dit_ops


def matmul_shapes(hidden: int, rows: int) -> list[tuple[int, int, int]]:
    """Square GEMMs and the DiT's MLP GEMMs (rows = batch x tokens)."""
    return [(2048, 2048, 2048), (1024, 1024, 1024), (rows, hidden, 4 * hidden), (rows, 4 * hidden, hidden)]


def run(
    device: torch.device,
    preset: str = "DiT-B/2",
    latent: int = 32,
    batch: int = 8,
    repeats: int = 3,
    dtypes: tuple[torch.dtype, ...] = (torch.float32,),
) -> dict[str, Any]:
    """Achieved FLOP/s of the base DiT forward (``latent``² x 4 latents) and its fraction of the matmul peak."""
    torch.manual_seed(0)
    dit = build_dit(preset, sample_size=latent).to(device).eval()
    hidden = dit.inner_dim
    x = torch.randn(batch, 4, latent, latent, device=device)
    t = torch.randint(0, 1000, (batch,), device=device)
    y = torch.full((batch,), 1000, device=device)
    tokens = (latent // dit.patch_size) ** 2
    rows = []
    for dtype in dtypes:
        # weights cast to the dtype (what a bf16 inference path does); the same counting for every dtype
        model = dit if dtype == torch.float32 else build_dit(preset, sample_size=latent).to(device, dtype).eval()
        xin = x.to(dtype)

        def forward(model: torch.nn.Module = model, xin: torch.Tensor = xin) -> torch.Tensor:
            with torch.inference_mode(), flash_attention(device), autocast(device, None):
                return dit_ops.forward(model, xin, t, y)

        counter = FlopCounterMode(display=False)
        with counter, torch.inference_mode():
            dit_ops.forward(model, xin, t, y)
        flops = counter.get_total_flops()
        mats = {}
        for m, k, n in matmul_shapes(hidden, batch * tokens):
            a = torch.randn(m, k, device=device, dtype=dtype)
            b = torch.randn(k, n, device=device, dtype=dtype)
            mats[f"{m}x{k}x{n}"] = (2 * m * k * n, lambda a=a, b=b: a @ b)
        fns = {"dit": forward} | {name: fn for name, (_, fn) in mats.items()}
        timing = side_by_side(fns, device, repeats=repeats, warmup=1)
        dit_rates = [flops / s for s in timing["dit"]["seconds"]]
        per_shape = {name: [f / s for s in timing[name]["seconds"]] for name, (f, _) in mats.items()}
        best = max(per_shape, key=lambda name: median(per_shape[name]))
        peak_rates = per_shape[best]
        # the peak of round r is the best shape in round r: the DiT ran between those matmuls
        round_peaks = [max(per_shape[name][r] for name in per_shape) for r in range(repeats)]
        rows.append(
            {
                "preset": preset,
                "dtype": str(dtype).removeprefix("torch."),
                "batch": batch,
                "tokens": tokens,
                "gflop_per_forward": round(flops / 1e9, 6),
                "forward_s": round(median(timing["dit"]["seconds"]), 4),
                "dit_gflops": round(median(dit_rates) / 1e9, 2),
                "peak_gflops": round(median(peak_rates) / 1e9, 2),
                "peak_shape": best,
                "matmul_gflops": {name: round(median(r) / 1e9, 2) for name, r in per_shape.items()},
                "fraction_of_peak": round(median(dit_rates) / median(peak_rates), 5),
                "fraction_paired": round(median([d / p for d, p in zip(dit_rates, round_peaks)]), 5),
                "runs": repeats,
            }
        )
        if model is not dit:
            del model
    return {"rows": rows, "method": __doc__.split("\n\n", 1)[1].strip().replace("\n", " ")}
