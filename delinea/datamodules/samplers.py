"""A batch sampler that picks the slices of each batch, the batch's window size, and this rank's shard.

Training batches carry ``(sample_index, window, seed)`` requests, so one dataset serves several window sizes,
every sample of a batch has the same size, and each sample's random crop (and augmentation) is drawn from its
own seed. Evaluation batches carry ``(sample_index, 0, 0)``: whole resampled slices, one case per batch. The
order and the seeds are a function of ``(seed, epoch)`` only, and :class:`ResumableLoader` saves how far into
its epoch the loader got, so a run resumed mid-epoch sees exactly the batches the uninterrupted run would.

Distributed training: Lightning (``use_distributed_sampler=True``, the default) injects a
``DistributedSampler`` as the ``sampler`` argument when it re-creates this batch sampler; only its
``num_replicas`` and ``rank`` are used. ``num_replicas``/``rank`` can also be given directly.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, Sampler

from delinea.errors import OptionError


class SliceBatchSampler(BatchSampler):
    """Batches of ``(index, window, seed)`` over a slice index, case-blocked and seeded for training.

    Training (``shuffle=True``), per epoch:

    1. keep every slice, or with ``empty_slice_ratio`` every foreground slice plus a seeded draw of empty
       slices so that they make up that share of the epoch;
    2. shuffle the cases and lay their slices out case by case;
    3. give each rank a contiguous, equal-length shard (padded by wrapping around, as ``DistributedSampler``
       does), split it into ``lanes`` contiguous runs, one per loader worker, shuffle each run's slices within
       blocks of ``block_cases`` consecutive cases (so that a worker's small volume cache serves many slices per
       volume read), and interleave their batches: the DataLoader hands batch ``i`` to worker
       ``i % num_workers``, so each worker reads its own cases (micro-batches too);
    4. batch ``b`` of the epoch gets window ``resolutions[(b + epoch) % len(resolutions)]``, and every sample a
       seed drawn from ``(seed, epoch)``.

    Evaluation (``shuffle=False``): every slice, whole (window 0); a batch never holds two cases, since their
    resampled slices differ in size. With one lane, case by case in index order, slices ascending; with several,
    each worker gets a contiguous run of those batches and the workers' batches are interleaved, so a case's
    slices may arrive from two workers, out of order (:class:`~delinea.volumes.VolumeAssembler` takes them
    in any order). Ranks get whole cases,
    balanced by slice count, so per-case volumes can be stacked on one rank; batch counts may differ by rank (log
    eval metrics per epoch, not per step with a sync). With fewer cases than ranks, the extra ranks repeat a case
    (with a warning): Lightning needs a batch on every rank.

    Args:
        sampler: ignored except to read ``num_replicas``/``rank`` from a ``DistributedSampler``; present so
            Lightning can inject one.
        batch_size: samples per batch.
        drop_last: drop each lane's last incomplete batch (training only).
        case_of: case number of each sample (N,), non-decreasing in index order.
        foreground: whether each sample has foreground (N,); needed for ``empty_slice_ratio``.
        resolutions: the training window sizes to alternate between.
        shuffle: training order (True) or evaluation order (False).
        seed: seed of the order.
        empty_slice_ratio: share of empty slices per training epoch, in [0, 1), or None for all slices.
        block_cases: cases per shuffle block.
        lanes: loader workers (1 for none).
        num_replicas: number of ranks (default: from ``sampler`` or 1).
        rank: this rank (default: from ``sampler`` or 0).
        micro_batch_sizes: per window size, the samples of a micro-batch (a divisor of ``batch_size``): each
            training batch of ``batch_size`` samples is served as ``batch_size / micro`` micro-batches of its
            window, so 512² batches can fit the GPU while 256² ones stay large. None: whole batches (as above).
        accumulate: micro-batches per optimiser step (the Trainer's ``accumulate_grad_batches``), a multiple of a
            resolution cycle's micro-batches; with ``micro_batch_sizes``, every optimiser step then holds the same
            samples of each window size (the paper's alternation: with batch 32, windows [256, 512], micro-batches
            {256: 32, 512: 8} and accumulate 20, each step has 4 batches of 32 at 256² and 4 at 512², in 4 + 16
            micro-batches), and the epoch is cut (or filled by wrapping around) to whole steps.
    """

    def __init__(
        self,
        sampler: Sampler | Iterable | None = None,
        batch_size: int = 1,
        drop_last: bool = False,
        *,
        case_of: np.ndarray,
        foreground: np.ndarray | None = None,
        resolutions: Sequence[int] = (256,),
        shuffle: bool = False,
        seed: int = 0,
        empty_slice_ratio: float | None = None,
        block_cases: int = 4,
        lanes: int = 1,
        num_replicas: int | None = None,
        rank: int | None = None,
        micro_batch_sizes: dict[int, int] | None = None,
        accumulate: int = 1,
    ) -> None:
        case_of = np.asarray(case_of)
        super().__init__(sampler if sampler is not None else range(len(case_of)), batch_size, drop_last)
        if isinstance(sampler, DistributedSampler):
            num_replicas = sampler.num_replicas if num_replicas is None else num_replicas
            rank = sampler.rank if rank is None else rank
        self.num_replicas = 1 if num_replicas is None else int(num_replicas)
        self.rank = 0 if rank is None else int(rank)
        if not 0 <= self.rank < self.num_replicas:
            raise ValueError(f"rank {self.rank} is not in [0, {self.num_replicas})")
        if not resolutions:
            raise ValueError("resolutions must not be empty")
        if empty_slice_ratio is not None:
            if not 0 <= empty_slice_ratio < 1:
                raise ValueError(f"empty_slice_ratio must be in [0, 1), got {empty_slice_ratio}")
            if foreground is None:
                raise ValueError("empty_slice_ratio needs the foreground flag of every slice")
        self.case_of = case_of
        self.foreground = None if foreground is None else np.asarray(foreground, dtype=bool)
        self.resolutions = [int(r) for r in resolutions]
        self.shuffle = shuffle
        self.seed = seed
        self.empty_slice_ratio = empty_slice_ratio if shuffle else None
        self.block_cases = max(1, int(block_cases))
        self.lanes = max(1, int(lanes))
        self.epoch = 0
        self._resume: tuple[int, int] | None = None
        self.cycle = micro_batch_cycle(batch_size, self.resolutions, micro_batch_sizes) if micro_batch_sizes else None
        self.accumulate = int(accumulate)
        if self.cycle is not None and (self.accumulate < 1 or self.accumulate % len(self.cycle)):
            raise ValueError(
                f"accumulate {accumulate} is not a whole number of resolution cycles of {len(self.cycle)} "
                f"micro-batches ({describe_cycle(self.cycle)})"
            )
        n_cases = len(np.unique(case_of))
        if not shuffle and 0 < n_cases < self.num_replicas:
            warnings.warn(
                f"{n_cases} evaluation case(s) for {self.num_replicas} ranks: every rank evaluates whole cases, so "
                f"ranks {n_cases}..{self.num_replicas - 1} repeat cases; deduplicate per-case results by case_id",
                stacklevel=2,
            )

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch that seeds the order and the resolution phase (Lightning calls this)."""
        self.epoch = int(epoch)

    def resume_at(self, epoch: int, batches: int) -> None:
        """Make the next iteration of ``epoch`` start after its first ``batches`` batches (a resumed run)."""
        self._resume = (int(epoch), int(batches))

    # ----------------------------------------------------------------------------------------------------
    def _selected_count(self) -> int:
        if self.empty_slice_ratio is None or self.foreground is None:
            return len(self.case_of)
        n_fg = int(self.foreground.sum())
        n_empty = len(self.foreground) - n_fg
        if n_fg == 0:
            return n_empty
        ratio = self.empty_slice_ratio
        return n_fg + min(n_empty, round(ratio / (1 - ratio) * n_fg))

    def _train_order(self) -> np.ndarray:
        """This epoch's global order of sample indices (identical on every rank): the selected slices case by case,
        cases in a seeded order. Slices are shuffled later, within each lane's blocks (:meth:`_shuffled`)."""
        rng = np.random.default_rng([self.seed, self.epoch])
        selected = np.arange(len(self.case_of))
        if self.empty_slice_ratio is not None and self.foreground is not None and self.foreground.any():
            empty = np.flatnonzero(~self.foreground)
            keep = self._selected_count() - int(self.foreground.sum())
            chosen = rng.choice(empty, size=keep, replace=False) if keep else empty[:0]
            selected = np.sort(np.concatenate([np.flatnonzero(self.foreground), chosen]))
        # ``selected`` is sorted and case_of non-decreasing, so each case is one contiguous run.
        _, starts = np.unique(self.case_of[selected], return_index=True)
        groups = np.split(selected, starts[1:])
        return np.concatenate([groups[i] for i in rng.permutation(len(groups))]) if groups else selected

    def _shard(self, length: int | None = None) -> np.ndarray:
        """This rank's contiguous share of the epoch as (index, seed) pairs, (n, 2); ``length`` cuts it or fills it
        by wrapping around (whole optimiser steps)."""
        order = self._train_order()
        size = self._shard_length()
        seeds = np.random.default_rng([self.seed, self.epoch, 1]).integers(0, 2**31 - 1, size * self.num_replicas)
        padded = np.stack([np.resize(order, size * self.num_replicas), seeds], 1)  # wraps, like DistributedSampler
        shard = padded[self.rank * size : (self.rank + 1) * size]
        return shard if length is None else np.resize(shard, (length, 2))

    def _lanes(self, shard: np.ndarray, sizes: Sequence[int]) -> list[np.ndarray]:
        """The shard cut into one contiguous run per loader worker (``sizes`` samples each), each run shuffled
        within blocks of ``block_cases`` consecutive cases: a worker's volume cache of ``block_cases`` cases then
        reads each of its cases once, and only the cases cut at a run's ends are read by two workers."""
        runs, start = [], 0
        for lane, size in enumerate(sizes):
            run = shard[start : start + size]
            start += size
            cases = self.case_of[run[:, 0]]
            block = np.concatenate([[0], np.cumsum(cases[1:] != cases[:-1])]) // self.block_cases if len(run) else cases
            rng = np.random.default_rng([self.seed, self.epoch, 2, self.rank, lane])
            parts = [run[block == b] for b in np.unique(block)]
            runs.append(np.concatenate([p[rng.permutation(len(p))] for p in parts]) if parts else run)
        return runs

    def _shard_length(self) -> int:
        return -(-self._selected_count() // self.num_replicas)

    def _lane_sizes(self) -> list[int]:
        return [len(a) for a in np.array_split(np.arange(self._shard_length()), self.lanes)]

    def _eval_cases(self) -> list[np.ndarray]:
        """Whole cases per rank, balanced by slice count (largest first to the least loaded rank)."""
        cases, counts = np.unique(self.case_of, return_counts=True)
        if len(cases) < self.num_replicas:
            # Lightning needs at least one batch on every rank (an empty rank would hang epoch-end syncs).
            return [cases[[r % len(cases)]] if len(cases) else cases for r in range(self.num_replicas)]
        loads = np.zeros(self.num_replicas)
        owned: list[list[int]] = [[] for _ in range(self.num_replicas)]
        for i in np.argsort(-counts, kind="stable"):
            rank = int(np.argmin(loads))
            loads[rank] += counts[i]
            owned[rank].append(cases[i])
        return [np.sort(np.asarray(o, dtype=cases.dtype)) for o in owned]

    def _eval_indices(self) -> np.ndarray:
        return np.flatnonzero(np.isin(self.case_of, self._eval_cases()[self.rank]))

    def _eval_batches(self) -> list[np.ndarray]:
        """This rank's evaluation batches: runs of ``batch_size`` slices that never cross a case boundary. With
        several lanes, the batches (case by case) are cut into one contiguous run per loader worker, as even as
        batches allow, and interleaved: each worker reads its own cases, and only a case cut between two runs is
        read twice."""
        indices = self._eval_indices()
        batches = []
        for case in np.unique(self.case_of[indices]):
            mine = indices[self.case_of[indices] == case]
            batches += [mine[i : i + self.batch_size] for i in range(0, len(mine), self.batch_size)]
        if self.lanes == 1:
            return batches
        bounds = np.cumsum([0] + [len(run) for run in np.array_split(np.arange(len(batches)), self.lanes)])
        lanes = [batches[bounds[lane] : bounds[lane + 1]] for lane in range(self.lanes)]
        interleaved: list[np.ndarray] = []
        for i in range(max(len(b) for b in lanes)):
            interleaved.extend(batches[i] for batches in lanes if i < len(batches))
        return interleaved

    def _batches(self) -> list[np.ndarray]:
        """This rank's training batches of (index, seed) pairs, shape (n, 2) each."""
        if len(self.case_of) == 0:
            return []
        lanes = []
        for run in self._lanes(self._shard(), self._lane_sizes()):
            batches = [run[i : i + self.batch_size] for i in range(0, len(run), self.batch_size)]
            if self.drop_last and batches and len(batches[-1]) < self.batch_size:
                batches.pop()
            lanes.append(batches)
        interleaved: list[np.ndarray] = []
        for i in range(max((len(b) for b in lanes), default=0)):
            interleaved.extend(batches[i] for batches in lanes if i < len(batches))
        return interleaved

    def _step_samples(self) -> int:
        assert self.cycle is not None
        return self.accumulate // len(self.cycle) * sum(size for _, size in self.cycle)

    def _steps(self) -> int:
        """Whole optimiser steps this epoch (micro-batch mode): at least one, filled by wrapping around."""
        return max(1, self._shard_length() // self._step_samples()) if len(self.case_of) else 0

    def _micro_batches(self) -> list[tuple[int, np.ndarray]]:
        """This rank's training micro-batches as (window, (n, 2) index-seed pairs), whole steps of the cycle.

        Micro-batch ``b`` goes to loader worker ``b % lanes`` (the DataLoader's round robin), so it is cut from that
        worker's own run of cases."""
        assert self.cycle is not None
        count = self._steps() * self.accumulate
        plan = [self.cycle[b % len(self.cycle)] for b in range(count)]
        sizes = [sum(size for b, (_, size) in enumerate(plan) if b % self.lanes == lane) for lane in range(self.lanes)]
        runs = self._lanes(self._shard(self._steps() * self._step_samples()), sizes)
        taken = [0] * self.lanes
        out = []
        for b, (window, size) in enumerate(plan):
            lane = b % self.lanes
            out.append((window, runs[lane][taken[lane] : taken[lane] + size]))
            taken[lane] += size
        return out

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:  # type: ignore[override]  # requests, not indices
        if not self.shuffle:
            for batch in self._eval_batches():
                yield [(int(i), 0, 0) for i in batch]
            return
        skip = self._resume[1] if self._resume is not None and self._resume[0] == self.epoch else 0
        self._resume = None
        if self.cycle is not None:
            for b, (window, batch) in enumerate(self._micro_batches()):
                if b >= skip:
                    yield [(int(i), window, int(seed)) for i, seed in batch]
            return
        for b, batch in enumerate(self._batches()):
            if b < skip:
                continue
            window = self.resolutions[(b + self.epoch) % len(self.resolutions)]
            yield [(int(i), window, int(seed)) for i, seed in batch]

    def __len__(self) -> int:
        if not self.shuffle:
            return len(self._eval_batches())
        if self.cycle is not None:
            return self._steps() * self.accumulate
        if len(self.case_of) == 0:
            return 0
        sizes = self._lane_sizes()
        if self.drop_last:
            return sum(s // self.batch_size for s in sizes)
        return sum(-(-s // self.batch_size) for s in sizes)


def micro_batch_cycle(batch_size: int, resolutions: Sequence[int], micro: dict[int, int]) -> list[tuple[int, int]]:
    """One resolution cycle as (window, micro-batch size) pairs: each window's batch of ``batch_size`` samples
    split into micro-batches of ``micro[window]``.

    Raises:
        ValueError: a window without a micro-batch size, or one that does not divide ``batch_size``.
    """
    cycle = []
    for window in resolutions:
        size = micro.get(int(window))
        if size is None or size < 1 or batch_size % size:
            raise ValueError(
                f"micro_batch_size for {window} px must be a positive divisor of batch_size {batch_size}, got {size} "
                f"(micro_batch_size {micro})"
            )
        cycle += [(int(window), int(size))] * (batch_size // size)
    return cycle


def describe_cycle(cycle: list[tuple[int, int]]) -> str:
    """``1 x 32 at 256 + 4 x 8 at 512``: a resolution cycle in words."""
    runs: list[list[int]] = []
    for window, size in cycle:
        if runs and runs[-1][1:] == [window, size]:
            runs[-1][0] += 1
        else:
            runs.append([1, window, size])
    return " + ".join(f"{n} x {size} at {window}" for n, window, size in runs)


class ResumableLoader(DataLoader):
    """A training DataLoader over a :class:`SliceBatchSampler` that Lightning checkpoints (its stateful-loader
    protocol): ``state_dict`` records which pass over the data this is and how many of its batches were handed
    out, ``load_state_dict`` makes the next iteration continue right after them.

    The loader counts its passes itself and sets the sampler's epoch from that count, so the order does not hang on
    Lightning's epoch number (which a resume from a checkpoint written at an epoch's last batch advances twice).
    Lightning fetches no batch ahead of a loader with a length, so "handed out" is "trained on".
    """

    _passes = 0
    _handed_out = 0

    def __iter__(self) -> Iterator:  # type: ignore[override]  # a generator over the base iterator
        sampler = self.batch_sampler
        if self._handed_out >= len(self):  # the last pass is complete: start the next one
            self._passes, self._handed_out = self._passes + 1, 0
        if isinstance(sampler, SliceBatchSampler):
            sampler.set_epoch(self._passes)
            sampler.resume_at(self._passes, self._handed_out)
        else:
            self._handed_out = 0
        for batch in super().__iter__():
            self._handed_out += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"passes": int(self._passes), "batches": int(self._handed_out)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._passes, self._handed_out = int(state["passes"]), int(state["batches"])


def checked_cycle(
    batch_size: int, micro_batch_size: int | dict[int, int], windows: Sequence[int]
) -> list[tuple[int, int]]:
    """:func:`micro_batch_cycle` for a ``micro_batch_size`` option (one size, or one per window).

    Raises:
        OptionError: a window without a micro-batch size, or one that does not divide ``batch_size``.
    """
    sizes = (
        {int(w): int(micro_batch_size) for w in windows}
        if isinstance(micro_batch_size, int)
        else {int(k): int(v) for k, v in micro_batch_size.items()}
    )
    try:
        return micro_batch_cycle(batch_size, windows, sizes)
    except ValueError as error:
        raise OptionError(str(error)) from None


def micro_batch_plan(
    batch_size: int, micro_batch_size: int | dict[int, int] | None, windows: Sequence[int], accumulate: int = 1
) -> tuple[list[tuple[int, int]], dict[int, float]] | None:
    """The training resolution cycle as (window, micro-batch) pairs and each window's loss weight (its micro-batch
    over the step's mean micro-batch, so every sample of a step weighs the same); None without ``micro_batch_size``.

    Args:
        batch_size: samples per batch of one window size.
        micro_batch_size: samples per micro-batch, per window size or for all; None: whole batches.
        windows: the training windows, alternated between batches.
        accumulate: the Trainer's ``accumulate_grad_batches`` (counted in micro-batches).

    Raises:
        OptionError: a micro-batch size that does not divide ``batch_size``, or an ``accumulate`` that is no whole
            number of resolution cycles.
    """
    if micro_batch_size is None:
        return None
    cycle = checked_cycle(batch_size, micro_batch_size, windows)
    if accumulate % len(cycle):
        cycles = max(1, -(-accumulate // len(windows)))  # reading the value as batches of batch_size
        raise OptionError(
            f"trainer.accumulate_grad_batches {accumulate} counts micro-batches and must be a whole number of "
            f"resolution cycles ({describe_cycle(cycle)}: {len(cycle)} micro-batches), so that every optimiser "
            f"step holds the same slices of each size: e.g. {cycles * len(cycle)} for "
            f"{cycles * len(windows)} batches of {batch_size}"
        )
    mean = sum(size for _, size in cycle) / len(cycle)
    return cycle, {window: size / mean for window, size in cycle}
