"""``make demo``: the MedDelinea protocol end to end on the bundled real CT and MR, on a CPU.

    python -m delinea.demo            # the full demo (about 15 minutes on 2 cores)
    python -m delinea.demo --smoke    # a few steps per stage, tiny shapes (the test suite runs this)

Stages, each through the same ``delinea`` command a user types:
1. prepare: cut the sample into whole-slab cases (CT training slabs, the held-out CT slab z=86..95, the MR,
   and the MR's few-shot train/test halves), chosen before any training;
2. backbones: the shipped pretrained VAE and base DiT (``delinea/weights/demo``), frozen, and the VAE's codec
   ceiling (Dice of decoding the encoded held-out masks);
3. MedDelinea control training on the CT;
4. tests: CT held-out, the same with the image latent zeroed, MR zero-shot;
5. MR few-shot fine-tuning from the CT model, tested on the other MR half;
6. the MONAI UNet baseline with the same slices, the same wall-clock budget and the same tests.
Writes ``demo/summary.json``, the tables, predicted label maps, overlays, TensorBoard logs and checkpoints.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from delinea.main import main as delinea
from delinea.models import load_vae
from delinea.tasks.backbones import CT_HELD_OUT, codec_ceiling, held_out_ct

SAMPLE = Path(__file__).parent / "sample"
WEIGHTS = Path(__file__).parent / "weights" / "demo"
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "demo"
CT_ORGANS = (61, 111)  # canonical z of the CT slices holding organs (below them: pelvis, no target organ)
MR_FEWSHOT_TRAIN = (10, 19)  # the upper MR half trains the few-shot model, the lower half (0..9) tests it
MR_FEWSHOT_TEST = (0, 9)


def cut_slab(case: str, z: tuple[int, int], folder: Path, name: str) -> None:
    """Write canonical slices ``z[0]..z[1]`` of a sample case as a case of its own (affine shifted)."""
    for kind in ("images", "labels"):
        image = nib.as_closest_canonical(nib.load(SAMPLE / kind / f"{case}.nii.gz"))
        slab = image.slicer[:, :, z[0] : z[1] + 1]
        (folder / kind).mkdir(parents=True, exist_ok=True)
        nib.save(slab, folder / kind / f"{name}.nii.gz")


def prepare(data: Path) -> dict[str, Path]:
    """The demo's datasets, one ``FolderDataModule`` root each."""
    folders = {name: data / name for name in ("ct_train", "ct_heldout", "mr_all", "mr_fewshot_train",
                                              "mr_fewshot_test")}
    shutil.rmtree(data, ignore_errors=True)
    cut_slab("ct", (CT_ORGANS[0], CT_HELD_OUT[0] - 1), folders["ct_train"], "ct_lower")
    cut_slab("ct", (CT_HELD_OUT[1] + 1, CT_ORGANS[1]), folders["ct_train"], "ct_upper")
    cut_slab("ct", CT_HELD_OUT, folders["ct_heldout"], "ct_slab")
    depth = nib.load(SAMPLE / "images" / "mr.nii.gz").shape[2]
    cut_slab("mr", (0, depth - 1), folders["mr_all"], "mr")
    cut_slab("mr", MR_FEWSHOT_TRAIN, folders["mr_fewshot_train"], "mr_upper")
    cut_slab("mr", MR_FEWSHOT_TEST, folders["mr_fewshot_test"], "mr_lower")
    return folders


