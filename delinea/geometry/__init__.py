"""Geometry: the plan a model works at (:mod:`~delinea.geometry.plan`: the record and its resolution), the lattice
fixed in the patient and resampling onto it and back (:mod:`~delinea.geometry.lattice`), and the window layouts of
training, validation and inference (:mod:`~delinea.geometry.windows`). Datamodules and tasks both receive a
:class:`Plan` from here; neither reads the other's."""

from delinea.geometry.lattice import (
    BODY_SHARE,
    BODY_THRESHOLD,
    IMAGE_FILL,
    MAX_SLICE_PIXELS,
    Axes,
    Region,
    body_box,
    from_lattice,
    mask_to_lattice,
    to_lattice,
)
from delinea.geometry.plan import (
    DEFAULT_WINDOW,
    MAX_SPACING,
    MIN_SPACING,
    Plan,
    PlanRequest,
    ResolvedPlan,
    check_spacing,
    check_windows,
    resolve_plan,
)
from delinea.geometry.windows import (
    MAX_WINDOWS_PER_SLICE,
    SlidingLayout,
    check_window_count,
    covering_window,
    crop_window,
    lattice_padding,
    offset_range,
    tile_offsets,
    tile_windows,
    window_offsets,
)

__all__ = [
    "BODY_SHARE",
    "BODY_THRESHOLD",
    "DEFAULT_WINDOW",
    "IMAGE_FILL",
    "MAX_SLICE_PIXELS",
    "MAX_SPACING",
    "MAX_WINDOWS_PER_SLICE",
    "MIN_SPACING",
    "Axes",
    "Plan",
    "PlanRequest",
    "Region",
    "ResolvedPlan",
    "SlidingLayout",
    "body_box",
    "check_spacing",
    "check_window_count",
    "check_windows",
    "covering_window",
    "crop_window",
    "from_lattice",
    "lattice_padding",
    "mask_to_lattice",
    "offset_range",
    "resolve_plan",
    "tile_offsets",
    "tile_windows",
    "to_lattice",
    "window_offsets",
]
