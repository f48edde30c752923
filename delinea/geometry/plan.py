"""The plan record and its resolution: the physical pixel size and the windows a model works at.

Like nnU-Net's plans, every model has one: an in-plane target spacing in mm per pixel (per modality), its window
size(s) in pixels and the margin of the body crop. It is written beside a dataset's split and stored in checkpoints;
:func:`resolve_plan` decides, in one place, which plan a run uses from the model's own plan, the stage, the
datamodule's options and the plan files (:class:`PlanRequest`). The lattice it defines and the resampling onto it
are in :mod:`delinea.geometry.lattice`, the window layouts in :mod:`delinea.geometry.windows`.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from delinea.errors import DatasetError, OptionError
from delinea.outputs import write_atomic

log = logging.getLogger(__name__)

#: Spacings above this many mm per pixel are refused: no abdominal scan has them, a typo does.
MAX_SPACING = 20.0
#: Spacings below this are refused: the finest clinical CT and MRI pixels are about 0.2 mm, and every halving of the
#: spacing quadruples the pixels to resample and the windows to segment (0.01 mm made a 2-step fit 14x slower).
MIN_SPACING = 0.1
#: Training windows when neither the datamodule nor a model's plan names one.
DEFAULT_WINDOW = 256
PLAN_MODALITIES = ("ct", "mr")


def check_spacing(value: float, what: str = "spacing") -> float:
    """``value`` as a float if it is a usable in-plane spacing in mm, else a ValueError naming it."""
    try:
        spacing = float(value)
    except (TypeError, ValueError):
        raise OptionError(f"{what} {value!r} must be a number of mm per pixel") from None
    if not math.isfinite(spacing) or spacing <= 0:
        raise OptionError(f"{what} {value!r} must be a positive number of mm per pixel")
    if spacing > MAX_SPACING:
        raise OptionError(f"{what} {value!r} mm per pixel is absurd for a scan (expected at most {MAX_SPACING:g} mm)")
    if spacing < MIN_SPACING:
        raise OptionError(
            f"{what} {value!r} mm per pixel is finer than any CT or MRI slice (expected at least {MIN_SPACING:g} mm: "
            "each halving quadruples the pixels and windows per slice)"
        )
    return spacing


def check_windows(window: int | Sequence[int], what: str = "window") -> tuple[int, ...]:
    """Window sizes as a tuple of positive multiples of 8, else a ValueError naming the value."""
    values = [window] if isinstance(window, int) else list(window)
    if not values or any(not isinstance(w, int) or isinstance(w, bool) or w < 8 or w % 8 for w in values):
        raise OptionError(f"{what} must be a positive multiple of 8 or a list of them, got {window!r}")
    return tuple(values)


@dataclass(frozen=True)
class Plan:
    """A model's geometry: in-plane target spacing per modality and window size(s).

    Attributes:
        spacing: modality (``ct``/``mr``) -> target in-plane spacing in mm per pixel.
        window: training window sizes in pixels (alternated between batches); the first one is the inference
            window.
        source: how the plan was made (``"median of 41 training cases"``, ``"explicit"``...), for the record.
        body_margin: margin in mm around the body box every slice is cut to; None: whole slices.
    """

    spacing: Mapping[str, float]
    window: tuple[int, ...]
    source: str = field(default="", compare=False)
    body_margin: float | None = 10.0

    def __post_init__(self) -> None:
        if not self.spacing:
            raise OptionError("a plan needs the spacing of at least one modality")
        spacing = {}
        for modality, value in self.spacing.items():
            if modality not in PLAN_MODALITIES:
                raise OptionError(f"plan spacing for unknown modality {modality!r}; expected {PLAN_MODALITIES}")
            spacing[modality] = check_spacing(value, f"plan spacing ({modality})")
        object.__setattr__(self, "spacing", dict(sorted(spacing.items())))
        object.__setattr__(self, "window", check_windows(tuple(self.window), "plan window"))
        if self.body_margin is not None:
            margin = float(self.body_margin)
            if not math.isfinite(margin) or margin < 0:
                raise OptionError(f"plan body_margin {self.body_margin!r} must be a non-negative number of mm or None")
            object.__setattr__(self, "body_margin", margin)

    @classmethod
    def uniform(
        cls, spacing: float, window: int | Sequence[int], source: str = "explicit", body_margin: float | None = 10.0
    ) -> Plan:
        """The same spacing for every modality."""
        value = check_spacing(spacing)
        return cls({m: value for m in PLAN_MODALITIES}, check_windows(window), source, body_margin)

    @classmethod
    def from_cases(
        cls, spacings: Mapping[str, Sequence[float]], window: int | Sequence[int], body_margin: float | None = 10.0
    ) -> Plan:
        """The median in-plane spacing of training cases, per modality.

        Args:
            spacings: modality -> every training case's in-plane spacing values (both axes of each case).
            window: window size(s) in pixels.
            body_margin: margin of the body crop in mm, or None.
        """
        present = {m: list(v) for m, v in spacings.items() if len(v)}
        if not present:
            raise DatasetError("cannot plan a spacing: no training case with a readable header")
        counts = ", ".join(f"{len(v) // 2} {m.upper()}" for m, v in present.items())
        median = {m: round(float(np.median(v)), 4) for m, v in present.items()}
        return cls(
            median, check_windows(window), f"median in-plane spacing of the training cases ({counts})", body_margin
        )

    @property
    def inference_window(self) -> int:
        """The window that validation, test and predict slide over a slice."""
        return self.window[0]

    def spacing_for(self, modality: str) -> float:
        """Target spacing for ``modality``; for a modality the model never trained on (zero-shot), the median of
        the plan's spacings."""
        if modality in self.spacing:
            return self.spacing[modality]
        return float(np.median(list(self.spacing.values())))

    def same_geometry(self, other: Plan) -> bool:
        """Whether two plans resample and crop alike (windows may differ)."""
        return (
            set(self.spacing) == set(other.spacing)
            and all(abs(self.spacing[m] - other.spacing[m]) <= 1e-6 * self.spacing[m] for m in self.spacing)
            and self.body_margin == other.body_margin
        )

    def with_window(self, window: int | Sequence[int]) -> Plan:
        """The same geometry with other windows."""
        return Plan(self.spacing, check_windows(window), self.source, self.body_margin)

    def describe(self) -> str:
        """One line for logs: ``ct 3 mm per pixel; window 256/512 px; body + 10 mm (median of ...)``."""
        spacing = ", ".join(f"{m} {s:.3g} mm" for m, s in self.spacing.items())
        windows = "/".join(str(w) for w in self.window)
        crop = "whole slices" if self.body_margin is None else f"body + {self.body_margin:g} mm"
        return f"{spacing} per pixel; window {windows} px; {crop}" + (f" ({self.source})" if self.source else "")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (what plan files and checkpoints hold)."""
        return {
            "spacing_mm": dict(self.spacing),
            "window": list(self.window),
            "body_margin_mm": self.body_margin,
            "source": self.source,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "plan") -> Plan:
        """Read :meth:`to_dict` output back; ValueError naming ``where`` if it is not a plan."""
        try:
            return cls(
                dict(data["spacing_mm"]),
                tuple(data["window"]),
                str(data.get("source", "")),
                data.get("body_margin_mm", 10.0),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise OptionError(
                f"{where} is not a delinea plan ({type(error).__name__}: {error}); expected "
                '{"spacing_mm": {"ct": 1.5}, "window": [256]}'
            ) from None

    def save(self, path: str | Path) -> Path:
        """Write the plan as JSON (atomically: concurrent ranks never read half a file)."""
        return write_atomic(path, json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        """Read a plan file; DatasetError naming the file if it is missing or not a plan."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise DatasetError(f"{path}: cannot read the plan file ({error})") from None
        try:
            return cls.from_dict(data, where=str(path))
        except ValueError as error:
            raise DatasetError(str(error)) from None