class Demo:
    """Runs the stages, times them and collects the results into ``summary.json``."""

    def __init__(self, out: Path, smoke: bool) -> None:
        self.out = out
        self.smoke = smoke
        self.summary: dict[str, Any] = {"stages": {}, "tests": {}, "smoke": smoke}

    def stage(self, name: str, started: float) -> None:
        seconds = time.perf_counter() - started
        self.summary["stages"][name] = {"seconds": round(seconds, 1)}
        print(f"[demo] {name}: {seconds:.0f} s", flush=True)

    def common(self, root: Path, modality: str, run: str) -> list[str]:
        return ["--data", "folder", "--data.root", str(root), "--data.modality", modality, "--data.split", "all",
                "--data.split_file", str(self.out / "splits" / f"{root.name}.json"),
                "--trainer.default_root_dir", str(self.out / "runs" / run)]

    def overrides(self, model: str) -> list[str]:
        """Tiny, fast settings for the smoke run; none for the real demo."""
        if not self.smoke:
            return []
        # 12 mm pixels: the demo's 3 mm at 128 px scaled to 32 px, so a slice is one window as in the real demo
        trainer = ["--trainer.max_steps", "2", "--trainer.max_time", "null", "--trainer.limit_val_batches", "1",
                   "--data.spacing", "12"]
        if model.startswith("unet"):
            return [*trainer, "--model.channels", "[4, 8, 16]", "--model.num_res_units", "1"]
        return [*trainer, "--model.dit", "DiT-tiny/2", "--model.vae", "tiny", "--model.image_size", "32",
                "--model.control_blocks", "2", "--model.sampling_steps", "2", "--data.resolution", "32"]

    def fit(self, model: str, root: Path, modality: str, run: str, extra: list[str]) -> Path:
        config = CONFIGS / f"{model}.yaml"
        backbones = [] if model.startswith("unet") else ["--model.latent_cache", str(self.out / "latent_cache")]
        if not self.smoke and not model.startswith("unet"):  # absolute paths: any working directory
            backbones += ["--model.dit", str(WEIGHTS / "dit"), "--model.vae", str(WEIGHTS / "vae")]
        delinea(["fit", "--config", str(config), *self.common(root, modality, run), *backbones, *extra,
                 *self.overrides(model)])
        checkpoints = sorted((self.out / "runs" / run).rglob("last.ckpt")) or sorted(
            (self.out / "runs" / run).rglob("*.ckpt"))
        return checkpoints[-1]

    def test(self, name: str, model: str, checkpoint: Path, root: Path, modality: str, extra: list[str] = ()) -> None:
        folder = self.out / "tests" / name
        smoke = ["--data.resolution", "32" if self.smoke else "128"]  # the resolution the models trained at
        delinea(["test", "--ckpt", str(checkpoint), *self.common(root, modality, f"test_{name}"), *extra, *smoke,
                 "--output", str(folder), "--overwrite", "true"])
        summary = json.loads((folder / "metrics_summary.json").read_text())
        self.summary["tests"][name] = {
            "model": "unet" if model == "unet" else "meddelinea",
            "organs": {organ: {k: summary["organs"][organ].get(k) for k in ("dice", "hd95", "assd")}
                       for organ in summary["organs"]},
            "mDSC": summary["mDSC"], "mHD95": summary["mHD95"], "mASSD": summary["mASSD"],
            "table": str(folder / "metrics_table.md"),
        }
        print(f"[demo]   {name}: mDSC {summary['mDSC']:.3f}", flush=True)

    def predict(self, name: str, checkpoint: Path, path: Path, modality: str) -> None:
        smoke = ["--data.resolution", "32" if self.smoke else "128"]
        delinea(["predict", "--ckpt", str(checkpoint), "--data", "scan", "--data.path", str(path),
                 "--data.modality", modality, *smoke, "--output", str(self.out / "predictions" / name),
                 "--overwrite", "true", "--save_uncertainty", "true",
                 "--trainer.default_root_dir", str(self.out / "runs" / f"predict_{name}")])

    def run(self) -> dict[str, Any]:
        started = time.perf_counter()
        data = prepare(self.out / "data")
        self.stage("prepare", started)

        started = time.perf_counter()
        if not self.smoke:  # measured now, on the held-out CT slab the backbones never saw
            _, masks = held_out_ct(SAMPLE, resolution=128)
            self.summary["codec_ceiling"] = codec_ceiling(load_vae(WEIGHTS / "vae"), masks)
        self.stage("backbones", started)

        started = time.perf_counter()
        meddelinea = self.fit("meddelinea", data["ct_train"], "ct", "meddelinea_ct", [])
        self.stage("meddelinea_ct_training", started)
        budget = self.summary["stages"]["meddelinea_ct_training"]["seconds"]

        started = time.perf_counter()
        self.test("ct_heldout", "meddelinea", meddelinea, data["ct_heldout"], "ct")
        self.test("ct_heldout_noimage", "meddelinea", meddelinea, data["ct_heldout"], "ct",
                  ["--model.zero_image", "true"])
        self.test("mr_zeroshot", "meddelinea", meddelinea, data["mr_all"], "mr")
        self.predict("meddelinea_mr", meddelinea, SAMPLE / "images" / "mr.nii.gz", "mr")
        self.stage("meddelinea_tests", started)

        started = time.perf_counter()
        fewshot = self.fit("meddelinea_fewshot", data["mr_fewshot_train"], "mr", "meddelinea_mr_fewshot",
                           ["--model.init_from", str(meddelinea)])
        self.test("mr_fewshot", "meddelinea", fewshot, data["mr_fewshot_test"], "mr")
        self.stage("meddelinea_mr_fewshot", started)
        shutil.copy(fewshot, self.out / "meddelinea_mr_fewshot.ckpt")
        shutil.copy(meddelinea, self.out / "meddelinea_ct.ckpt")

        started = time.perf_counter()
        time_limit = [] if self.smoke else ["--trainer.max_time", f"00:00:{int(budget) // 60:02d}:{int(budget) % 60:02d}"]
        unet = self.fit("unet", data["ct_train"], "ct", "unet_ct", time_limit)
        self.test("unet_ct_heldout", "unet", unet, data["ct_heldout"], "ct")
        self.test("unet_mr_zeroshot", "unet", unet, data["mr_all"], "mr")
        unet_fewshot = self.fit("unet_fewshot", data["mr_fewshot_train"], "mr", "unet_mr_fewshot",
                                ["--model.init_from", str(unet)])
        self.test("unet_mr_fewshot", "unet", unet_fewshot, data["mr_fewshot_test"], "mr")
        self.stage("unet_baseline", started)

        self.summary["checkpoint"] = str(self.out / "meddelinea_mr_fewshot.ckpt")
        (self.out / "summary.json").write_text(json.dumps(self.summary, indent=2) + "\n")
        return self.summary


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m delinea.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("demo"), help="output folder (default: demo/)")
    parser.add_argument("--smoke", action="store_true", help="a few steps per stage on tiny shapes")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    # The stages call the delinea command in-process with their own arguments; that is intended here.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    warnings.filterwarnings("ignore", message=r"Found .* module\(s\) in eval mode")
    summary = Demo(args.out, args.smoke).run()
    print(json.dumps({name: round(test["mDSC"], 3) for name, test in summary["tests"].items()}, indent=2))
    return summary


if __name__ == "__main__":
    main()
