"""The batch contract between datamodules and tasks, one ``TypedDict`` per stage, and :class:`SliceData`: what
tasks, the :class:`~delinea.Segmenter` and the callbacks ask of a datamodule.

Slice ``k`` is ``canonical[:, :, k]`` of the RAS+ volume (H along x = towards patient right, W along y = anterior),
resampled in-plane onto the plan's lattice over the case's body box (:mod:`delinea.geometry`). Training batches are
``window x window`` crops of it; validation, test and predict batches are whole resampled slices, one case per batch
(case by case with slices ascending; with loader workers, each worker's run of cases, interleaved:
:class:`~delinea.datamodules.samplers.SliceBatchSampler`), so that they can be covered with windows and stacked into
volumes on each case's own grid in any order; each rank gets whole cases. Every key is collated by PyTorch's
default collate.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, TypedDict, runtime_checkable

import torch

from delinea.geometry import Plan, PlanRequest, resolve_plan
from delinea.io import Geometry

#: A training loader's resolution cycle as (window, micro-batch size) pairs, and each window's loss weight.
MicroBatchPlan = tuple[list[tuple[int, int]], dict[int, float]]


class PredictBatch(TypedDict):
    """Whole resampled slices of one case (``predict``; every stage's batch holds these keys).

    Keys:
        image: float32 (B, 1, H, W) in [-1, 1] (CT: HU window; MRI: per-volume 0.5-99.5 percentiles).
        case_id: the case of every slice (one case per evaluation batch).
        slice_index: int64 (B,), the axial index k in the canonical volume.
        region: float64 (B, 5), the slice's lattice rectangle ``(x0, x1, y0, y1, spacing)``
            (:meth:`~delinea.geometry.Region.as_tensor`).
        box: int64 (B, 4), the scan's voxels ``(x0, x1, y0, y1)`` that the region covers.
        seed: int64 (B,), the sample's draw (crop, augmentation); 0 for whole slices.
        cache_key: SHA-1 naming the served tensor; "" when it must not be cached (augmented, unlabelled).
        nonfinite: int64 (B,), NaN or infinite voxels of the case replaced by its lowest value (scans to predict).
    """

    image: torch.Tensor
    case_id: list[str]
    slice_index: torch.Tensor
    region: torch.Tensor
    box: torch.Tensor
    seed: torch.Tensor
    cache_key: list[str]
    nonfinite: torch.Tensor


class WindowBatch(TypedDict):
    """What a task's losses take: windows with their masks (training batches; validation tiles).

    Keys:
        image: float32 (B, 1, w, w).
        mask: int64 (B, w, w), unified organ ids 0..8 (:data:`delinea.labels.ORGANS`).
        labelled: bool (B, 9), the classes the source annotates (background False in single-organ sets).
        case_id, slice_index, cache_key: as in :class:`PredictBatch`.
    """

    image: torch.Tensor
    mask: torch.Tensor
    labelled: torch.Tensor
    case_id: list[str]
    slice_index: torch.Tensor
    cache_key: list[str]


class TrainBatch(PredictBatch):
    """Training windows (``window x window`` crops, placed and augmented by ``seed``), with their masks; a
    :class:`WindowBatch` too. Keys as in :class:`PredictBatch` and :class:`WindowBatch`."""

    mask: torch.Tensor
    labelled: torch.Tensor


class EvalBatch(TrainBatch):
    """Whole resampled slices of one labelled case (validation, test), with what scoring and figures need on the
    case's own grid, so that the main process reads no volume again.

    Keys (besides :class:`TrainBatch`'s):
        native_label: uint8 (B, X, Y), the canonical unified label slice on the scan's grid.
        native_image: float32 (B, X, Y), the canonical normalised image slice on the scan's grid.
    """

    native_label: torch.Tensor
    native_image: torch.Tensor


@runtime_checkable
class SliceData(Protocol):
    """What a task, the Segmenter and the callbacks use of a datamodule
    (:class:`~delinea.datamodules.base.MedSegDataModule` has it all)."""

    batch_size: int
    micro_batch_size: int | dict[int, int] | None
    #: The plan every loader serves, once given (:meth:`use_plan`).
    plan: Plan | None

    def plan_request(self) -> PlanRequest:
        """What the datamodule's options and files say about the plan (:func:`~delinea.geometry.resolve_plan`)."""
        ...

    def use_plan(self, plan: Plan) -> None:
        """Serve every loader at ``plan``."""
        ...

    def micro_batch_plan(self, accumulate: int = 1) -> MicroBatchPlan | None:
        """The training resolution cycle and loss weights; None without micro-batches."""
        ...

    def case_geometry(self, case_id: str) -> Geometry:
        """A case's grid, from its header."""
        ...

    def case_path(self, case_id: str) -> Path:
        """A case's image file or DICOM folder."""
        ...

    def predict_cases(self) -> list[str]:
        """The cases ``predict`` serves, in loader order."""
        ...


def give_plan(data: SliceData, model_plan: Plan | None, stage: str) -> Plan:
    """Resolve the plan ``data`` serves at ``stage`` from the model's plan and its options and files
    (:func:`~delinea.geometry.resolve_plan`), keep a computed one beside the split, and give it to ``data``."""
    plan, write_to = resolve_plan(model_plan, stage, data.plan_request())
    if write_to is not None:
        plan.save(write_to)
    data.use_plan(plan)
    return plan
