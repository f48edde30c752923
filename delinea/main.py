"""The ``delinea`` command: LightningCLI over delinea's tasks and datamodules.

    delinea fit  --config configs/pretrain.yaml
    delinea fit  --config configs/finetune.yaml --data btcv
    delinea test --ckpt atlas.ckpt --data amos
    delinea predict --ckpt model.ckpt --data.path scan.nii.gz --output predictions/
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import ArgsType, LightningCLI

import delinea
import delinea.tasks  # noqa: F401 - lets YAML name tasks by class name
from delinea.callbacks import PredictionWriter, TestReport
from delinea.errors import UserError
import delinea.tasks.backbones  # noqa: F401 - the backbone pretraining tasks (the demo's VAE and DiT)
from delinea.datamodules import DATAMODULES

# Names accepted by ``--data`` (case-insensitive) besides the class names themselves.
DATA_ALIASES: dict[str, str] = {name: f"{cls.__module__}.{cls.__name__}" for name, cls in DATAMODULES.items()}
DATA_ALIASES |= {"atlas": DATA_ALIASES["atlas8k"], "atlas-8k": DATA_ALIASES["atlas8k"],
                 "abdomenatlas": DATA_ALIASES["atlas8k"], "cirrmri600+": DATA_ALIASES["cirrmri600"],
                 "cirrmri": DATA_ALIASES["cirrmri600"], "pansegdata": DATA_ALIASES["panseg"]}


class CLIError(Exception):
    """A user error reported as one line with exit code 2."""


def _option(argv: list[str], names: tuple[str, ...]) -> tuple[int, str] | None:
    """Index and value of the last ``--name value`` or ``--name=value`` in argv."""
    found = None
    for i, arg in enumerate(argv):
        for name in names:
            if arg == name and i + 1 < len(argv):
                found = (i + 1, argv[i + 1])
            elif arg.startswith(name + "="):
                found = (i, arg.split("=", 1)[1])
    return found


def _set(argv: list[str], at: int, value: str) -> None:
    argv[at] = argv[at].split("=", 1)[0] + "=" + value if argv[at].startswith("--") else value


def rewrite_arguments(argv: list[str]) -> list[str]:
    """Resolve dataset aliases, check the checkpoint and fraction, and take the task class from a checkpoint.

    Raises:
        CLIError: unknown dataset, fraction outside (0, 1], missing or unreadable checkpoint.
    """
    argv = list(argv)
    data = _option(argv, ("--data",))
    if data is not None:
        at, value = data
        classes = {cls.__name__ for cls in DATAMODULES.values()}
        if value.lower() in DATA_ALIASES:
            _set(argv, at, DATA_ALIASES[value.lower()])
        elif value not in classes and "." not in value and "/" not in value:
            raise CLIError(f"unknown dataset {value!r}; choose one of {', '.join(DATAMODULES)}")
    fraction = _option(argv, ("--data.fraction", "--data.init_args.fraction"))
    if fraction is not None:
        try:
            ok = 0 < float(fraction[1]) <= 1
        except ValueError:
            ok = False
        if not ok:
            raise CLIError(f"--data.fraction {fraction[1]} must be a number in (0, 1]")
    ckpt = _option(argv, ("--ckpt", "--ckpt_path"))
    if ckpt is not None and ckpt[1] not in ("last", "best", "hpc", "registry", "null", "None"):
        path = Path(ckpt[1])
        if not path.is_file():
            raise CLIError(f"checkpoint not found: {path}")
        if _option(argv, ("--model",)) is None:
            argv[1:1] = ["--model", checkpoint_task(path)]
    return argv


def checkpoint_task(path: Path) -> str:
    """The task class a delinea checkpoint was trained with (read without unpickling code)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CLIError(f"cannot read checkpoint {path}: {error}") from error
    hparams = checkpoint.get("hyper_parameters", {})
    task = checkpoint.get("delinea_task") or hparams.get("_class_path")
    if not task:
        raise CLIError(f"checkpoint {path} does not name its task; pass --model MedDelineaTask or UNetTask")
    return task


def user_message(error: BaseException) -> str:
    """The message of the error delinea itself raised, out of jsonargparse's wrapping of it."""
    current: BaseException | None = error
    while current is not None:
        frames = traceback.extract_tb(current.__traceback__)
        if frames and f"{Path('delinea')}{os.sep}" in frames[-1].filename.replace("/", os.sep):
            return str(current).strip()
        current = current.__cause__ or current.__context__
    lines = [line.strip() for line in str(error).splitlines()]
    listed = [line[2:] for line in lines if line.startswith("- ") and "NoneType" not in line]
    return listed[0] if listed else (lines[-1] if lines else repr(error))


