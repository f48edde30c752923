"""Training randomness that resumed runs draw again exactly: a generator per micro-batch, seeded by the run's seed
and the batch's sample seeds."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch


class SeededSteps:
    """Training randomness (noise, timesteps, synthetic masks) drawn per micro-batch from a generator seeded by the
    run's seed and the batch's sample seeds (the ``seed`` the loader gives each sample). A run resumed from a
    checkpoint restores the loader's position, so it draws exactly what the uninterrupted run would, on any number
    of ranks, with no generator state to save: only the run's seed, which checkpoints carry."""

    #: The run's seed: ``torch.initial_seed()`` when a fresh fit starts (``seed_everything``'s value).
    training_seed: int = 0

    def step_generator(self, batch: Mapping[str, Any]) -> torch.Generator | None:
        """The generator of a training batch's randomness; None (the global generator) for batches without
        sample seeds."""
        seeds = batch.get("seed")
        if not torch.is_tensor(seeds):
            return None
        entropy = [int(self.training_seed), *(int(s) for s in seeds.tolist())]
        seed = int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> 1)
        return torch.Generator(seeds.device).manual_seed(seed)

    def start_seeds(self, resuming: bool) -> None:
        """Take the run's seed when a fit starts (a resumed fit keeps its checkpoint's)."""
        if not resuming:
            self.training_seed = torch.initial_seed()

    def save_seed(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["delinea_training_seed"] = int(self.training_seed)

    def load_seed(self, checkpoint: dict[str, Any]) -> None:
        self.training_seed = int(checkpoint.get("delinea_training_seed", 0))
