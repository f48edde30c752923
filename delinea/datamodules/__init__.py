"""Datamodules: one per dataset over a common base, plus a generic folder and new-scan prediction.

The batch contract, one ``TypedDict`` per stage, and what tasks ask of a datamodule (:class:`SliceData`) are in
:mod:`delinea.datamodules.batches`.
"""

from delinea.datamodules.amos import AMOSDataModule
from delinea.datamodules.atlas8k import Atlas8kDataModule
from delinea.datamodules.base import Case, MedSegDataModule
from delinea.datamodules.batches import EvalBatch, PredictBatch, SliceData, TrainBatch, WindowBatch
from delinea.datamodules.btcv import BTCVDataModule
from delinea.datamodules.cirrmri600 import CirrMRI600DataModule
from delinea.datamodules.folder import FolderDataModule
from delinea.datamodules.labelled import LabelledDataModule, SequenceDataModule
from delinea.datamodules.panseg import PanSegDataModule
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
    "EvalBatch",
    "FolderDataModule",
    "LabelledDataModule",
    "MedSegDataModule",
    "PanSegDataModule",
    "PredictBatch",
    "ScanDataModule",
    "SequenceDataModule",
    "SliceBatchSampler",
    "SliceData",
    "TrainBatch",
    "WindowBatch",
]
