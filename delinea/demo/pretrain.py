"""Pretrain the demo's MedDelinea and UNet on the CT training slabs, as the paper pretrains on ATLAS-8k, and ship
the chosen ones as model folders (``delinea/demo/weights/meddelinea``, ``.../unet``).

    python -m delinea.demo.pretrain                         # select, then pretrain seeds 0 and 1 (1 h 40 on 2 cores)
    python -m delinea.demo.pretrain --seeds 0 1 --minutes 40 --select-minutes 10
    python -m delinea.demo.pretrain --reuse --downstream --ship   # test every seed downstream, ship the chosen one

Protocol, fixed before any training:

* validation slices are two 5-slice slabs inside the CT training slabs (:data:`CT_VALIDATION`), removed from
  training; the held-out slab and the MR are never read here;
* ``--select-minutes`` > 0 first trains each model (seed 0) for that long with each :data:`SELECTION`
  candidate, side by side: training windows placed anywhere around a slice shorter than the window, or centred on
  it as inference centres it; each model keeps the candidate with its better best validation mDSC, so that each
  is compared at its own best setting. Earlier selections of the same kind, on MedDelinea, chose no augmentation
  for both models (best validation mDSC 0.067 without, 0.053 with; 10 minutes each) and ``timestep_bias`` 2
  (0.093 against 0.077 for the paper's uniform draw; 15 minutes each);
* every seed then trains MedDelinea and the UNet side by side, one CPU thread each, for the same wall-clock
  budget, logging the training loss and the validation Dice; each run keeps its best checkpoint by validation mDSC,
  and the seed with the best validation mDSC is shipped.

Writes ``<out>/record.json`` and, with ``--ship``, the model folders and ``delinea/demo/weights/pretraining.json``
(the record: protocol, configs, commands, seeds, curves, validation numbers, and with ``--downstream`` every seed's
demo test scores with their spread, which choose nothing).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from delinea.demo.downstream import Demo
from delinea.demo.protocol import CONFIGS, CT_TRAIN, CT_VALIDATION, WEIGHTS, cut_slab
from delinea.tasks import MedDelineaTask, SegmentationTask, UNetTask, load_task
from delinea.tasks.export import save_model_folder

MODELS: dict[str, type[SegmentationTask]] = {"meddelinea": MedDelineaTask, "unet": UNetTask}
#: The candidates of the selection run: data options given to both models' pretraining. Centred windows repeat,
#: so MedDelinea then also keeps its frozen VAE's latents in a cache (which changes speed, not results).
SELECTION: dict[str, list[str]] = {
    "select_random_windows": ["--data.augment", "false", "--data.centre_short", "false"],
    "select_centred_windows": ["--data.augment", "false", "--data.centre_short", "true"],
}


def prepare_pretraining(data: Path) -> tuple[Path, Path]:
    """The CT training slabs without the validation slabs, and the validation slabs, as one folder dataset with
    a split file naming them: ``(root, split file)``."""
    root = data / "ct_pretrain"
    train = []
    for low, high in CT_TRAIN:
        cuts = [v for v in CT_VALIDATION if low <= v[0] <= high]
        start = low
        for v in [*cuts, (high + 1, high + 1)]:
            if v[0] > start:
                train.append((start, v[0] - 1))
            start = v[1] + 1
    val = list(CT_VALIDATION)
    names = {}
    for z in [*train, *val]:
        name = f"ct_{z[0]:03d}_{z[1]:03d}"
        cut_slab("ct", z, root, name)
        names[z] = name
    split = {
        "train": [names[z] for z in train],
        "val": [names[z] for z in val],
        "test": [],
        "note": "demo pretraining: CT training slabs minus the validation slabs; never the held-out slab or MR",
    }
    split_file = data / "ct_pretrain_split.json"
    split_file.write_text(json.dumps(split, indent=1) + "\n")
    return root, split_file


def command(
    model: str, seed: int, minutes: float, root: Path, split_file: Path, out: Path, extra: list[str]
) -> list[str]:
    """The ``delinea fit`` command of one pretraining run."""
    backbones = []
    if model == "meddelinea":
        backbones = ["--model.dit", str(WEIGHTS / "dit"), "--model.vae", str(WEIGHTS / "vae")]
        if "--data.centre_short" in extra and extra[extra.index("--data.centre_short") + 1] == "true":
            backbones += ["--model.latent_cache", str(out / "latent_cache")]
    hours, rest = divmod(int(minutes * 60), 3600)
    return [
        sys.executable, "-m", "delinea", "fit", "--config", str(CONFIGS / f"pretrain_{model}.yaml"),
        "--data.root", str(root), "--data.split_file", str(split_file), "--data.seed", str(seed),
        "--seed_everything", str(seed), "--trainer.max_time", f"00:{hours:02d}:{rest // 60:02d}:{rest % 60:02d}",
        "--trainer.default_root_dir", str(out), "--trainer.logger.init_args.save_dir", str(out), *backbones, *extra,
    ]  # fmt: skip


def preprocess_once(root: Path, split_file: Path, logs: Path) -> dict[str, Any]:
    """``delinea preprocess`` of the pretraining slabs into the store beside the split file, which both models'
    runs read (their configs share the data options that the stored pixels depend on)."""
    logs.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "delinea", "preprocess", "--config", str(CONFIGS / "pretrain_meddelinea.yaml"),
           "--data.root", str(root), "--data.split_file", str(split_file)]  # fmt: skip
    started = time.perf_counter()
    with open(logs / "preprocess.log", "w") as log:
        if subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode != 0:
            raise RuntimeError(f"preprocessing failed; see {logs / 'preprocess.log'}")
    return {"command": " ".join(cmd), "seconds": round(time.perf_counter() - started, 1)}


def run_side_by_side(jobs: dict[str, list[str]], logs: Path) -> dict[str, float]:
    """Run commands at once, one CPU thread each; their wall seconds."""
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    started = time.perf_counter()
    running = {name: subprocess.Popen(cmd, stdout=open(logs / f"{name}.log", "w"), stderr=subprocess.STDOUT, env=env)
               for name, cmd in jobs.items()}  # fmt: skip
    seconds = {}
    for name, process in running.items():
        if process.wait() != 0:
            raise RuntimeError(f"pretraining run {name} failed; see {logs / f'{name}.log'}")
        seconds[name] = round(time.perf_counter() - started, 1)
    return seconds


def curves(run: Path) -> dict[str, Any]:
    """Training loss and validation Dice against steps from a run's CSV log, and its best checkpoint."""
    rows = list(csv.DictReader(open(next(run.rglob("metrics.csv")))))
    loss = [(int(r["step"]), float(r["train/loss"])) for r in rows if r.get("train/loss")]
    dice = [(int(r["step"]), float(r["val/mDSC"])) for r in rows if r.get("val/mDSC")]
    best = max(dice, key=lambda d: d[1]) if dice else (None, None)
    checkpoint = next(iter(sorted(run.rglob("best-*.ckpt"))), None)
    return {
        "steps": max((s for s, _ in loss), default=0),
        "best_val_mDSC": best[1],
        "best_step": best[0],
        "train_loss": loss,
        "val_mDSC": dice,
        "checkpoint": str(checkpoint) if checkpoint else None,
    }


