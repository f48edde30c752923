"""``delinea preprocess``: every case of a dataset brought onto the plan once, into a slice store.

    delinea preprocess --data atlas8k --data.root /data/AbdomenAtlas --processes 16
    delinea preprocess --config configs/finetune.yaml --data btcv --data.root /data/BTCV --ckpt atlas8k.ckpt
    delinea fit --config configs/pretrain.yaml --data.root /data/AbdomenAtlas      # finds the store beside the split

nnU-Net's ``plan_and_preprocess`` for delinea: the plan is resolved as ``fit`` resolves it (``--data.spacing``,
``--data.plan_file``, the plan beside the split, else the median of the training cases, written there; with
``--ckpt``, that model's plan, as fine-tuning from it would use), then each case of the split (train, val and
test) is read once, cut to its body box, resampled to the plan's spacing, normalised and mapped to the unified
labels, and written to the store (:mod:`delinea.datamodules.store`), by ``--processes`` processes. Each case is
complete when its marker is written, last and atomically, so a killed run resumes where it stopped: finished cases
are kept, a case cut off midway is redone, and so is a case whose source files changed since.
"""

from __future__ import annotations

import multiprocessing
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from delinea.cli import DATA_ALIASES, CLIError, option_value, user_message
from delinea.datamodules.batches import give_plan
from delinea.datamodules.dataset import SliceDataset
from delinea.datamodules.labelled import LabelledDataModule
from delinea.datamodules.store import SliceStore
from delinea.errors import OptionError
from delinea.geometry import Plan
from delinea.io import DatasetError

_WORKER: tuple[SliceDataset, SliceStore] | None = None