# ----------------------------------------------------------------------------------------------------------
# Resolution: which plan a run uses


@dataclass(frozen=True)
class PlanRequest:
    """What a datamodule's options and files say about the plan (:meth:`MedSegDataModule.plan_request`).

    Attributes:
        dataset: the dataset's name, for messages.
        spacing: an explicit in-plane spacing in mm for every modality, or None.
        plan_file: an explicit plan file (read if it exists; a computed plan is written there otherwise), or None.
        resolutions: explicit window sizes, or None (the model's, else :data:`DEFAULT_WINDOW`).
        body_margin: the body crop's margin in mm of a new plan; None keeps whole slices.
        default_plan_file: where a computed plan is kept when no ``plan_file`` is given (beside the split), or None.
        case_spacings: the training cases' in-plane spacings per modality (read from their headers when called),
            or None when there are no training cases to plan from.
    """

    dataset: str
    spacing: float | None = None
    plan_file: Path | None = None
    resolutions: tuple[int, ...] | None = None
    body_margin: float | None = 10.0
    default_plan_file: Path | None = None
    case_spacings: Callable[[], Mapping[str, Sequence[float]]] | None = field(default=None, compare=False)

    def windows(self, fallback: Plan | None) -> tuple[int, ...]:
        """The explicit windows, else ``fallback``'s, else :data:`DEFAULT_WINDOW`."""
        if self.resolutions is not None:
            return tuple(self.resolutions)
        return fallback.window if fallback is not None else (DEFAULT_WINDOW,)

    def windowed(self, plan: Plan) -> Plan:
        """``plan`` with the explicit windows, if any."""
        return plan.with_window(self.resolutions) if self.resolutions is not None else plan

    def explicit(self, fallback: Plan | None) -> Plan | None:
        """The plan the options name: ``spacing``, else an existing ``plan_file``; None if neither."""
        if self.spacing is not None:
            return Plan.uniform(self.spacing, self.windows(fallback), "explicit spacing", self.body_margin)
        if self.plan_file is not None and self.plan_file.exists():
            return self.windowed(Plan.load(self.plan_file))
        return None


