"""``delinea.Segmenter``: a trained model, ready to segment scans (nnU-Net's predictor, for delinea's models).

    from delinea import Segmenter

    segmenter = Segmenter.from_pretrained("delinea/demo/weights/meddelinea")  # a model folder or a checkpoint
    segmenter.predict_files(["scan.nii.gz", "dicom_series/"], "predictions/")  # what `delinea predict` writes
    labels = segmenter.predict(volume, affine, "ct")                           # an array on its own grid

The Segmenter owns inference: the plan the model segments at (its own, with any explicit windows), the sliding
windows over each resampled slice and their Gaussian blending, the probabilities resampled back to the scan's grid
and stacked into volumes, and the files a prediction is written as. ``delinea predict``, ``delinea test`` and
validation with ``val_metrics`` run through it (a task's evaluation steps call the Segmenter attached to it), and so
do the writer callbacks, the quickstart notebook and the demo.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple, overload

import numpy as np
import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference
from torch.utils.data import DataLoader

from delinea.datamodules.batches import PredictBatch, SliceData, give_plan
from delinea.datamodules.dataset import SliceDataset
from delinea.datamodules.samplers import SliceBatchSampler
from delinea.datamodules.scan import ScanDataModule
from delinea.datamodules.utils import CaseFiles, Intensity, loaded_case
from delinea.errors import OptionError, OutputError
from delinea.geometry import (
    IMAGE_FILL,
    Plan,
    PlanRequest,
    Region,
    SlidingLayout,
    check_window_count,
    covering_window,
    resolve_plan,
)
from delinea.io import PREDICTION_DESCRIPTION, Geometry, Volume, save_nifti
from delinea.labels import NUM_CLASSES, ORGANS
from delinea.outputs import check_writable, remove_stale_temporaries, write_atomic
from delinea.tasks import SegmentationTask, load_task
from delinea.volumes import PredictedCase, VolumeAssembler

#: What :meth:`Segmenter.predict` segments: a volume as an array or a tensor.
ArrayLike = np.ndarray | torch.Tensor
#: A scan's modality: ``auto`` is CT if the scan holds values below -500.
Modality = Literal["ct", "mr", "auto"]
#: The case id an array given to :meth:`Segmenter.predict` goes by.
ARRAY_CASE = "array"


class Prediction(NamedTuple):
    """A segmented volume on the input's grid (its shape and voxel order).

    Attributes:
        labels: unified organ ids (:data:`delinea.labels.ORGANS`), uint8 (X, Y, Z).
        probabilities: class probabilities, float32 (C, X, Y, Z).
        uncertainty: per-voxel uncertainty in [0, 1] (normalised entropy of the ensemble's mean), float32.
    """

    labels: np.ndarray
    probabilities: np.ndarray
    uncertainty: np.ndarray


class Segmenter:
    """A trained segmentation task and everything that turns it into label volumes on each scan's own grid.

    Build it once (:meth:`from_pretrained`, or around a task in memory) and segment arrays (:meth:`predict`) or
    files (:meth:`predict_files`). Constructing it attaches it to ``task`` (``task.segmenter``): the task's
    validation, test and predict steps then segment whole cases through it.

    Args:
        task: the trained task (its plan and weights loaded).
        batch_size: slices per batch (one case per batch), as the datamodules serve them.
        window_batch_size: windows per forward pass when sliding over slices.
        plan: the plan to segment at (the model's own, perhaps with other windows); None: the task's.
    """

    def __init__(
        self, task: SegmentationTask, batch_size: int = 8, window_batch_size: int = 8, plan: Plan | None = None
    ) -> None:
        if batch_size < 1 or window_batch_size < 1:
            raise OptionError(f"batch_size ({batch_size}) and window_batch_size ({window_batch_size}) must be positive")
        self.task = task
        self.batch_size = batch_size
        self.window_batch_size = window_batch_size
        self._plan = plan
        self._assembler: VolumeAssembler | None = None
        task.segmenter = self

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu", **overrides: Any) -> Segmenter:
        """A Segmenter from a model folder or a checkpoint, read once and weights-only, on ``device``.

        Args:
            path: a model folder (``config.json`` + safetensors) or a delinea checkpoint.
            device: where the model runs (``cpu``, ``cuda``, ``cuda:1``...).
            **overrides: hyperparameters to replace, e.g. ``sampling_steps=10`` or ``ensemble=3`` (the training-only
                ``init_from`` and ``latent_cache`` are dropped).
        """
        return cls(load_task(path, map_location=device, inference=True, **overrides))

    # -- the plan ------------------------------------------------------------------------------------------

    @property
    def plan(self) -> Plan | None:
        """The plan scans are segmented at: the one given by :meth:`prepare` (or at construction), else the task's."""
        return self._plan if self._plan is not None else self.task.plan

    @property
    def window(self) -> int | None:
        """The sliding window in pixels (the plan's inference window); None: one window covering each slice."""
        return self.plan.inference_window if self.plan is not None else None

    def prepare(self, data: SliceData, stage: str = "predict") -> Plan:
        """Resolve the plan ``data`` serves when this model evaluates it (the model's own; explicit windows replace
        its windows, an explicit spacing that disagrees is an error: :func:`~delinea.geometry.resolve_plan`) and give
        it to ``data``."""
        self._plan = give_plan(data, self.task.plan, stage)
        return self._plan

    # -- whole slices --------------------------------------------------------------------------------------

    @torch.no_grad()
    def segment_slices(
        self, image: torch.Tensor, region: Region | torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Probabilities (N, C, H, W) and uncertainty (N, H, W) of whole slices (N, 1, H, W) of any size.

        Windows of the plan's inference size (without a plan: one window covering the slice) with the task's
        ``window_overlap``, Gaussian-weighted blending of probabilities and uncertainty (MONAI's
        ``sliding_window_inference``). Given the slices' lattice ``region`` (what the datamodules serve), the windows
        sit at the same lattice places in every scan (:class:`~delinea.geometry.SlidingLayout`) and each window's
        randomness is seeded by its place there, so the same anatomy in another scan gets the same prediction.
        """
        height, width = image.shape[-2:]
        window = self.window or covering_window(height, width, self.task.size_multiple)
        overlap = float(self.task.hparams.get("window_overlap", 0.5))
        stride = max(1, int(window * (1 - overlap)))  # MONAI's window interval
        if region is not None and not isinstance(region, Region):
            region = Region.from_tensor(region)
        x0, y0 = (region.x0, region.y0) if region is not None else (None, None)
        layout = SlidingLayout.of(x0, y0, height, width, window, stride)
        padded = F.pad(image, layout.pad, value=IMAGE_FILL)
        check_window_count(math.prod(-(-max(0, n - window) // stride) + 1 for n in padded.shape[-2:]), image, window)

        def predictor(windows: torch.Tensor, places: list) -> torch.Tensor:
            seeds = [layout.seed(place[2].start, place[3].start) for place in places]
            probabilities, uncertainty = self.task.predict_probabilities(windows, seeds)
            return torch.cat([probabilities.float(), uncertainty.float()[:, None]], 1)

        out = sliding_window_inference(
            padded, (window, window), self.window_batch_size, predictor, overlap=overlap, mode="gaussian",
            sigma_scale=0.125, padding_mode="constant", cval=IMAGE_FILL, with_coord=True,
        )  # fmt: skip
        left, _, top, _ = layout.pad
        out = torch.as_tensor(out)[..., top : top + height, left : left + width]
        return out[:, :-1], out[:, -1]

    # -- whole cases ---------------------------------------------------------------------------------------

    def start(self, geometry_of: Callable[[str], Geometry], keep_probabilities: bool = False) -> None:
        """Begin a pass over cases whose grids ``geometry_of`` gives (a datamodule's ``case_geometry``): their
        slices are stacked on them."""
        if self.window is not None:
            self.task.check_window(self.window, "inference window (the plan's, or --data.resolution)")
        self._assembler = VolumeAssembler(geometry_of, keep_probabilities)

    def add(self, batch: PredictBatch) -> list[PredictedCase]:
        """Segment a batch of whole slices of one case (on the task's device) and stack them; the cases it
        completed."""
        if self._assembler is None:
            raise RuntimeError("Segmenter.add before Segmenter.start")
        region = batch["region"][0] if "region" in batch else None  # a batch is one case: one region
        probabilities, uncertainty = self.segment_slices(batch["image"].to(self.task.device), region)
        return self._assembler.add(batch, probabilities, uncertainty)

    def finish(self) -> None:
        """End the pass.

        Raises:
            RuntimeError: a case did not receive all its slices (the loader must give every rank whole cases).
        """
        missing = self._assembler.incomplete() if self._assembler is not None else []
        self._assembler = None
        if missing:
            raise RuntimeError(
                f"cases {missing[:5]} did not receive all their slices; the loader must give every rank whole cases"
            )

    def _run(
        self, geometry_of: Callable[[str], Geometry], loader: DataLoader, keep_probabilities: bool = False
    ) -> list[PredictedCase]:
        was_training = self.task.training
        self.task.eval()
        self.start(geometry_of, keep_probabilities)
        cases = [case for batch in loader for case in self.add(batch)]
        self.finish()
        self.task.train(was_training)
        return cases

    # -- arrays and files ----------------------------------------------------------------------------------

    @overload
    def predict(
        self, volume: ArrayLike, affine: np.ndarray, modality: Modality = ..., probabilities: Literal[False] = ...
    ) -> np.ndarray: ...
    @overload
    def predict(
        self, volume: ArrayLike, affine: np.ndarray, modality: Modality = ..., *, probabilities: Literal[True]
    ) -> Prediction: ...

    def predict(
        self, volume: ArrayLike, affine: np.ndarray, modality: Modality = "ct", probabilities: bool = False
    ) -> np.ndarray | Prediction:
        """Segment a volume in memory, exactly as :meth:`predict_files` segments the same data read from a file.

        Args:
            volume: the scan's values (CT in HU), (X, Y, Z) in the voxel order ``affine`` describes.
            affine: its 4x4 voxel-to-RAS+ world affine in mm (a NIfTI's ``affine``).
            modality: ``ct``, ``mr`` or ``auto`` (CT if the scan holds values below -500).
            probabilities: also return the class probabilities and the uncertainty.

        Returns:
            The label volume (uint8, the input's shape) or, with ``probabilities``, a :class:`Prediction`.
        """
        array = volume.detach().cpu().numpy() if torch.is_tensor(volume) else np.asarray(volume)
        if array.ndim != 3:
            raise OptionError(f"volume must be a 3D array (X, Y, Z), got shape {tuple(array.shape)}")
        geometry = Geometry.from_affine(np.asarray(affine, dtype=np.float64), array.shape, "the affine given")
        files = CaseFiles(ARRAY_CASE, Path(f"<{ARRAY_CASE}>"), modality=modality)
        intensity = Intensity()
        loaded = loaded_case(files, Volume(geometry.to_canonical(array), geometry, files.image), intensity, "replace")
        dataset = SliceDataset(
            name=ARRAY_CASE, root="", cases=[(files, geometry.canonical_shape[2])], spec=None,
            labelled=np.zeros((1, NUM_CLASSES), bool), intensity=intensity, loaded=[loaded],
        )  # fmt: skip
        plan = (
            self._plan
            if self._plan is not None
            else resolve_plan(self.task.plan, "predict", PlanRequest(ARRAY_CASE))[0]
        )
        dataset.plan = plan
        loader = DataLoader(dataset, batch_sampler=SliceBatchSampler(None, self.batch_size, case_of=dataset.case_of))
        (case,) = self._run(lambda _: geometry, loader, keep_probabilities=probabilities)
        self._warn_nonfinite(case, "the volume")
        labels = np.ascontiguousarray(geometry.to_original(case.labels))
        if not probabilities or case.probabilities is None:
            return labels
        probs = np.ascontiguousarray(np.moveaxis(geometry.to_original(np.moveaxis(case.probabilities, 0, -1)), -1, 0))
        uncertainty = np.ascontiguousarray(geometry.to_original(case.uncertainty.astype(np.float32)))
        return Prediction(labels, probs, uncertainty)

    def predict_files(
        self,
        inputs: str | Path | Sequence[str | Path],
        output_dir: str | Path,
        modality: Modality = "ct",
        overwrite: bool = False,
        save_uncertainty: bool = False,
        num_workers: int = 0,
    ) -> list[dict[str, Path]]:
        """Segment NIfTI files, folders of them and DICOM series folders, and write what ``delinea predict`` writes
        (:meth:`write`) into ``output_dir``. Every output is checked before the first scan is segmented.

        Returns:
            The files written for each case (``labels``, ``sidecar``, and ``uncertainty`` if asked).

        Raises:
            FileExistsError: an output exists and ``overwrite`` is False.
        """
        paths = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
        folder = Path(output_dir)
        sources = [ScanDataModule(str(p), modality, batch_size=self.batch_size, num_workers=num_workers) for p in paths]
        for data in sources:
            self.prepare(data, "predict")
        scans = {case: data.case_path(case) for data in sources for case in data.predict_cases()}
        check_outputs(folder, scans, overwrite, save_uncertainty)
        written = []
        for data in sources:
            for case in self._run(data.case_geometry, data.predict_dataloader()):
                written.append(self.write(case, folder, data.case_path(case.case_id), overwrite, save_uncertainty))
        return written

    def write(
        self, case: PredictedCase, folder: Path, source: Path, overwrite: bool = False, save_uncertainty: bool = False
    ) -> dict[str, Path]:
        """Write one case: ``<case>_seg.nii.gz`` (uint8) on the input's exact grid (shape, affine, voxel order), with
        ``save_uncertainty`` ``<case>_uncertainty.nii.gz``, then the ``<case>_seg.json`` sidecar (organ names and ids,
        voxel counts, spacing, model, plan, replaced voxels), last and atomically: its presence means the case is
        complete."""
        targets = targets_of(folder, case.case_id, save_uncertainty)
        geometry = case.geometry
        if not overwrite and (existing := [str(p) for p in targets.values() if p.exists()]):
            raise FileExistsError(f"{', '.join(existing)}: already there; pass overwrite=True to replace")
        # An earlier sidecar goes first, so that a run stopped between the files never leaves an old sidecar beside a
        # new label map; each file is written whole or not at all (:func:`~delinea.outputs.atomic_path`).
        targets["sidecar"].unlink(missing_ok=True)
        save_nifti(geometry.to_original(case.labels).astype(np.uint8), geometry.original_affine, targets["labels"],
                   overwrite=overwrite, description=f"{PREDICTION_DESCRIPTION}: labels")  # fmt: skip
        if save_uncertainty:
            save_nifti(geometry.to_original(case.uncertainty.astype(np.float32)), geometry.original_affine,
                       targets["uncertainty"], overwrite=overwrite,
                       description=f"{PREDICTION_DESCRIPTION}: uncertainty")  # fmt: skip
        counts = np.bincount(case.labels.ravel(), minlength=len(ORGANS))
        sidecar: dict[str, Any] = {
            "source": str(source),
            "labels": {str(i): name for i, name in enumerate(ORGANS)},
            "present": {ORGANS[i]: int(count) for i, count in enumerate(counts) if i and count},
            "spacing_mm": [float(s) for s in geometry.spacing],
            "model": type(self.task).__name__,
            "plan": self.plan.to_dict() if self.plan is not None else None,
            "files": {k: str(v) for k, v in targets.items() if k != "sidecar"},
        }
        if self._warn_nonfinite(case, str(source)):
            sidecar["nonfinite_voxels_replaced"] = case.nonfinite
        write_atomic(targets["sidecar"], json.dumps(sidecar, indent=2) + "\n")
        return targets

    @staticmethod
    def _warn_nonfinite(case: PredictedCase, source: str) -> bool:
        if case.nonfinite:
            warnings.warn(
                f"{source}: {case.nonfinite} voxel(s) are NaN or infinite; they are segmented as the scan's lowest "
                "finite value (noted in the prediction's sidecar)",
                stacklevel=3,
            )
        return bool(case.nonfinite)


def check_outputs(folder: Path, sources: Mapping[str, Path], overwrite: bool, save_uncertainty: bool = False) -> None:
    """Check, before any case is segmented, every file a prediction of the cases ``sources`` (case id -> its scan)
    writes into ``folder``: none may replace an input scan, whatever ``overwrite`` says (a scan named like another's
    prediction), none may exist unless ``overwrite``, and the folder must be writable. Temporary files that a killed
    run left there are removed.

    Raises:
        OutputError: an output would replace an input.
        FileExistsError: an output exists and ``overwrite`` is False.
    """
    targets = [t for case in sources for t in targets_of(folder, case, save_uncertainty).values()]
    inputs = {path.resolve(): case for case, path in sources.items()}
    for target in targets:
        if target.resolve() in inputs:
            raise OutputError(
                f"--output {folder}: {target.name} would replace the input scan {target} (case "
                f"{inputs[target.resolve()]!r}); choose another --output, or rename the scan"
            )
    check_writable(folder, targets, overwrite)
    remove_stale_temporaries(folder)


def targets_of(folder: Path, case_id: str, save_uncertainty: bool = False) -> dict[str, Path]:
    """The files a prediction of ``case_id`` is written as (:meth:`Segmenter.write`)."""
    out = {"labels": folder / f"{case_id}_seg.nii.gz", "sidecar": folder / f"{case_id}_seg.json"}
    if save_uncertainty:
        out["uncertainty"] = folder / f"{case_id}_uncertainty.nii.gz"
    return out
