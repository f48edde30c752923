"""The models section 2 evaluates, and the real CT data it runs on.

Data: the bundled sample CT (``delinea/sample``, canonical RAS, CT window [-175, 250] HU to [-1, 1]) served as the
datamodules serve it (:mod:`delinea.geometry`) at the demo's geometry scaled to the window: 3 mm per pixel
at 128 px (``plan_spacing``), each slice's body region centred in a window padded with air. The held-out slab is
the demo's: canonical
z = 86..95 (``delinea.demo.protocol.CT_HELD_OUT``), 10 slices holding all eight organs; training uses the other
organ slices z = 61..111. Dice is 3D over the stacked slab on the 128² window grid
(``delinea.evaluation.case_metrics``), mDSC the mean over the eight organs.

Models, first found wins:

1. ``--checkpoint`` / ``--unet-checkpoint`` (checkpoints or model folders);
2. the shipped pretrained demo models: ``delinea/demo/weights/meddelinea`` and ``.../unet`` (model folders, pretrained
   on the CT training slabs, never on the held-out slab);
3. trained here for a fixed wall-clock budget each, on the training slices: MedDelinea's control branch and
   head on the shipped demo backbones (``delinea/demo/weights``; random presets if they are missing) with the
   latents precomputed once, and the demo's UNet. Reported as ``"trained for N s in the benchmark"``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from delinea.datamodules import FolderDataModule
from delinea.demo.protocol import CT_HELD_OUT, CT_ORGANS, SAMPLE, load_slices
from delinea.demo.protocol import WEIGHTS as DEMO_WEIGHTS
from delinea.evaluation import case_metrics
from delinea.labels import FOREGROUND
from delinea.tasks import MedDelineaTask, UNetTask, load_task
from delinea.tasks.export import is_model_folder

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class CTData:
    """The sample CT at the benchmark's plan, and its held-out and training slices in centred windows."""

    datamodule: FolderDataModule  # the sample at the plan's spacing: whole-volume inference reads it
    resolution: int
    test_images: torch.Tensor  # (10, 1, R, R) held-out slab
    test_masks: torch.Tensor  # (10, R, R)
    train_images: torch.Tensor  # (n, 1, R, R)
    train_masks: torch.Tensor  # (n, R, R)
    spacing: tuple[float, float, float]  # of the slab windows

    @property
    def depth(self) -> int:
        """Axial slices of the whole CT volume."""
        return self.datamodule.case_geometry("ct").canonical_shape[2]


def plan_spacing(resolution: int) -> float:
    """The demo's geometry at any window size: 3 mm at 128 px, so the CT's body fills one window."""
    return 3.0 * 128 / resolution


def load_ct(resolution: int = 128, split_file: str | None = None) -> CTData:
    spacing = plan_spacing(resolution)
    dm = FolderDataModule(
        root=str(SAMPLE),
        resolution=resolution,
        split="all",
        modality="ct",
        spacing=spacing,
        split_file=split_file or str(Path("/tmp") / "delinea_bench_split.json"),
    )
    test_images, test_masks, _ = load_slices(SAMPLE, "ct", "ct", CT_HELD_OUT, None, resolution, spacing=spacing)
    train_images, train_masks, _ = load_slices(SAMPLE, "ct", "ct", CT_ORGANS, CT_HELD_OUT, resolution, spacing=spacing)
    return CTData(dm, resolution, test_images, test_masks, train_images, train_masks, (spacing, spacing, 3.0))


def slab_dice(labels: torch.Tensor, data: CTData) -> dict[str, Any]:
    """3D Dice per organ over the slab (labels (10, R, R)) and their mean (mDSC)."""
    pred = labels.permute(1, 2, 0).cpu().numpy().astype(np.uint8)  # (R, R, 10): slices along the last axis
    gt = data.test_masks.permute(1, 2, 0).numpy().astype(np.uint8)
    metrics = case_metrics(pred, gt, data.spacing)
    dice = {organ: float(metrics[organ]["dice"]) for organ in FOREGROUND}
    values = [v for v in dice.values() if not np.isnan(v)]
    return {"mDSC": float(np.mean(values)) if values else float("nan"), "organs": dice}


# -- finding or training the models ------------------------------------------------------------------------------


def shipped_models() -> tuple[Path | None, Path | None]:
    """The pretrained demo models shipped as model folders (``delinea/demo/weights/meddelinea``, ``.../unet``)."""
    meddelinea, unet = (DEMO_WEIGHTS / kind for kind in ("meddelinea", "unet"))
    return (meddelinea if is_model_folder(meddelinea) else None, unet if is_model_folder(unet) else None)


class _PrecomputedLatents:
    """Stands in for the latent cache in the benchmark's own short training: latents by slice number."""

    def __init__(self, image: torch.Tensor, mask: torch.Tensor) -> None:
        self.image, self.mask = image, mask

    def get_or_compute(self, keys: list[str], compute: Any) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.tensor([int(k) for k in keys])
        return self.image[index], self.mask[index]


