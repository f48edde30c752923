"""The batch sampler: resolution alternation, rank shards, empty-slice sampling, Lightning's sampler injection."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler

from delinea.datamodules import BTCVDataModule, FolderDataModule, SliceBatchSampler
from delinea.testing.phantoms import Phantom

Layout = tuple[Path, dict[str, Phantom]]


def _case_of(counts: list[int]) -> np.ndarray:
    return np.repeat(np.arange(len(counts)), counts)


def _flat(sampler: SliceBatchSampler) -> list[int]:
    return [i for batch in sampler for i, *_ in batch]


def test_training_order_is_a_seeded_permutation_per_epoch() -> None:
    case_of = _case_of([7, 5, 9, 3, 6])
    sampler = SliceBatchSampler(batch_size=4, case_of=case_of, shuffle=True, seed=0)
    first = _flat(sampler)
    assert sorted(first) == list(range(30)) and first != list(range(30))
    assert _flat(SliceBatchSampler(batch_size=4, case_of=case_of, shuffle=True, seed=0)) == first
    sampler.set_epoch(1)
    assert _flat(sampler) != first and sorted(_flat(sampler)) == list(range(30))
    assert len(sampler) == len(list(sampler)) == 8


def test_case_blocks_keep_few_cases_per_run() -> None:
    case_of = _case_of([10] * 12)
    sampler = SliceBatchSampler(batch_size=5, case_of=case_of, shuffle=True, block_cases=2)
    order = _flat(sampler)
    blocks = [set(case_of[order[i : i + 20]]) for i in range(0, 120, 20)]
    assert all(len(b) == 2 for b in blocks)  # each run of 20 samples comes from 2 cases


def test_resolution_alternates_per_batch_and_shifts_with_epoch() -> None:
    sampler = SliceBatchSampler(batch_size=3, case_of=_case_of([6, 6]), resolutions=[256, 512], shuffle=True)
    assert [batch[0][1] for batch in sampler] == [256, 512, 256, 512]
    assert all(len({w for _, w, _ in batch}) == 1 for batch in sampler)
    sampler.set_epoch(1)
    assert [batch[0][1] for batch in sampler] == [512, 256, 512, 256]
    evaluation = SliceBatchSampler(batch_size=3, case_of=_case_of([6, 6]), resolutions=[256, 512], shuffle=False)
    assert {batch[0][1] for batch in evaluation} == {0}  # evaluation serves whole slices


def test_loader_batches_alternate_resolution(btcv: Layout) -> None:
    dm = BTCVDataModule(root=str(btcv[0]), resolution=[32, 64], batch_size=4)
    sizes = [batch["image"].shape[-1] for batch in dm.train_dataloader()]
    assert sizes == [32, 64, 32, 64, 32][: len(sizes)] and len(sizes) == 5  # 18 slices / 4
    masks = [batch["mask"].shape[-1] for batch in dm.train_dataloader()]
    assert masks == sizes


@pytest.mark.parametrize("lanes", [1, 2, 3])
def test_two_ranks_get_disjoint_complete_training_shards(lanes: int) -> None:
    case_of = _case_of([6, 4, 8, 6])  # 24 samples: divisible by 2 ranks, no padding
    shards = []
    for rank in range(2):
        sampler = SliceBatchSampler(
            batch_size=5, case_of=case_of, shuffle=True, seed=3, lanes=lanes, num_replicas=2, rank=rank
        )
        shards.append(_flat(sampler))
        assert len(sampler) == len(list(sampler))
    assert set(shards[0]).isdisjoint(shards[1])
    assert sorted(shards[0] + shards[1]) == list(range(24))
    assert len(shards[0]) == len(shards[1]) == 12


def test_uneven_training_shards_pad_like_distributed_sampler() -> None:
    case_of = _case_of([5, 4, 4])  # 13 samples over 3 ranks: 5 each, 2 repeated
    samplers = [
        SliceBatchSampler(batch_size=2, case_of=case_of, shuffle=True, num_replicas=3, rank=r) for r in range(3)
    ]
    shards = [_flat(s) for s in samplers]
    assert [len(s) for s in shards] == [5, 5, 5] and len({len(s) for s in samplers}) == 1
    counts = Counter(i for s in shards for i in s)
    assert set(counts) == set(range(13)) and sum(c - 1 for c in counts.values()) == 2


def test_evaluation_shards_are_whole_cases_in_order() -> None:
    case_of = _case_of([3, 2, 4, 1, 2])
    shards = []
    for rank in range(2):
        sampler = SliceBatchSampler(batch_size=2, case_of=case_of, shuffle=False, num_replicas=2, rank=rank)
        shards.append(_flat(sampler))
        assert len(sampler) == len(list(sampler))
    # Balanced by slices, largest case first to the least loaded rank: 4 + 2 slices vs 3 + 2 + 1.
    assert set(case_of[shards[0]]) == {2, 4} and set(case_of[shards[1]]) == {0, 1, 3}
    assert len(shards[0]) == len(shards[1]) == 6
    assert shards[1] == sorted(shards[1]) and sorted(shards[0] + shards[1]) == list(range(12))


def test_fewer_evaluation_cases_than_ranks_repeat_a_case_with_a_warning() -> None:
    with pytest.warns(UserWarning, match="1 evaluation case.*for 3 ranks.*deduplicate"):
        samplers = [
            SliceBatchSampler(batch_size=2, case_of=_case_of([3]), shuffle=False, num_replicas=3, rank=r)
            for r in range(3)
        ]
    assert [_flat(s) for s in samplers] == [[0, 1, 2]] * 3


def test_distributed_sampler_argument_sets_the_shard() -> None:
    case_of = _case_of([6, 6])
    injected = DistributedSampler(range(12), num_replicas=2, rank=1, shuffle=False)
    sampler = SliceBatchSampler(injected, batch_size=3, case_of=case_of, shuffle=True)
    assert (sampler.num_replicas, sampler.rank) == (2, 1)
    assert _flat(sampler) == _flat(
        SliceBatchSampler(batch_size=3, case_of=case_of, shuffle=True, num_replicas=2, rank=1)
    )


def test_lightning_injects_its_distributed_sampler(btcv: Layout) -> None:
    from lightning.fabric.utilities.data import _replace_dunder_methods
    from lightning.pytorch.trainer.states import RunningStage
    from lightning.pytorch.utilities.data import _update_dataloader

    dm = BTCVDataModule(root=str(btcv[0]), resolution=[32, 64], batch_size=2, num_workers=0)
    dm.setup("fit")
    shards = []
    for rank in range(2):
        # What Lightning does under DDP: capture the loader's arguments, then rebuild it with a DistributedSampler.
        with _replace_dunder_methods(DataLoader, "dataset"), _replace_dunder_methods(BatchSampler):
            loader = dm.train_dataloader()
        sampler = DistributedSampler(loader.dataset, num_replicas=2, rank=rank)
        rebuilt = _update_dataloader(loader, sampler, mode=RunningStage.TRAINING)
        assert isinstance(rebuilt.batch_sampler, SliceBatchSampler) and rebuilt.batch_sampler.rank == rank
        shards.append([(c, int(k)) for b in rebuilt for c, k in zip(b["case_id"], b["slice_index"])])
    assert set(shards[0]).isdisjoint(shards[1]) and len(shards[0]) + len(shards[1]) == 18


def test_empty_slice_ratio_sets_the_share_of_empty_slices(folder: Layout) -> None:
    root, _ = folder
    dm = FolderDataModule(root=str(root), resolution=32, batch_size=8, empty_slice_ratio=0.0)
    dm.setup("fit")
    dataset = dm._datasets["train"]
    assert dataset.foreground is not None and dataset.foreground.sum() == 16 * 4  # slices 1..4 of 16 cases
    empty = [m.sum() == 0 for b in dm.train_dataloader() for m in b["mask"]]
    assert len(empty) == 64 and not any(empty)
    dm = FolderDataModule(root=str(root), resolution=32, batch_size=8, empty_slice_ratio=0.2)
    dm.setup("fit")
    loader = dm.train_dataloader()
    epoch0 = [(c, int(k)) for b in loader for c, k in zip(b["case_id"], b["slice_index"])]
    empty = [k in (0, 5) for _, k in epoch0]
    assert len(empty) == 80 and sum(empty) == 16  # 16 / 80 = 0.2
    loader.batch_sampler.set_epoch(1)
    epoch1 = [(c, int(k)) for b in loader for c, k in zip(b["case_id"], b["slice_index"])]
    assert {x for x in epoch0 if x[1] in (0, 5)} != {x for x in epoch1 if x[1] in (0, 5)}  # redrawn per epoch


def test_workers_serve_the_same_slices_as_the_main_process(btcv: Layout) -> None:
    served = {}
    for workers in (0, 2):
        dm = BTCVDataModule(root=str(btcv[0]), resolution=[32, 64], batch_size=3, num_workers=workers)
        loader = dm.train_dataloader()
        assert loader.persistent_workers is (workers > 0)
        assert loader.pin_memory is torch.cuda.is_available()
        served[workers] = {
            (c, int(k), b["image"].shape[-1]): (image, mask)
            for b in loader
            for c, k, image, mask in zip(b["case_id"], b["slice_index"], b["image"], b["mask"])
        }
    # The order differs (one lane of cases per worker) but every slice is served once, identically.
    assert len(served[0]) == len(served[2]) == 18
    for key in set(served[0]) & set(served[2]):
        assert torch.equal(served[0][key][0], served[2][key][0]) and torch.equal(served[0][key][1], served[2][key][1])


def test_each_worker_reads_its_own_cases() -> None:
    case_of = _case_of([8] * 8)
    sampler = SliceBatchSampler(batch_size=4, case_of=case_of, shuffle=True, block_cases=2, lanes=2)
    batches = list(sampler)
    cases_per_worker = [{int(case_of[i]) for b in batches[w::2] for i, *_ in b} for w in range(2)]
    assert cases_per_worker[0].isdisjoint(cases_per_worker[1])  # batch i goes to worker i % 2