def downstream(record: dict[str, Any], out: Path) -> dict[str, Any]:
    """The demo's downstream protocol (:class:`~delinea.demo.downstream.Demo`: zero-shot tests, few-shot
    fine-tuning) for every seed's pretrained pair, and each test's mean and standard deviation over the seeds, of the
    mDSC and of the liver Dice. These are test numbers: nothing is chosen by them."""
    tests = {}
    for seed in record["seeds"]:
        models = {kind: Path(record["runs"][f"{kind}_seed{seed}"]["checkpoint"]) for kind in MODELS}
        tests[str(seed)] = Demo(out / f"downstream_seed{seed}", smoke=False, models=models).run()["tests"]
    mdsc = {seed: {name: test["mDSC"] for name, test in seed_tests.items()} for seed, seed_tests in tests.items()}
    liver = {seed: {name: test["organs"]["liver"]["dice"] for name, test in seed_tests.items()}
             for seed, seed_tests in tests.items()}  # fmt: skip
    return {"per_seed": mdsc, "mDSC": spread(mdsc), "liver_per_seed": liver, "liver": spread(liver)}


def spread(per_seed: Mapping[str, Mapping[str, float | None]]) -> dict[str, dict[str, float]]:
    """Each test's mean, sample standard deviation (0 for one seed), minimum, maximum and count over the seeds
    (None, an organ absent from both prediction and truth, is left out)."""
    out = {}
    for name in sorted({name for scores in per_seed.values() for name in scores}):
        values = np.array([scores[name] for scores in per_seed.values() if scores.get(name) is not None], float)
        if not len(values):
            continue
        out[name] = {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
                     "min": float(values.min()), "max": float(values.max()), "n": len(values)}  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m delinea.demo.pretrain", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/pretrain"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--minutes", type=float, default=40.0, help="wall-clock budget of each pretraining run")
    parser.add_argument("--select-minutes", type=float, default=10.0, help="0 skips the window selection")
    parser.add_argument("--downstream", action="store_true", help="run the demo's tests for every seed (spread)")
    parser.add_argument("--ship", action="store_true", help="write the chosen models into delinea/demo/weights")
    parser.add_argument("--reuse", action="store_true", help="take the runs of an earlier call's <out>/record.json")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.reuse:
        record = json.loads((args.out / "record.json").read_text())
    else:
        record = pretrain(args)
    for model in MODELS:
        runs = {n: r for n, r in record["runs"].items() if n.startswith(model)}
        shipped = max(runs, key=lambda n: runs[n]["best_val_mDSC"] or 0.0)  # chosen by validation only
        record[f"shipped_{model}"] = shipped
    if args.downstream:
        record["downstream"] = downstream(record, args.out)
    (args.out / "record.json").write_text(json.dumps(record, indent=1) + "\n")
    if args.ship:
        for model in MODELS:
            checkpoint = record["runs"][record[f"shipped_{model}"]]["checkpoint"]
            save_model_folder(load_task(checkpoint), WEIGHTS / model, overwrite=True)
        (WEIGHTS / "pretraining.json").write_text(json.dumps(shipped_record(record), indent=1) + "\n")
    return record