def _train(
    task: Any,
    images: torch.Tensor,
    masks: torch.Tensor,
    seconds: float,
    batch_size: int,
    lr: float,
    device: torch.device,
    seed: int = 0,
) -> dict[str, Any]:
    """AdamW on random batches of the training slices until ``seconds`` have passed."""
    task.train()
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW([p for p in task.parameters() if p.requires_grad], lr=lr)
    labelled = torch.ones(batch_size, 9, dtype=torch.bool, device=device)
    steps, start, losses = 0, time.perf_counter(), []
    while time.perf_counter() - start < seconds or steps == 0:
        index = torch.randint(0, len(images), (batch_size,), generator=generator)
        batch = {
            "image": images[index].to(device),
            "mask": masks[index].to(device),
            "labelled": labelled,
            "cache_key": [str(int(i)) for i in index],
        }
        loss = task.losses(batch)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        steps += 1
    task.eval()
    elapsed = time.perf_counter() - start
    return {
        "seconds": round(elapsed, 1),
        "steps": steps,
        "batch_size": batch_size,
        "slices_per_s": round(steps * batch_size / elapsed, 2),
        "final_loss": round(float(np.mean(losses[-10:])), 4),
    }


def train_meddelinea(data: CTData, seconds: float, device: torch.device, tiny: bool = False) -> tuple[Any, dict]:
    """The demo's MedDelinea (control K=3, 128², lr 5e-4) trained for ``seconds`` on the shipped demo backbones."""
    have_backbones = (DEMO_WEIGHTS / "dit" / "config.json").is_file() and (
        DEMO_WEIGHTS / "vae" / "config.json"
    ).is_file()
    if tiny:
        kwargs = {"dit": "DiT-tiny/2", "vae": "tiny", "control_blocks": 2, "sampling_steps": 2}
        backbones = "random tiny presets (test size)"
    elif have_backbones:
        kwargs = {"dit": str(DEMO_WEIGHTS / "dit"), "vae": str(DEMO_WEIGHTS / "vae"), "control_blocks": 3}
        backbones = "delinea/demo/weights (pretrained demo VAE and DiT)"
    else:
        kwargs = {"dit": "DiT-mini/4", "vae": "small", "control_blocks": 3}
        backbones = "RANDOM DiT-mini/4 + small VAE: delinea/demo/weights is missing, Dice is meaningless"
    torch.manual_seed(0)
    task = MedDelineaTask(image_size=data.resolution, lr=5e-4, **kwargs).to(device)
    with torch.no_grad():
        image_latents = torch.cat([task.model.vae.encode(x.to(device)) for x in data.train_images.split(16)])
        mask_latents = torch.cat([task.model.vae.encode_mask(m.to(device)) for m in data.train_masks.split(16)])
    task.latent_cache = _PrecomputedLatents(image_latents, mask_latents)
    info = _train(task, data.train_images, data.train_masks, seconds, 8, 5e-4, device)
    task.latent_cache = None
    info["backbones"] = backbones
    info["hparams"] = {k: task.hparams[k] for k in ("dit", "vae", "control_blocks", "image_size")}
    return task, info


def train_unet(data: CTData, seconds: float, device: torch.device, tiny: bool = False) -> tuple[Any, dict]:
    """The demo's UNet baseline (channels 16..256, lr 1e-3) trained for ``seconds``."""
    torch.manual_seed(0)
    task = UNetTask(**({"channels": [4, 8, 16], "num_res_units": 1} if tiny else {}), lr=1e-3).to(device)
    info = _train(task, data.train_images, data.train_masks, seconds, 16, 1e-3, device)
    info["hparams"] = {"channels": list(task.hparams.channels), "num_res_units": task.hparams.num_res_units}
    return task, info


def get_models(
    data: CTData,
    device: torch.device,
    checkpoint: str | None,
    unet_checkpoint: str | None,
    train_seconds: float,
    tiny: bool = False,
) -> tuple[Any, Any, dict[str, Any]]:
    """(MedDelinea task, UNet task, where each came from)."""
    demo_md, demo_unet = (None, None) if tiny else shipped_models()
    info: dict[str, Any] = {}
    md_path = Path(checkpoint) if checkpoint else demo_md
    if md_path is not None:
        md = load_task(md_path, device, latent_cache=None, init_from=None)
        info["meddelinea"] = {"source": f"pretrained {md_path}"}
    else:
        md, trained = train_meddelinea(data, train_seconds, device, tiny)
        info["meddelinea"] = {"source": f"trained for {trained['seconds']} s in the benchmark", **trained}
    unet_path = Path(unet_checkpoint) if unet_checkpoint else demo_unet
    if unet_path is not None:
        unet = load_task(unet_path, device, init_from=None)
        info["unet"] = {"source": f"pretrained {unet_path}"}
    else:
        unet, trained = train_unet(data, train_seconds, device, tiny)
        info["unet"] = {"source": f"trained for {trained['seconds']} s in the benchmark", **trained}
    sources = [info["meddelinea"]["source"], info["unet"]["source"]]
    info["summary"] = sources[0] if sources[0] == sources[1] else f"MedDelinea: {sources[0]}; UNet: {sources[1]}"
    return md.eval(), unet.eval(), info
