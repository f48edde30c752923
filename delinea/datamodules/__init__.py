"""Datamodules: one per dataset over a common base, plus a generic folder and new-scan prediction.

The batch contract is documented in :mod:`delinea.datamodules.base`.
"""

from delinea.datamodules.amos import AMOSDataModule
from delinea.datamodules.atlas8k import Atlas8kDataModule
from delinea.datamodules.base import Case, LabelledDataModule, MedSegDataModule
from delinea.datamodules.btcv import BTCVDataModule
from delinea.datamodules.cirrmri600 import CirrMRI600DataModule
from delinea.datamodules.folder import FolderDataModule
from delinea.datamodules.panseg import PanSegDataModule
from delinea.datamodules.plan import Plan
from delinea.datamodules.samplers import SliceBatchSampler
from delinea.datamodules.scan import ScanDataModule
from delinea.io import DatasetError

#: CLI names -> datamodule classes.
DATAMODULES: dict[str, type[MedSegDataModule]] = {
    "atlas8k": Atlas8kDataModule,
    "btcv": BTCVDataModule,
    "amos": AMOSDataModule,
    "cirrmri600": CirrMRI600DataModule,
    "panseg": PanSegDataModule,
    "folder": FolderDataModule,
    "scan": ScanDataModule,
}

__all__ = [
    "DATAMODULES",
    "AMOSDataModule",
    "Atlas8kDataModule",
    "BTCVDataModule",
    "Case",
    "CirrMRI600DataModule",
    "DatasetError",
    "FolderDataModule",
    "LabelledDataModule",
    "MedSegDataModule",
    "PanSegDataModule",
    "Plan",
    "ScanDataModule",
    "SliceBatchSampler",
]
