"""Lightning tasks: they build the networks of ``delinea.models``, freeze them by flags and train them."""

from delinea.tasks.base import SegmentationTask
from delinea.tasks.meddelinea import MedDelineaTask
from delinea.tasks.unet import UNetTask

__all__ = ["MedDelineaTask", "SegmentationTask", "UNetTask"]
