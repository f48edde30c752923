"""The slice store: `delinea preprocess` writes it, fit/validate/test read it, and it serves the very tensors (and
so the evaluation numbers) the source files do; stale or foreign stores are refused; a killed run resumes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from delinea.datamodules import BTCVDataModule, FolderDataModule
from delinea.datamodules.samplers import SliceBatchSampler
from delinea.datamodules.utils import LabelSpec
from delinea.geometry import IMAGE_FILL, crop_window, window_offsets
from delinea.io import DatasetError
from delinea.main import main
from delinea.preprocess import preprocess
from delinea.testing.phantoms import Phantom, write_btcv

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks.loader import worker_reads

ROOT = Path(__file__).resolve().parents[2]
Layout = tuple[Path, dict[str, Phantom]]
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def _btcv(root: Path, split: Path, **options: object) -> BTCVDataModule:
    defaults: dict = {"resolution": [32, 48], "batch_size": 4, "augment": True, "split_file": str(split)}
    return BTCVDataModule(root=str(root), **(defaults | options))


def _store(root: Path, tmp: Path, **options: object) -> Path:
    preprocess(_btcv(root, tmp / "split.json", **options), echo=lambda line: None)
    return tmp / "split.store"


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        assert torch.equal(value, b[key]) if torch.is_tensor(value) else value == b[key], key


def test_the_store_serves_the_tensors_the_source_files_do(btcv: Layout, tmp_path: Path) -> None:
    store = _store(btcv[0], tmp_path)
    assert json.loads((store / "store.json").read_text())["settings"]["spacing_mm"] == {"ct": 1.5}
    native = _btcv(btcv[0], tmp_path / "split.json", store=False)
    stored = _btcv(btcv[0], tmp_path / "split.json")  # found beside the split
    for split in ("train", "val", "test"):
        a, b = native.dataset(split), stored.dataset(split)
        assert a.store is None and b.store is not None and b.store.path == store
        requests = (
            [(i, 0, 0) for i in range(len(a))]
            if split != "train"
            else [(i, window, seed) for i in range(len(a)) for window in (32, 48) for seed in (i, i + 100)]
        )
        for request in requests:  # whole slices, windows, windows centred on organs, augmented windows
            _same(a[request], b[request])
    assert sum(native.dataset("train").reads.values()) == len(native.train_cases())  # one read per case
    assert not stored.dataset("train").reads  # the store never reads a volume


def test_a_training_window_is_the_crop_of_the_whole_slice(btcv: Layout, tmp_path: Path) -> None:
    dm = _btcv(btcv[0], tmp_path / "split.json", augment=False, store=False, foreground_share=0.5)
    dataset = dm.dataset("train")
    for index in range(0, len(dataset), 3):
        whole = dataset[index]
        for seed in range(4):
            window = dataset[(index, 48, seed)]
            _, top, left = _crop_of(dataset, index, 48, seed)
            assert torch.equal(window["image"], crop_window(whole["image"], top, left, 48, IMAGE_FILL))
            assert torch.equal(window["mask"], crop_window(whole["mask"], top, left, 48, 0))


def _crop_of(dataset: object, index: int, window: int, seed: int) -> tuple[int, int, int]:
    """Where ``dataset[(index, window, seed)]`` was cut, drawn as the dataset draws it."""
    rng = np.random.default_rng(seed)
    number = int(dataset.case_of[index])  # type: ignore[attr-defined]
    _, region, _ = dataset.layout(number)  # type: ignore[attr-defined]
    centred = rng.random() < dataset.foreground_share  # type: ignore[attr-defined]
    mask = dataset[index]["mask"] if centred else None  # type: ignore[index]
    top, left = window_offsets(region.size, window, rng, mask, False)
    return window, top, left


def test_evaluation_numbers_are_identical_with_and_without_the_store(btcv: Layout, tmp_path: Path) -> None:
    data = ["--data.root", str(btcv[0]), "--data.split_file", str(tmp_path / "split.json")]
    main(
        [
            "fit",
            "--config",
            str(ROOT / "tests/conf/unet_btcv.yaml"),
            *data,
            "--data.store",
            "false",
            "--trainer.default_root_dir",
            str(tmp_path / "run"),
            *QUIET,
        ]
    )
    checkpoint = next((tmp_path / "run").rglob("*.ckpt"))
    main(["preprocess", "--data", "btcv", *data, "--ckpt", str(checkpoint)])
    summaries = {}
    for store in ("false", "true"):
        main(
            [
                "test",
                "--ckpt",
                str(checkpoint),
                "--data",
                "btcv",
                *data,
                "--data.store",
                store,
                "--output",
                str(tmp_path / store),
                "--trainer.default_root_dir",
                str(tmp_path / "run"),
                *QUIET,
            ]
        )
        summaries[store] = json.loads((tmp_path / store / "metrics_summary.json").read_text())
        summaries[store].pop("seconds", None)
    assert summaries["true"] == summaries["false"] and summaries["true"]["cases"] >= 1


def test_a_stale_or_foreign_store_is_refused_in_one_line(
    btcv_copy: Layout, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = btcv_copy[0]
    store = _store(root, tmp_path)
    with pytest.raises(
        DatasetError,
        match=r"holds case '\d+' at 1\.5 mm per pixel, but the btcv cases are read at 2 mm .*--data\.store false",
    ):
        _btcv(root, tmp_path / "split.json", spacing=2.0).dataset("train")
    with pytest.raises(DatasetError, match=r"made for .*CT window -175\.\.250 HU.* read at .*CT window -100\.\.200"):
        _btcv(root, tmp_path / "split.json", window=(-100.0, 200.0)).dataset("train")
    image = root / "RawData" / "Training" / "img" / "img0001.nii.gz"
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))  # the file was replaced
    dm = _btcv(root, tmp_path / "split.json")
    with pytest.raises(DatasetError, match=r"1 case\(s\) whose source files changed since \(e\.g\. \['0001'\]\)"):
        next(iter(dm.val_dataloader() if "0001" in dm.split["val"] else dm.train_dataloader()))
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "validate",
                "--config",
                str(ROOT / "tests/conf/unet_btcv.yaml"),
                "--data.root",
                str(root),
                "--data.split_file",
                str(tmp_path / "split.json"),
                "--data.store",
                str(tmp_path / "elsewhere"),
                *QUIET,
            ]
        )
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("delinea")]
    assert exit_info.value.code == 2 and len(errors) == 1 and "holds no slice store" in errors[0]
    # preprocessing again redoes only the changed case
    before = {p.parent.name: p.stat().st_mtime_ns for p in store.glob("cases/*/case.json")}
    summary = preprocess(_btcv(root, tmp_path / "split.json"), echo=lambda line: None)
    after = {p.parent.name: p.stat().st_mtime_ns for p in store.glob("cases/*/case.json")}
    assert summary["written"] == 1 and [c for c in before if before[c] != after[c]] == ["0001"]
    with pytest.raises(DatasetError, match=r"holds a store made for ct 1\.5 mm"):
        preprocess(_btcv(root, tmp_path / "split.json", spacing=2.0), echo=lambda line: None)


def test_preprocessing_resumes_after_a_kill(btcv_copy: Layout, tmp_path: Path) -> None:
    root = btcv_copy[0]
    store = _store(root, tmp_path)
    reference = {p.parent.name: np.load(p) for p in store.glob("cases/*/image.npy")}
    # a kill while case 0003 was written: its arrays half there, no marker
    (store / "cases" / "0003" / "case.json").unlink()
    (store / "cases" / "0003" / "image.npy").write_bytes(b"\x93NUMPY truncated")
    (store / "cases" / "0002" / "label.npy.tmp").write_bytes(b"")
    kept = {p.parent.name: p.stat().st_mtime_ns for p in store.glob("cases/*/case.json")}
    dm = _btcv(root, tmp_path / "split.json")
    split = next(s for s in ("train", "val", "test") if "0003" in dm._split_ids(s))
    with pytest.raises(DatasetError, match=r"1 case\(s\) missing \(e\.g\. \['0003'\]\)"):
        dm.dataset(split)
    summary = preprocess(_btcv(root, tmp_path / "split.json"), processes=2, echo=lambda line: None)
    assert summary["written"] == 1 and summary["kept"] == 4
    assert {
        p.parent.name: p.stat().st_mtime_ns for p in store.glob("cases/*/case.json") if p.parent.name != "0003"
    } == kept
    for case, image in reference.items():
        assert np.array_equal(np.load(store / "cases" / case / "image.npy"), image)


@pytest.mark.slow
def test_preprocessing_killed_with_sigkill_resumes(tmp_path: Path) -> None:
    root = tmp_path / "btcv"
    write_btcv(root, n=8)
    command = [
        sys.executable,
        "-m",
        "delinea",
        "preprocess",
        "--data",
        "btcv",
        "--data.root",
        str(root),
        "--data.split_file",
        str(tmp_path / "split.json"),
    ]
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    for line in process.stdout:
        if line.startswith("[2/"):
            process.send_signal(signal.SIGKILL)
            break
    process.wait()
    done = sorted(p.parent.name for p in (tmp_path / "split.store").glob("cases/*/case.json"))
    assert 2 <= len(done) < 8
    resumed = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    assert f"{len(done)} already there, {8 - len(done)} to write" in resumed.stdout
    assert len(list((tmp_path / "split.store").glob("cases/*/case.json"))) == 8


def test_fit_reads_the_store_found_beside_the_split(
    btcv: Layout, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = _store(btcv[0], tmp_path, resolution=32, augment=False)
    fit = ["fit", "--config", str(ROOT / "tests/conf/unet_btcv.yaml"), "--data.root", str(btcv[0]),
           "--data.split_file", str(tmp_path / "split.json"), "--trainer.default_root_dir", str(tmp_path / "run"),
           "--trainer.max_steps", "1", *QUIET]  # fmt: skip
    main(fit)
    assert next((tmp_path / "run").rglob("*.ckpt"))
    for image in store.glob("cases/*/image.npy"):  # the slices come from there: damaged, fit stops on them
        image.write_bytes(b"not an array")
    with pytest.raises(SystemExit) as exit_info:
        main(fit)
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("delinea")]
    assert exit_info.value.code == 2 and "cannot read case" in errors[-1] and str(store) in errors[-1]
    main([*fit, "--data.store", "false"])  # the source files still serve


@pytest.mark.parametrize("micro", [None, {32: 4, 48: 2}])
@pytest.mark.parametrize(("workers", "ranks"), [(1, 1), (3, 1), (2, 2), (4, 2)])
def test_each_worker_reads_its_own_cases_in_every_configuration(micro: dict | None, workers: int, ranks: int) -> None:
    case_of = np.repeat(np.arange(40), 30)  # 40 cases of 30 slices
    reads = 0
    for rank in range(ranks):
        sampler = SliceBatchSampler(
            batch_size=4,
            case_of=case_of,
            resolutions=[32, 48],
            shuffle=True,
            seed=1,
            block_cases=4,
            lanes=workers,
            num_replicas=ranks,
            rank=rank,
            micro_batch_sizes=micro,
            accumulate=3 if micro else 1,
        )
        reads += sum(worker_reads(list(sampler), case_of, workers, cache_cases=4).values())
    # every case once, plus the cases cut at the ends of the workers' runs (and wrapped to whole steps)
    assert reads <= 40 + workers * ranks + (3 if micro else 0), reads
    for rank in range(ranks):  # evaluation: each worker its own run of cases, a case cut between two runs
        sampler = SliceBatchSampler(batch_size=4, case_of=case_of, lanes=workers, num_replicas=ranks, rank=rank)
        evaluated = len(sampler._eval_cases()[rank])
        assert (
            evaluated
            <= sum(worker_reads(list(sampler), case_of, workers, cache_cases=1).values())
            <= evaluated + workers - 1
        )


def test_worker_reads_counts_what_the_dataset_reads(folder: Layout, tmp_path: Path) -> None:
    dm = FolderDataModule(
        root=str(folder[0]), resolution=32, batch_size=4, cache_cases=2, split_file=str(tmp_path / "s.json")
    )
    loader = dm.train_dataloader()
    batches = list(loader.batch_sampler)  # type: ignore[arg-type]
    dataset = dm.dataset("train")
    for batch in batches:
        for request in batch:
            dataset[request]
    assert dict(dataset.reads) == dict(worker_reads(batches, dataset.case_of, 1, cache_cases=2))


def test_label_ids_already_unified_are_not_mapped() -> None:
    raw = np.array([[0, 3], [8, 1]], dtype=np.uint8)
    identity = LabelSpec({i: i for i in range(9)}, known=frozenset(range(9)))
    assert identity.map(raw, "x") is raw  # no pass over the volume
    assert np.array_equal(LabelSpec({3: 5, 8: 1, 1: 2}, known=frozenset(range(9))).map(raw, "x"), [[0, 5], [1, 2]])
    with pytest.raises(DatasetError, match=r"label ids \[9\] are not in this dataset's table"):
        identity.map(np.array([9], dtype=np.uint8), "x")


def test_store_copied_elsewhere_keeps_serving(btcv_copy: Layout, tmp_path: Path) -> None:
    store = _store(btcv_copy[0], tmp_path)
    moved = shutil.copytree(store, tmp_path / "shared" / "btcv.store")
    dm = _btcv(btcv_copy[0], tmp_path / "split.json", store=str(moved))
    assert dm.dataset("train").store is not None and dm.dataset("train").store.path == moved
