"""The demo's downstream protocol for one pair of pretrained models (:class:`Demo`): the stages of ``make demo``, each
through the same ``delinea`` command (or, for predict, the :class:`~delinea.Segmenter`) a user would use.

1. prepare: cut the sample into whole-slab cases fixed before any training (the held-out CT slab z 86..95, the MR,
   and the MR's few-shot halves);
2. backbones: the shipped frozen VAE and base DiT and the VAE's codec ceiling on the held-out slab;
3. zero-shot: the pretrained MedDelinea (``weights/meddelinea``) on the held-out CT slab, the same with the image
   latent zeroed (does it read the image?), and on the MR; the pretrained UNet (``weights/unet``) likewise;
4. few-shot: both fine-tuned on the MR's upper half for the same wall-clock budget, tested on the lower half;
5. predict: the few-shot MedDelinea segments the whole MR, with its uncertainty map.

Writes ``<out>/summary.json``, the test tables, the predicted label maps, overlays, logs and the few-shot checkpoints.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from delinea.demo.protocol import CONFIGS, SAMPLE, WEIGHTS, codec_ceiling, held_out_ct, prepare
from delinea.labels import NUM_CLASSES
from delinea.main import main as delinea
from delinea.models import MaskVAE, load_vae
from delinea.segmenter import Segmenter

#: Wall-clock budget of each few-shot fine-tuning (both models get the same).
FEWSHOT_SECONDS = 90


class Demo:
    """Runs the stages for one pair of pretrained models, times them and collects ``summary.json``.

    Args:
        out: output folder.
        smoke: 2-step fine-tuning instead of the wall-clock budget.
        models: the pretrained model of each kind (a model folder or a checkpoint): ``meddelinea``, ``unet``.
    """

    def __init__(self, out: Path, smoke: bool, models: dict[str, Path]) -> None:
        self.out = out
        self.smoke = smoke
        self.models = models
        self.summary: dict[str, Any] = {"stages": {}, "tests": {}, "smoke": smoke,
                                        "pretrained": {k: str(v) for k, v in models.items()}}  # fmt: skip

    def stage(self, name: str, started: float) -> None:
        seconds = time.perf_counter() - started
        self.summary["stages"][name] = {"seconds": round(seconds, 1)}
        print(f"[demo] {name}: {seconds:.0f} s", flush=True)

    def common(self, root: Path, modality: str, run: str) -> list[str]:
        split = str(self.out / "splits" / f"{root.name}.json")
        return ["--data", "folder", "--data.root", str(root), "--data.modality", modality, "--data.split", "all",
                "--data.split_file", split, "--trainer.default_root_dir", str(self.out / "runs" / run)]  # fmt: skip

    def fewshot(self, kind: str, root: Path) -> Path:
        """Fine-tune a pretrained model on ``root`` (``init_from``); the run's last checkpoint."""
        run = f"{kind}_mr_fewshot"
        budget = ["--trainer.max_steps", "2", "--trainer.max_time", "null"] if self.smoke else \
            ["--trainer.max_time", f"00:00:{FEWSHOT_SECONDS // 60:02d}:{FEWSHOT_SECONDS % 60:02d}"]  # fmt: skip
        backbones = (
            ["--model.dit", str(WEIGHTS / "dit"), "--model.vae", str(WEIGHTS / "vae")] if kind == "meddelinea" else []
        )
        delinea(["fit", "--config", str(CONFIGS / f"{kind}_fewshot.yaml"), *self.common(root, "mr", run),
                 "--model.init_from", str(self.models[kind]), *backbones, *budget])  # fmt: skip
        return sorted((self.out / "runs" / run).rglob("last.ckpt"))[-1]

    def test(self, name: str, kind: str, model: Path, root: Path, modality: str, extra: Sequence[str] = ()) -> None:
        folder = self.out / "tests" / name
        delinea(["test", "--ckpt", str(model), *self.common(root, modality, f"test_{name}"), *extra,
                 "--output", str(folder), "--overwrite", "true"])  # fmt: skip
        summary = json.loads((folder / "metrics_summary.json").read_text())
        self.summary["tests"][name] = {
            "model": kind,
            "organs": {organ: {k: summary["organs"][organ].get(k) for k in ("dice", "hd95", "assd")}
                       for organ in summary["organs"]},
            "mDSC": summary["mDSC"], "mHD95": summary["mHD95"], "mASSD": summary["mASSD"],
            "table": str(folder / "metrics_table.md"),
        }  # fmt: skip
        print(f"[demo]   {name}: mDSC {summary['mDSC']:.3f}", flush=True)

    def predict(self, name: str, model: Path, path: Path, modality: Literal["ct", "mr"]) -> None:
        """Segment a scan from Python, writing what ``delinea predict`` writes."""
        segmenter = Segmenter.from_pretrained(model)
        segmenter.predict_files(path, self.out / "predictions" / name, modality, overwrite=True, save_uncertainty=True)

    def run(self) -> dict[str, Any]:
        started = time.perf_counter()
        data = prepare(self.out / "data")
        self.stage("prepare", started)

        started = time.perf_counter()
        _, masks = held_out_ct()  # the held-out CT slab, which no backbone or model trained on
        self.summary["codec_ceiling"] = codec_ceiling(MaskVAE(load_vae(WEIGHTS / "vae"), NUM_CLASSES), masks)
        self.stage("backbones", started)

        started = time.perf_counter()
        for kind, prefix in (("meddelinea", ""), ("unet", "unet_")):
            self.test(f"{prefix}ct_heldout", kind, self.models[kind], data["ct_heldout"], "ct")
            if kind == "meddelinea":
                self.test("ct_heldout_noimage", kind, self.models[kind], data["ct_heldout"], "ct",
                          ["--model.zero_image", "true"])  # fmt: skip
            self.test(f"{prefix}mr_zeroshot", kind, self.models[kind], data["mr_all"], "mr")
        self.stage("zero_shot_tests", started)

        for kind, prefix in (("meddelinea", ""), ("unet", "unet_")):
            started = time.perf_counter()
            fewshot = self.fewshot(kind, data["mr_fewshot_train"])
            self.test(f"{prefix}mr_fewshot", kind, fewshot, data["mr_fewshot_test"], "mr")
            self.stage(f"{kind}_mr_fewshot", started)
            if kind == "meddelinea":
                started = time.perf_counter()
                self.predict("meddelinea_mr", fewshot, SAMPLE / "images" / "mr.nii.gz", "mr")
                self.stage("predict", started)
                (self.out / "meddelinea_mr_fewshot.ckpt").write_bytes(fewshot.read_bytes())
                self.summary["checkpoint"] = str(self.out / "meddelinea_mr_fewshot.ckpt")
        record = WEIGHTS / "pretraining.json"
        if record.is_file():
            self.summary["pretraining"] = json.loads(record.read_text()).get("summary")
        (self.out / "summary.json").write_text(json.dumps(self.summary, indent=2) + "\n")
        return self.summary
