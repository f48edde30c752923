"""Lightning tasks: they build the networks of ``delinea.models``, freeze them by flags and train them."""

from delinea.tasks.base import SegmentationTask
from delinea.tasks.meddelinea import MedDelineaTask

__all__ = ["MedDelineaTask", "SegmentationTask"]
