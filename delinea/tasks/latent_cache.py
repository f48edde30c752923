"""An on-disk cache of frozen-VAE latents for unaugmented slices."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from delinea.outputs import atomic_path


class LatentCache:
    """Latents of (image, mask) slice pairs, one safetensors file per slice.

    Files live under ``folder/<vae fingerprint>/`` and are named by a hash of the slice's ``cache_key`` (which
    names the dataset, case, slice, resolution and intensity settings), so a different VAE, resolution or case
    never reads stale latents. Slices with an empty key (augmented ones) are always encoded afresh.
    """

    def __init__(self, folder: str | Path, vae_fingerprint: str) -> None:
        self.folder = Path(folder) / vae_fingerprint
        self.folder.mkdir(parents=True, exist_ok=True)
        self.hits = 0
        self.misses = 0

    def path(self, key: str) -> Path:
        digest = hashlib.sha256(key.encode()).hexdigest()
        return self.folder / digest[:2] / f"{digest}.safetensors"

    def get_or_compute(
        self,
        keys: Sequence[str],
        compute: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents for a batch; ``compute(indices)`` encodes the slices at ``indices`` that are not cached."""
        found: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for i, key in enumerate(keys):
            if key and self.path(key).is_file():
                tensors = load_file(str(self.path(key)))
                found[i] = (tensors["image"], tensors["mask"])
        todo = [i for i in range(len(keys)) if i not in found]
        self.hits += len(found)
        self.misses += len(todo)
        if todo:
            with torch.no_grad():
                image_latents, mask_latents = compute(torch.tensor(todo))
            for j, i in enumerate(todo):
                found[i] = (image_latents[j], mask_latents[j])
                if keys[i]:
                    self._write(keys[i], image_latents[j], mask_latents[j])
        device = next(iter(found.values()))[0].device if not todo else image_latents.device
        image = torch.stack([found[i][0].to(device) for i in range(len(keys))])
        mask = torch.stack([found[i][1].to(device) for i in range(len(keys))])
        return image, mask

    def _write(self, key: str, image: torch.Tensor, mask: torch.Tensor) -> None:
        # Written whole and renamed: concurrent ranks or a killed run never leave a half-written file behind (not
        # flushed to the disk, for speed: only a power cut could damage an entry of this cache).
        with atomic_path(self.path(key), fsync=False) as temporary:
            save_file(
                {"image": image.detach().float().cpu().contiguous(), "mask": mask.detach().float().cpu().contiguous()},
                str(temporary),
            )
