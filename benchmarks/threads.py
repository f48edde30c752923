"""Optional section ``threads``: OpenMP's wait policy and the thread count on a CPU shared with other jobs.

Each configuration runs in its own process (``OMP_WAIT_POLICY`` is read once, when torch loads): a UNet
training step (the baseline's, batch 4 at 128²) and a VAE encode (``small`` preset, batch 4 at 128²), median of
``repeats`` after one warm-up. The result depends on how busy the machine is; the load average is recorded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

CHILD = r"""
import json, statistics, sys, time, torch
torch.set_num_threads(int(sys.argv[1]))
from delinea.models import MaskVAE, build_vae
from monai.networks.nets import UNet
unet = UNet(2, 1, 9, (16, 32, 64, 128, 256), (2, 2, 2, 2), num_res_units=2)
vae = MaskVAE(build_vae("small")).eval()
x = torch.randn(4, 1, 128, 128)
def step():
    unet(x).square().mean().backward()
def encode():
    with torch.no_grad():
        vae.encode(x)
out = {}
for name, fn in (("unet_step", step), ("vae_encode", encode)):
    fn()
    times = []
    for _ in range(int(sys.argv[2])):
        start = time.perf_counter(); fn(); times.append(time.perf_counter() - start)
    out[name] = statistics.median(times)
print(json.dumps(out))
"""


def run(
    repeats: int = 5,
    configs: tuple[tuple[str, int], ...] = (("default", 2), ("PASSIVE", 2), ("default", 1), ("PASSIVE", 1)),
) -> dict[str, Any]:
    """``default`` leaves OMP_WAIT_POLICY unset (libgomp spins a while, then sleeps)."""
    rows = []
    root = str(Path(__file__).resolve().parents[1])
    for policy, threads in configs:
        env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"} | {"PYTHONPATH": root}
        if policy != "default":
            env["OMP_WAIT_POLICY"] = policy
        load = [round(x, 2) for x in os.getloadavg()]
        done = subprocess.run(
            [sys.executable, "-c", CHILD, str(threads), str(repeats)],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        if done.returncode != 0:
            raise RuntimeError(f"threads benchmark child failed: {done.stderr[-2000:]}")
        times = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append(
            {
                "omp_wait_policy": policy,
                "threads": threads,
                "load_average": load,
                **{k: round(v, 4) for k, v in times.items()},
            }
        )
    base = rows[0]
    for row in rows:
        for key in ("unet_step", "vae_encode"):
            row[f"{key}_speedup"] = round(base[key] / row[key], 2)
    return {"rows": rows, "method": __doc__.split("\n\n", 1)[1].strip().replace("\n", " ")}