def shipped_record(record: dict[str, Any]) -> dict[str, Any]:
    """What ships beside the model folders: the protocol, the commands, every run's validation curve and best
    score, the downstream spread, and which runs were shipped (paths reduced to their run names)."""
    runs = {name: {k: v for k, v in run.items() if k != "checkpoint"} for name, run in record["runs"].items()}
    summary = {
        "seeds": record["seeds"],
        "minutes": record["minutes"],
        "shipped": {model: record[f"shipped_{model}"] for model in MODELS},
        "steps": {name: run["steps"] for name, run in runs.items()},
        "best_val_mDSC": {name: run["best_val_mDSC"] for name, run in runs.items()},
        "downstream_mDSC": record.get("downstream", {}).get("mDSC"),
        "downstream_liver": record.get("downstream", {}).get("liver"),
    }
    return {"summary": summary, **{k: v for k, v in record.items() if k != "runs"}, "runs": runs}


def pretrain(args: argparse.Namespace) -> dict[str, Any]:
    """Select each model's window placement (optional), then pretrain both models for every seed, side by side."""
    root, split_file = prepare_pretraining(args.out / "data")
    record: dict[str, Any] = {
        "protocol": (__doc__ or "").split("\n\n", 2)[2].strip(),
        "split": json.loads(split_file.read_text()),
        "minutes": args.minutes,
        "seeds": args.seeds,
        "runs": {},
    }
    record["preprocess"] = preprocess_once(root, split_file, args.out / "logs")
    chosen: dict[str, list[str]] = {model: [] for model in MODELS}
    if args.select_minutes > 0:
        record["selection"] = {}
        for model in MODELS:  # each model's candidates side by side; each model keeps its own best
            jobs = {f"{model}_{name}": command(model, 0, args.select_minutes, root, split_file,
                                               args.out / f"{model}_{name}", options)
                    for name, options in SELECTION.items()}  # fmt: skip
            run_side_by_side(jobs, args.out / "logs")
            selection = {name: curves(args.out / name) for name in jobs}
            best = max(selection, key=lambda n: selection[n]["best_val_mDSC"] or 0.0)
            chosen[model] = SELECTION[best.removeprefix(f"{model}_")]
            record["selection"][model] = {
                "commands": {n: " ".join(c) for n, c in jobs.items()},
                "chosen": best,
                **{n: {k: v for k, v in c.items() if k != "checkpoint"} for n, c in selection.items()},
            }
    else:
        record["selection"] = "skipped: the data options of the configs as they stand"
    for seed in args.seeds:
        jobs = {}
        for model in MODELS:
            name = f"{model}_seed{seed}"
            jobs[name] = command(model, seed, args.minutes, root, split_file, args.out / name, chosen[model])
        seconds = run_side_by_side(jobs, args.out / "logs")
        for name, cmd in jobs.items():
            record["runs"][name] = {"command": " ".join(cmd), "wall_seconds": seconds[name], **curves(args.out / name)}
        (args.out / "record.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


if __name__ == "__main__":
    main()