def explicit_model_arguments(argv: list[str]) -> dict[str, Any]:
    """Model init arguments the user gave in ``--config`` files and ``--model.X`` options, in order."""
    found: dict[str, Any] = {}
    for i, arg in enumerate(argv):
        name, _, value = arg.partition("=")
        if not value and i + 1 < len(argv):
            value = argv[i + 1]
        if name in ("-c", "--config") and Path(value).is_file():
            model = (yaml.safe_load(Path(value).read_text()) or {}).get("model") or {}
            found.update(model.get("init_args") or {})
        elif name.startswith("--model.") and name != "--model.help":
            found[name.removeprefix("--model.").removeprefix("init_args.")] = yaml.safe_load(value)
    return found


class DelineaCLI(LightningCLI):
    """LightningCLI with dataset aliases, one-line user errors and output options for test and predict."""

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_argument("--output", type=str | None, default=None,
                            help="folder for test reports or predictions (default: the run's log folder)")
        parser.add_argument("--overwrite", type=bool, default=False,
                            help="replace existing reports or predictions instead of refusing")
        parser.add_argument("--save_uncertainty", type=bool, default=False,
                            help="predict: also write the ensemble's per-voxel uncertainty map")
        parser.add_argument("--overlays", type=int, default=3, help="test: cases to draw overlay figures for")

    def parse_arguments(self, parser: Any, args: ArgsType) -> None:
        if args is None:  # from the shell: rewrite sys.argv itself, as LightningCLI warns on both at once
            sys.argv = [sys.argv[0], *rewrite_arguments(sys.argv[1:])]
            argv = sys.argv[1:]
            super().parse_arguments(parser, None)
        else:
            argv = rewrite_arguments(list(args))
            super().parse_arguments(parser, argv)
        self.model_overrides = explicit_model_arguments(argv)

    def _parse_ckpt_path(self) -> None:
        """Checkpoint hyperparameters first, then what the user set explicitly (``--model.sampler ddim`` or a
        ``--config`` with ``model.init_args``): LightningCLI alone would let the checkpoint win."""
        super()._parse_ckpt_path()
        subcommand = self.config.get("subcommand")
        if subcommand and self.config[subcommand].get("ckpt_path") and self.model_overrides:
            class_path = self.config[subcommand]["model"]["class_path"]
            update = {subcommand: {"model": {"class_path": class_path, "init_args": self.model_overrides}}}
            self.config = self.parser.parse_object(update, self.config)

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (ValueError, FileNotFoundError, KeyError) as error:
            raise CLIError(user_message(error)) from error

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The trainer, with the callbacks that write test reports and predictions where ``--output`` says."""
        trainer = super().instantiate_trainer(**kwargs)
        config = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        output, overwrite = config.get("output"), bool(config.get("overwrite"))
        trainer.callbacks.extend([
            TestReport(output, overwrite, int(config.get("overlays", 3))),
            PredictionWriter(output, overwrite, bool(config.get("save_uncertainty"))),
        ])  # fmt: skip
        return trainer

    def predict(self, model: LightningModule, datamodule: LightningDataModule | None = None,
                return_predictions: bool | None = None, **kwargs: Any) -> None:
        """``trainer.predict`` that keeps no predictions in memory unless asked: the writer has them on disk."""
        self.trainer.predict(model, datamodule=datamodule, return_predictions=bool(return_predictions), **kwargs)


def build_cli(args: ArgsType = None, run: bool = True) -> DelineaCLI:
    """The ``delinea`` LightningCLI; ``run=False`` only parses and instantiates (config tests)."""
    return DelineaCLI(
        # Any LightningModule and datamodule: the segmentation tasks, and the backbone pretraining tasks.
        model_class=LightningModule,
        datamodule_class=LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=0,
        parser_kwargs={"version": delinea.__version__},
        args=args,
        run=run,
    )


def main(args: ArgsType = None) -> None:
    """Run the ``delinea`` command; ``args`` lets tests call it in-process. User errors exit with code 2."""
    try:
        build_cli(args)
    except (CLIError, UserError, FileExistsError, NotADirectoryError, PermissionError) as error:
        print(f"delinea: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