def preprocess(
    datamodule: LabelledDataModule,
    processes: int = 1,
    model_plan: Plan | None = None,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Write (or complete) the slice store of ``datamodule``'s cases at ``datamodule.store_path()``.

    Args:
        datamodule: the dataset with the options its training will use (plan, normalisation, label mapping).
        processes: worker processes (one torch thread each).
        model_plan: a model's plan to preprocess for (fine-tuning from it), else the datamodule's own.
        echo: where progress lines go.

    Returns:
        A summary: the store, cases written now and before, seconds and bytes per case.

    Raises:
        DatasetError: a bad case (unless ``skip_bad_cases``), or a store made with other settings at that path.
        OptionError: ``processes`` below 1.
    """
    if processes < 1:
        raise OptionError(f"processes must be at least 1, got {processes}")
    ids = list(dict.fromkeys(c for split in ("train", "val", "test") for c in datamodule._split_ids(split, whole=True)))
    cases, _ = datamodule._checked(ids, True, datamodule.skip_bad_cases)
    plan = give_plan(datamodule, model_plan, "fit")
    store = SliceStore.create(
        datamodule.store_path(), datamodule.store_settings(), datamodule.name, datamodule.root_string
    )
    dataset = datamodule._dataset(cases)
    dataset.plan, dataset.cache_cases = plan, 1
    todo = [n for n, files in enumerate(dataset.files) if not store.is_current(files)]
    echo(
        f"delinea preprocess: {len(dataset.files)} {datamodule.name} cases on {plan.describe()} into {store.path}; "
        f"{len(dataset.files) - len(todo)} already there, {len(todo)} to write on {processes} process(es)"
    )
    started = time.perf_counter()
    records, failed = [], {}
    for n, (number, result) in enumerate(_run(dataset, store, todo, processes), 1):
        case_id = dataset.files[number].case_id
        if isinstance(result, str):
            if not datamodule.skip_bad_cases:
                raise DatasetError(result)
            failed[case_id] = result
            echo(f"[{n}/{len(todo)}] {case_id}: skipped ({result})")
            continue
        records.append(result)
        x0, x1, y0, y1, _ = result["region"]
        echo(
            f"[{n}/{len(todo)}] {case_id}: {result['slices']} slices of {x1 - x0} x {y1 - y0} px, "
            f"{result['seconds']:.1f} s, {result['bytes'] / 1e6:.1f} MB"
        )
    bytes_per_case = int(statistics.median(r["bytes"] for r in records)) if records else 0
    summary: dict[str, Any] = {
        "store": str(store.path),
        "plan": plan.to_dict(),
        "cases": len(dataset.files),
        "written": len(records),
        "kept": len(dataset.files) - len(todo),
        "failed": failed,
        "seconds": round(time.perf_counter() - started, 2),
        "seconds_per_case": round(statistics.median(r["seconds"] for r in records), 3) if records else None,
        "read_seconds_per_case": round(statistics.median(r["read_seconds"] for r in records), 3) if records else None,
        "bytes_per_case": bytes_per_case or None,
    }
    echo(
        f"delinea preprocess: wrote {len(records)} case(s) in {summary['seconds']:.0f} s"
        + (f" (median {summary['seconds_per_case']} s and {bytes_per_case / 1e6:.1f} MB per case)" if records else "")
        + (f"; skipped {len(failed)} bad case(s)" if failed else "")
    )
    return summary


def _run(
    dataset: SliceDataset, store: SliceStore, todo: list[int], processes: int
) -> Iterator[tuple[int, dict[str, Any] | str]]:
    """Write the cases ``todo``, yielding (case number, marker or error) as each finishes."""
    if processes == 1 or len(todo) <= 1:
        _start(dataset, store)
        for number in todo:
            yield number, _write(number)
        return
    # The platform's default start method, as torch's DataLoader workers (fork on Linux: no re-import per process).
    context = multiprocessing.get_context()
    with ProcessPoolExecutor(min(processes, len(todo)), context, _start, (dataset, store)) as pool:
        futures = {pool.submit(_write, number): number for number in todo}
        for future in as_completed(futures):
            yield futures[future], future.result()


def _start(dataset: SliceDataset, store: SliceStore) -> None:
    global _WORKER
    torch.set_num_threads(1)
    _WORKER = (dataset, store)


def _write(number: int) -> dict[str, Any] | str:
    """Read case ``number`` once, write all its slices on the plan and then its marker; a bad case's error."""
    assert _WORKER is not None
    dataset, store = _WORKER
    files = dataset.files[number]
    started = time.perf_counter()
    try:
        modality, region, box = dataset.layout(number)  # reads the volumes and finds the body box
        read = time.perf_counter() - started
        depth = int(np.count_nonzero(dataset.case_of == number))

        def slices() -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
            for k in range(depth):
                image, mask = dataset.lattice(number, k, region)
                assert image is not None
                yield image[0].numpy(), None if mask is None else mask.numpy()

        labelled = dataset.spec is not None and files.has_label
        extra = {"read_seconds": round(read, 3)}
        record = store.write_case(files, modality, region, box, depth, slices(), labelled, extra)
    except DatasetError as error:
        return str(error)
    finally:
        dataset._cache.clear()  # one volume at a time per process
    record["seconds"] = round(time.perf_counter() - started, 3)
    return record


# -- the command ---------------------------------------------------------------------------------------------------


def _data_configs(argv: list[str]) -> list[str]:
    """``--config FILE`` turned into ``--data <its data section>``: the stage configs (with model and trainer
    sections) can be given to ``preprocess`` as to ``fit``, and only their data options count."""
    out, i = [], 0
    while i < len(argv):
        name, eq, inline = argv[i].partition("=")
        if name == "--config":
            path = Path(inline if eq else (argv[i + 1] if i + 1 < len(argv) else ""))
            i += 1 if eq else 2
            try:
                data = (yaml.safe_load(path.read_text()) or {}).get("data")
            except (OSError, yaml.YAMLError) as error:
                raise OptionError(f"--config {path}: cannot read it ({error})") from None
            if data is not None:
                out += ["--data", yaml.safe_dump(data)]
            continue
        out.append(argv[i])
        i += 1
    return out


def main(argv: list[str]) -> dict[str, Any]:
    """``delinea preprocess [--config FILE] --data NAME [--data.* ...] [--processes N] [--ckpt MODEL]``."""
    from jsonargparse import ArgumentParser

    from delinea.datamodules import DATAMODULES
    from delinea.tasks.checkpoints import read_checkpoint

    argv = _data_configs(list(argv))
    data = option_value(argv, "--data")
    if data is not None and data.lower() in DATA_ALIASES:
        option_value(argv, "--data", replace=DATA_ALIASES[data.lower()])
    elif data is not None and data not in DATA_ALIASES.values() and "." not in data and "\n" not in data:
        raise CLIError(f"unknown dataset {data!r}; choose one of {', '.join(n for n in DATAMODULES if n != 'scan')}")
    description = (
        "Every case of a dataset on the plan, once, into a slice store (README: 'Preprocess once'). Takes the "
        "data options of fit: --data and --data.*, and --config FILE (only its data section counts)."
    )
    parser = ArgumentParser(prog="delinea preprocess", description=description)
    parser.add_subclass_arguments(LabelledDataModule, "data", required=True, fail_untyped=False)
    parser.add_argument("--processes", type=int, default=1, help="worker processes, one torch thread each")
    parser.add_argument("--ckpt", type=str | None, default=None, help="preprocess for this model's plan (fine-tuning)")
    config = parser.parse_args(argv)
    try:
        datamodule = parser.instantiate_classes(config)["data"]
    except (ValueError, KeyError) as error:
        raise CLIError(user_message(error)) from error
    model_plan = None
    if config.ckpt:
        checkpoint = read_checkpoint(config.ckpt, "--ckpt")
        if checkpoint.get("delinea_plan") is None:
            raise CLIError(f"--ckpt {config.ckpt} carries no plan; give --data.spacing or --data.plan_file instead")
        model_plan = Plan.from_dict(checkpoint["delinea_plan"], f"--ckpt {config.ckpt}")
    return preprocess(datamodule, config.processes, model_plan, echo=lambda line: print(line, flush=True))


if __name__ == "__main__":
    main(sys.argv[1:])