class ResolvedPlan(NamedTuple):
    """What :func:`resolve_plan` decided: the plan, and the file to keep it in when it was computed now."""

    plan: Plan
    write_to: Path | None = None


def resolve_plan(model_plan: Plan | None, stage: str, request: PlanRequest) -> ResolvedPlan:
    """The plan a run serves, from the model's own plan (a checkpoint's, a parent's, or None), the stage
    (``fit``, ``validate``, ``test``, ``predict``) and the datamodule's options and files.

    Fitting: an explicit ``spacing`` or ``plan_file``, else the model's plan (a resumed run, or ``init_from``:
    fine-tuning keeps its parent's geometry), else the plan file beside the split, else the median of the training
    cases (to be written beside the split). Evaluation: the model's plan; an explicit spacing or plan file that
    disagrees with it is an error, since a model only knows its own pixel scale. Explicit windows replace the
    plan's windows in every case.

    Raises:
        DatasetError: an explicit plan disagrees with the model's at evaluation, a plan file is bad, or there is
            nothing to plan from.
    """
    explicit = request.explicit(model_plan)
    write_to = None
    if stage != "fit" and model_plan is not None:
        if explicit is not None and not explicit.same_geometry(model_plan):
            where = f"spacing={request.spacing}" if request.spacing is not None else f"plan_file {request.plan_file}"
            raise DatasetError(
                f"{request.dataset}: {where} ({explicit.describe()}) disagrees with the model's plan "
                f"({model_plan.describe()}); a model segments at the spacing it was trained at: drop the option"
            )
        plan = request.windowed(model_plan)
    elif explicit is not None:
        plan = explicit
    elif model_plan is not None:
        plan = request.windowed(model_plan)
    else:
        target = request.plan_file or request.default_plan_file
        if target is not None and target.exists():
            plan = request.windowed(Plan.load(target))
        else:
            if request.case_spacings is None:
                raise DatasetError(
                    f"{request.dataset}: no model plan and no training cases to plan a spacing from; "
                    "pass spacing=... (mm per pixel) or predict with a checkpoint"
                )
            plan = Plan.from_cases(request.case_spacings(), request.windows(None), request.body_margin)
            write_to = target
        if stage != "fit":
            warnings.warn(
                f"{request.dataset}: the model carries no plan; evaluating at {plan.describe()}", stacklevel=2
            )
    log.info("%s: plan %s", request.dataset, plan.describe())
    return ResolvedPlan(plan, write_to)


__all__ = [
    "DEFAULT_WINDOW",
    "MAX_SPACING",
    "MIN_SPACING",
    "PLAN_MODALITIES",
    "Plan",
    "PlanRequest",
    "ResolvedPlan",
    "check_spacing",
    "check_windows",
    "resolve_plan",
]
