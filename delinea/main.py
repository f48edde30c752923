"""The ``delinea`` command: LightningCLI over delinea's segmentation tasks and datamodules.

    delinea fit  --config configs/pretrain.yaml
    delinea fit  --config configs/finetune.yaml --data btcv
    delinea test --ckpt atlas.ckpt --data amos
    delinea predict --ckpt model.ckpt --data scan --data.path scan.nii.gz --output predictions/

What it adds to LightningCLI: dataset names for ``--data``; a checkpoint's task and hyperparameters as the model's
defaults (explicit ``--model.*`` options and configs override them; only the tasks in :data:`TASKS` are accepted,
so a checkpoint cannot make delinea import anything); ``--ckpt_path last`` resolved to the run's newest
``last.ckpt``; the output callbacks; and user errors as one line with exit code 2. ``delinea-pretrain`` runs the
backbone pretraining tasks.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import ArgsType, LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_only

import delinea
from delinea.callbacks import (
    AtomicCheckpointIO,
    CheckpointFolderLock,
    NewestLastCheckpoint,
    PredictionWriter,
    RunOptions,
    TestReport,
)
from delinea.cli import (
    CKPT_NAMES,
    DATA_ALIASES,
    USER_ERRORS,
    CLIError,
    check_config_files,
    option_value,
    report,
    take_option,
    user_message,
)
from delinea.datamodules import DATAMODULES, MedSegDataModule, SliceData
from delinea.preprocess import main as preprocess
from delinea.runs import NumberedConfigSaver, claim_version, find_last_checkpoint
from delinea.segmenter import Segmenter
from delinea.tasks import TASKS, SegmentationTask, checkpoint_task
from delinea.tasks.checkpoints import checkpoint_hparams, read_checkpoint
from delinea.tasks.export import is_model_folder


class OneLineErrorsCLI(LightningCLI):
    """LightningCLI whose errors while reading configs and building the classes reach the user as delinea's one-line
    message, whose checkpoints are written atomically (:class:`~delinea.callbacks.AtomicCheckpointIO`), whose
    ``last.ckpt`` is the newest state (:class:`~delinea.callbacks.NewestLastCheckpoint`), whose runs each claim their
    own ``version_N`` folder (:func:`claim_version`) and whose fits refuse a checkpoint folder that another running
    fit holds (:class:`~delinea.callbacks.CheckpointFolderLock`)."""

    def parse_arguments(self, parser: Any, args: ArgsType) -> None:
        check_config_files(list(sys.argv[1:] if args is None else args))
        super().parse_arguments(parser, args)

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except MisconfigurationException as error:  # Lightning's Trainer refusing an option: it names it
            raise CLIError(f"--trainer: {str(error).strip()}") from None
        except (ValueError, FileNotFoundError, KeyError) as error:
            raise CLIError(user_message(error)) from error

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # not a writer the user chose
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        for callback in trainer.callbacks:
            if type(callback) is ModelCheckpoint and callback.save_last:  # adds behaviour, no state
                callback.__class__ = NewestLastCheckpoint
        if self.subcommand is not None and rank_zero_only.rank == 0:  # a run (not a parse), on its first process
            for logger in trainer.loggers:
                claim_version(logger)
        if self.subcommand == "fit":
            trainer.callbacks.append(CheckpointFolderLock())
        return trainer


class DelineaCLI(OneLineErrorsCLI):
    """LightningCLI with dataset names, checkpoint defaults, ``last`` resolution, the output callbacks, and the
    :class:`~delinea.Segmenter` that segments whole cases. A checkpoint is read once: its task and hyperparameters
    become the model's defaults, then the same copy is loaded into the model (or handed to the trainer to resume)."""

    checkpoint: Path | str | None = None
    #: The checkpoint (or model folder) as read, weights-only and memory-mapped.
    checkpoint_data: dict[str, Any] | None = None

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_argument(
            "--output",
            type=str | None,
            default=None,
            help="folder for test reports or predictions (default: the run's log folder)",
        )
        parser.add_argument(
            "--overwrite", type=bool, default=False, help="replace existing reports or predictions instead of refusing"
        )
        parser.add_argument(
            "--save_uncertainty",
            type=bool,
            default=False,
            help="predict: also write the ensemble's per-voxel uncertainty map",
        )
        parser.add_argument("--overlays", type=int, default=3, help="test: cases to draw overlay figures for")

    def parse_arguments(self, parser: Any, args: ArgsType) -> None:
        argv = self.prepare_argv(list(sys.argv[1:] if args is None else args))
        if args is None:  # from the shell: LightningCLI warns when given both argv and args
            sys.argv[1:] = argv
        super().parse_arguments(parser, None if args is None else argv)
        subcommand = self.config.get("subcommand")
        if self.checkpoint_task is not None and subcommand:
            chosen = self.config[subcommand]["model"]["class_path"].rsplit(".", 1)[-1]
            if chosen != self.checkpoint_task:
                raise CLIError(
                    f"--model {chosen} contradicts checkpoint {self.checkpoint}, which holds a "
                    f"{self.checkpoint_task}; drop --model"
                )

    def prepare_argv(self, argv: list[str]) -> list[str]:
        """Resolve ``--data`` names; take the checkpoint out of argv (this CLI hands it to the trainer) and put its
        task and hyperparameters first, as defaults that the user's options override."""
        self.checkpoint_task: str | None = None
        data = option_value(argv, "--data")
        if data is not None and data.lower() in DATA_ALIASES:
            option_value(argv, "--data", replace=DATA_ALIASES[data.lower()])
        elif data is not None and data not in DATA_ALIASES.values() and "." not in data:
            raise CLIError(f"unknown dataset {data!r}; choose one of {', '.join(DATAMODULES)}")
        if not argv or argv[0] not in self.subcommands():
            return argv
        checkpoint = take_option(argv, CKPT_NAMES)
        if checkpoint in (None, "null", "None"):
            return argv
        if checkpoint == "last" and argv[0] == "fit":
            self.checkpoint = "last"  # resolved once the run folder is known (before_fit)
            return argv
        path = Path(checkpoint)
        if not path.is_file() and not is_model_folder(path):
            raise CLIError(f"checkpoint not found: {path}")
        if argv[0] == "fit" and is_model_folder(path):
            raise CLIError(
                f"{path} is a model folder: it holds weights, not a run to resume; fine-tune from it with "
                f"--model.init_from {path}"
            )
        self.checkpoint = path
        self.checkpoint_data = read_checkpoint(path, mmap=True)
        if "state_dict" not in self.checkpoint_data:
            raise CLIError(f"{path} is not a delinea checkpoint: no state_dict")
        self.checkpoint_task = checkpoint_task(self.checkpoint_data, path).__name__
        hparams = checkpoint_hparams(self.checkpoint_data, path)
        explicit = option_value(argv, "--model")
        if (
            explicit is not None
            and not explicit.lstrip().startswith("{")
            and explicit.rsplit(".", 1)[-1] != self.checkpoint_task
        ):
            raise CLIError(
                f"--model {explicit} contradicts checkpoint {path}, which holds a {self.checkpoint_task}; drop --model"
            )
        task = TASKS[self.checkpoint_task]
        defaults = json.dumps({"class_path": f"{task.__module__}.{task.__name__}", "init_args": hparams})
        return [argv[0], "--model", defaults, *argv[1:]]

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The trainer, with the callbacks that write test reports and predictions where ``--output`` says."""
        trainer = super().instantiate_trainer(**kwargs)
        config = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        output, overwrite = config.get("output"), bool(config.get("overwrite"))
        trainer.callbacks.extend([
            TestReport(output, overwrite, int(config.get("overlays", 3))),
            PredictionWriter(output, overwrite, bool(config.get("save_uncertainty"))),
            RunOptions(self.run_options()),
        ])  # fmt: skip
        return trainer

    def run_options(self) -> dict[str, Any]:
        """What makes a run the run it is, as plain values: its model, data and seed (not its trainer options, which
        a resumed run may change, e.g. ``max_steps``)."""
        config = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        chosen = {key: config.get(key) for key in ("model", "data", "seed_everything")}
        plain: dict[str, Any] = json.loads(json.dumps(chosen, sort_keys=True, default=_plain))
        return plain

    def _checkpoint_path(self, model: LightningModule) -> str | None:
        """The checkpoint to resume a fit from (its copy read once, handed to the trainer's checkpoint IO), checked
        against the model; None when there is none."""
        if self.checkpoint == "last":
            self.checkpoint, self.checkpoint_data = find_last_checkpoint(self.trainer, self.run_options())
        if self.checkpoint is None or self.checkpoint_data is None:
            return None
        if isinstance(model, SegmentationTask):
            model.check_fits(self.checkpoint_data, self.checkpoint)
        io = self.trainer.strategy.checkpoint_io
        if isinstance(io, AtomicCheckpointIO):
            io.hand_over(self.checkpoint, self.checkpoint_data)
        return str(self.checkpoint)

    def _evaluate(self, model: LightningModule, datamodule: LightningDataModule | None, stage: str) -> None:
        """Load the checkpoint's copy into the model (read once, checked) and attach the Segmenter that segments
        whole cases, with the plan the datamodule serves."""
        if isinstance(model, SegmentationTask):
            if self.checkpoint_data is not None:
                model.restore(self.checkpoint_data, self.checkpoint or "checkpoint")
            segmenter = Segmenter(model)
            if isinstance(datamodule, SliceData):
                segmenter.prepare(datamodule, stage)

    # The subcommands, with the checkpoint this CLI took out of argv, loaded weights-only whatever the environment
    # says (TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD cannot switch it off).
    def fit(self, model: LightningModule, datamodule: LightningDataModule | None = None, **kwargs: Any) -> None:
        kwargs.update(ckpt_path=self._checkpoint_path(model), weights_only=True)
        if isinstance(model, SegmentationTask):
            Segmenter(model)  # segments the validation cases when val_metrics is on
            if kwargs["ckpt_path"] is None:
                model.start_from_parent()  # a bad init_from stops the run before the data are read
        self.trainer.fit(model, datamodule=datamodule, **kwargs)

    def validate(self, model: LightningModule, datamodule: LightningDataModule | None = None, **kwargs: Any) -> None:
        self._evaluate(model, datamodule, "validate")
        self.trainer.validate(model, datamodule=datamodule, **{**kwargs, "weights_only": True})

    def test(self, model: LightningModule, datamodule: LightningDataModule | None = None, **kwargs: Any) -> None:
        self._evaluate(model, datamodule, "test")
        self.trainer.test(model, datamodule=datamodule, **{**kwargs, "weights_only": True})

    def predict(
        self,
        model: LightningModule,
        datamodule: LightningDataModule | None = None,
        return_predictions: bool | None = None,
        **kwargs: Any,
    ) -> None:
        """``trainer.predict`` that keeps no predictions in memory unless asked: the writer has them on disk."""
        self._evaluate(model, datamodule, "predict")
        self.trainer.predict(
            model,
            datamodule=datamodule,
            return_predictions=bool(return_predictions),
            **{**kwargs, "weights_only": True},
        )


def _plain(value: Any) -> Any:
    """JSON for the values of a parsed config: namespaces as dicts, anything else (paths) as text."""
    return value.as_dict() if hasattr(value, "as_dict") else str(value)


def build_cli(args: ArgsType = None, run: bool = True) -> DelineaCLI:
    """The ``delinea`` LightningCLI; ``run=False`` only parses and instantiates (config tests)."""
    return DelineaCLI(SegmentationTask, MedSegDataModule, args=args, run=run, **cli_options())


def cli_options() -> dict[str, Any]:
    """What both commands pass LightningCLI: tasks and datamodules by class path, seed 0, numbered configs."""
    return {
        "subclass_mode_model": True,
        "subclass_mode_data": True,
        "seed_everything_default": 0,
        "save_config_callback": NumberedConfigSaver,
        "parser_kwargs": {"version": delinea.__version__},
    }


def main(args: ArgsType = None) -> None:
    """Run the ``delinea`` command; ``args`` lets tests call it in-process. User errors exit with code 2.
    ``delinea preprocess`` writes a dataset's slice store (:mod:`delinea.preprocess`)."""
    argv = list(sys.argv[1:] if args is None else args)
    if argv[:1] == ["preprocess"]:
        try:
            preprocess(argv[1:])
        except USER_ERRORS as error:
            report("delinea preprocess", error)
        return
    try:
        build_cli(args)
    except USER_ERRORS as error:
        report("delinea", error)


def pretrain(args: ArgsType = None) -> None:
    """The ``delinea-pretrain`` command: LightningCLI over the backbone pretraining tasks
    (:mod:`delinea.tasks.pretraining`) and delinea's datamodules. User errors exit with code 2."""
    from delinea.tasks.pretraining import BackbonePretrainTask

    try:
        OneLineErrorsCLI(BackbonePretrainTask, MedSegDataModule, args=args, **cli_options())
    except USER_ERRORS as error:
        report("delinea-pretrain", error)


if __name__ == "__main__":
    main()
