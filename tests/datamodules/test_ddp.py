"""Real two-process DDP on CPU: Lightning injects its DistributedSampler and every rank gets its own shard."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from delinea.datamodules import BTCVDataModule
from delinea.testing.phantoms import Phantom

Layout = tuple[Path, dict[str, Phantom]]


class _Recorder(pl.LightningModule):
    def __init__(self, out: str) -> None:
        super().__init__()
        self.out = out
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.seen: dict[str, list] = {"train": [], "val": [], "sizes": []}

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.seen["train"] += [(c, int(k)) for c, k in zip(batch["case_id"], batch["slice_index"])]
        self.seen["sizes"].append(batch["image"].shape[-1])
        return self.weight * batch["image"].mean()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.seen["val"] += [(c, int(k)) for c, k in zip(batch["case_id"], batch["slice_index"])]

    def on_fit_end(self) -> None:
        Path(self.out, f"rank{self.global_rank}.json").write_text(json.dumps(self.seen))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.slow
def test_ddp_ranks_get_disjoint_complete_shards(btcv: Layout, tmp_path: Path) -> None:
    dm = BTCVDataModule(root=str(btcv[0]), resolution=[32, 64], batch_size=3, split_file=str(tmp_path / "split.json"))
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp_spawn", max_epochs=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(_Recorder(str(tmp_path)), datamodule=dm)
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    train = [{tuple(x) for x in s["train"]} for s in seen]
    assert train[0].isdisjoint(train[1]) and len(train[0] | train[1]) == 18  # 3 training cases x 6 slices
    assert all(s["sizes"][:2] == [32, 64] for s in seen)
    val = [[tuple(x) for x in s["val"]] for s in seen]
    assert val[0] == val[1] == [(dm.val_cases()[0], k) for k in range(6)]  # one validation case: both ranks
    test = BTCVDataModule(root=str(btcv[0]), resolution=32, batch_size=3, split_file=str(tmp_path / "split.json"))
    assert len(test.split["train"]) == 3
