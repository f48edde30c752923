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

import yaml
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import ArgsType, LightningCLI, SaveConfigCallback
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
from delinea.datamodules import DATAMODULES, MedSegDataModule
from delinea.errors import UserError
from delinea.tasks import TASKS, SegmentationTask, checkpoint_hparams, checkpoint_task
from delinea.tasks.base import read_checkpoint
from delinea.tasks.export import is_model_folder, load_into, read_model_folder

#: Names accepted by ``--data`` (case-insensitive), besides the class names.
DATA_ALIASES: dict[str, str] = {name: cls.__name__ for name, cls in DATAMODULES.items()} | {
    "atlas": "Atlas8kDataModule", "atlas-8k": "Atlas8kDataModule", "abdomenatlas": "Atlas8kDataModule",
    "cirrmri600+": "CirrMRI600DataModule", "cirrmri": "CirrMRI600DataModule", "pansegdata": "PanSegDataModule",
}  # fmt: skip
CKPT_NAMES = ("--ckpt_path", "--ckpt")


class CLIError(UserError):
    """A command-line error reported as one line with exit code 2."""


def _take(argv: list[str], names: tuple[str, ...]) -> str | None:
    """Remove every ``--name value`` / ``--name=value`` of ``names`` from argv; the last value, or None."""
    value, i = None, 0
    while i < len(argv):
        name, eq, inline = argv[i].partition("=")
        if name in names:
            value = inline if eq else (argv[i + 1] if i + 1 < len(argv) else "")
            del argv[i : i + (1 if eq else 2)]
            continue
        i += 1
    return value


def _value(argv: list[str], name: str, replace: str | None = None) -> str | None:
    """The last value of ``--name`` in argv, replaced in place by ``replace`` if given."""
    value, where = None, None
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            value, where = argv[i + 1], (i + 1, False)
        elif arg.startswith(name + "="):
            value, where = arg.split("=", 1)[1], (i, True)
    if replace is not None and where is not None:
        argv[where[0]] = f"{name}={replace}" if where[1] else replace
    return value


def read_checkpoint_task(path: Path) -> tuple[str, dict[str, Any]]:
    """The registered task name and hyperparameters a delinea checkpoint (read weights-only and memory-mapped: the
    tensors are not loaded) or model folder was saved with.

    Raises:
        CheckpointError: the file is not a checkpoint, or names no task (or one delinea does not register).
    """
    checkpoint = read_checkpoint(path, mmap=True)
    if "state_dict" not in checkpoint:
        raise CLIError(f"{path} is not a delinea checkpoint: no state_dict")
    task = checkpoint_task(checkpoint, path)
    return task.__name__, checkpoint_hparams(checkpoint, path)


def check_fits(model: LightningModule, path: Path) -> None:
    """Refuse a checkpoint whose weights do not fit the model built from the options (read memory-mapped), naming
    the options that differ from the ones it was trained with.

    Raises:
        CLIError: a weight's shape differs, or the checkpoint lacks or adds trainable weights.
    """
    checkpoint = read_checkpoint(path, mmap=True)
    state, own = checkpoint.get("state_dict", {}), model.state_dict()
    frozen = model.frozen_keys() if hasattr(model, "frozen_keys") else set()
    wrong = [k for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    wrong += [k for k in state if k not in own] + [k for k in own if k not in state and k not in frozen]
    if not wrong:
        return
    saved = checkpoint.get("hyper_parameters", {})
    differ = [f"{k}={model.hparams[k]!r} (checkpoint: {saved[k]!r})" for k in saved
              if k in model.hparams and saved[k] != model.hparams[k]]  # fmt: skip
    raise CLIError(
        f"checkpoint {path} does not fit the model the options build ({len(wrong)} weights differ, e.g. {wrong[0]})"
        + (f"; options that differ from the checkpoint's: {', '.join(differ)}" if differ else "")
    )


def _flat(options: Any, prefix: str = "") -> dict[str, Any]:
    """Nested options as ``{"model.init_args.lr": 0.001, ...}``."""
    if isinstance(options, dict):
        return {k: v for key, value in options.items() for k, v in _flat(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): options}


def find_last_checkpoint(trainer: Trainer, options: dict[str, Any] | None = None) -> Path:
    """The ``last*.ckpt`` that ``--ckpt_path last`` resumes: the newest among those saved by a run with ``options``
    (the model, data and seed a run records in its checkpoints, :class:`~delinea.callbacks.RunOptions`), found in
    the checkpoint callbacks' folders, the loggers' folders (Lightning's
    ``<root>/lightning_logs/version_N/checkpoints``) and the run's ``default_root_dir``, up to four folders deep.
    A run that changed options is not resumed under them without its path being given; a checkpoint that records
    no options (saved before delinea did) is resumed only when it is the only one.

    Raises:
        CLIError: there is none, or none saved with these options; a run is never silently started over or mixed.
    """
    roots = {Path(trainer.default_root_dir)}
    roots |= {Path(c.dirpath) for c in trainer.checkpoint_callbacks if getattr(c, "dirpath", None)}
    roots |= {Path(root) for logger in trainer.loggers if (root := getattr(logger, "root_dir", None))}
    patterns = ["/".join(["*"] * depth + ["last*.ckpt"]) for depth in range(5)]
    found = {p for root in roots if root.is_dir() for pattern in patterns for p in root.glob(pattern) if p.is_file()}
    where = ", ".join(sorted(str(r) for r in roots))
    if not found:
        raise CLIError(
            f"--ckpt_path last: no last.ckpt under {where}; start a new run without it, or give the checkpoint's path"
        )

    def newest(paths: Any) -> Path:
        return max(paths, key=lambda p: p.stat().st_mtime)

    if options is None:
        return newest(found)
    recorded = {path: read_checkpoint(path, mmap=True).get("delinea_options") for path in found}
    matching = [path for path, saved in recorded.items() if saved == options]
    if matching:
        return newest(matching)
    if len(found) == 1 and None in recorded.values():
        return next(iter(found))
    if all(saved is None for saved in recorded.values()):
        raise CLIError(
            f"--ckpt_path last: {len(found)} runs under {where} hold a last.ckpt "
            f"({', '.join(sorted(map(str, found)))}) and none records its options; give the path of the one to resume"
        )
    current = _flat(options)

    def differences(saved: dict[str, Any]) -> list[str]:
        theirs = _flat(saved)
        keys = sorted(k for k in current.keys() | theirs.keys() if current.get(k) != theirs.get(k))
        return [f"{k}={current.get(k)!r} (run: {theirs.get(k)!r})" for k in keys]

    nearest, saved = min(((p, s) for p, s in recorded.items() if s is not None), key=lambda i: len(differences(i[1])))
    raise CLIError(
        f"--ckpt_path last: no run under {where} was saved with these options; the nearest, {nearest}, differs in "
        f"{', '.join(differences(saved)[:3])}; give that checkpoint's path to resume it under these options, or run "
        "with the options it records"
    )


def claim_version(logger: Any) -> None:
    """Give a TensorBoard or CSV logger that would pick the next free ``version_N`` one taken atomically (``mkdir``
    fails if another run made it first), so that runs started together in one folder never share one: Lightning
    lists the folders, and two runs starting within that moment both took ``version_0``."""
    root = getattr(logger, "root_dir", None)
    if getattr(logger, "_version", 0) is not None or root is None or "://" in str(root):
        return
    Path(root).mkdir(parents=True, exist_ok=True)
    version = logger._get_next_version()
    while True:
        try:
            (Path(root) / f"version_{version}").mkdir()
            break
        except FileExistsError:
            version += 1
    logger._version = version


class NumberedConfigSaver(SaveConfigCallback):
    """Saves the run's full config beside its logs, never over an earlier one: when ``config.yaml`` is there (a
    resumed run, or runs sharing a folder without a logger) the next free ``config-<n>.yaml`` is used."""

    config_filename: str

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        name = None
        log_dir = trainer.log_dir  # a collective under DDP: every rank asks, before rank zero looks at files
        if trainer.is_global_zero and log_dir is not None:
            stem, suffix = Path(self.config_filename).stem, Path(self.config_filename).suffix
            name, n = self.config_filename, 0
            while (Path(log_dir) / name).exists():
                n += 1
                name = f"{stem}-{n}{suffix}"
        self.config_filename = trainer.strategy.broadcast(name) or self.config_filename
        super().setup(trainer, pl_module, stage)


def check_config_files(argv: list[str]) -> None:
    """Read every YAML file argv names (``--config FILE``, ``--trainer FILE``, ...) before jsonargparse does, so that
    a syntax error names the file rather than ``<unicode string>``.

    Raises:
        CLIError: a ``--config`` file that does not exist, or a YAML file that does not parse.
    """
    for i, arg in enumerate(argv):
        name, eq, inline = arg.partition("=")
        value = inline if eq else (argv[i + 1] if i + 1 < len(argv) and name.startswith("-") else None)
        if value is None or not name.startswith("-"):
            continue
        path = Path(value)
        if name in ("--config", "-c") and not path.exists() and value.lower().endswith((".yaml", ".yml")):
            raise CLIError(f"--config {value}: no such file")
        if not value.lower().endswith((".yaml", ".yml")) or not path.is_file():
            continue
        try:
            yaml.safe_load(path.read_text())
        except yaml.MarkedYAMLError as error:
            mark = error.problem_mark
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            raise CLIError(f"{name} {value}: invalid YAML{where}: {error.problem}") from None
        except (yaml.YAMLError, OSError, UnicodeDecodeError) as error:
            raise CLIError(f"{name} {value}: cannot read as YAML ({type(error).__name__}: {error})") from None


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
    """LightningCLI with dataset names, checkpoint defaults, ``last`` resolution and the output callbacks."""

    checkpoint: Path | str | None = None

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
        data = _value(argv, "--data")
        if data is not None and data.lower() in DATA_ALIASES:
            _value(argv, "--data", replace=DATA_ALIASES[data.lower()])
        elif data is not None and data not in DATA_ALIASES.values() and "." not in data:
            raise CLIError(f"unknown dataset {data!r}; choose one of {', '.join(DATAMODULES)}")
        if not argv or argv[0] not in self.subcommands():
            return argv
        checkpoint = _take(argv, CKPT_NAMES)
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
        self.checkpoint_task, hparams = read_checkpoint_task(path)
        explicit = _value(argv, "--model")
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

    def _checkpoint_path(self) -> str | None:
        """The checkpoint for the trainer, checked against the model; a model folder is loaded into the model here
        instead."""
        if self.checkpoint == "last":
            self.checkpoint = find_last_checkpoint(self.trainer, self.run_options())
        if self.checkpoint is not None and is_model_folder(self.checkpoint):
            load_into(self.model, read_model_folder(self.checkpoint), self.checkpoint)
            return None
        if self.checkpoint is not None:
            check_fits(self.model, Path(self.checkpoint))
        return None if self.checkpoint is None else str(self.checkpoint)

    # The subcommands, with the checkpoint this CLI took out of argv, loaded weights-only whatever the environment
    # says (TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD cannot switch it off).
    def fit(self, model: LightningModule, datamodule: LightningDataModule | None = None, **kwargs: Any) -> None:
        kwargs.update(ckpt_path=self._checkpoint_path(), weights_only=True)
        if kwargs["ckpt_path"] is None and isinstance(model, SegmentationTask):
            model.start_from_parent()  # a bad init_from stops the run before the data are read
        self.trainer.fit(model, datamodule=datamodule, **kwargs)

    def validate(self, model: LightningModule, datamodule: LightningDataModule | None = None, **kwargs: Any) -> None:
        self.trainer.validate(
            model, datamodule=datamodule, **{**kwargs, "ckpt_path": self._checkpoint_path(), "weights_only": True}
        )

    def test(self, model: LightningModule, datamodule: LightningDataModule | None = None, **kwargs: Any) -> None:
        self.trainer.test(
            model, datamodule=datamodule, **{**kwargs, "ckpt_path": self._checkpoint_path(), "weights_only": True}
        )

    def predict(
        self,
        model: LightningModule,
        datamodule: LightningDataModule | None = None,
        return_predictions: bool | None = None,
        **kwargs: Any,
    ) -> None:
        """``trainer.predict`` that keeps no predictions in memory unless asked: the writer has them on disk."""
        self.trainer.predict(
            model,
            datamodule=datamodule,
            return_predictions=bool(return_predictions),
            **{**kwargs, "ckpt_path": self._checkpoint_path(), "weights_only": True},
        )


def _plain(value: Any) -> Any:
    """JSON for the values of a parsed config: namespaces as dicts, anything else (paths) as text."""
    return value.as_dict() if hasattr(value, "as_dict") else str(value)


def user_message(error: BaseException) -> str:
    """The message of the delinea error inside jsonargparse's wrapping, else jsonargparse's own last line."""
    current: BaseException | None = error
    while current is not None:
        if isinstance(current, (UserError, FileNotFoundError)):
            return str(current).strip()
        current = current.__cause__ or current.__context__
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    listed = [line[2:] for line in lines if line.startswith("- ") and "NoneType" not in line]
    return listed[0] if listed else (lines[-1] if lines else repr(error))


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


#: Errors a user can cause and fix: one line and exit code 2, never a traceback.
USER_ERRORS = (UserError, FileExistsError, NotADirectoryError, PermissionError)


def report(program: str, error: BaseException) -> None:
    """Print a user error as one line and exit with code 2. An error raised in a loader worker arrives wrapped in
    the worker's traceback; its own message is that traceback's last line."""
    message = str(error).strip()
    if "Original Traceback" in message:
        message = message.splitlines()[-1].split(": ", 1)[-1]
    print(f"{program}: error: {message}", file=sys.stderr)
    raise SystemExit(2) from None


def main(args: ArgsType = None) -> None:
    """Run the ``delinea`` command; ``args`` lets tests call it in-process. User errors exit with code 2.
    ``delinea preprocess`` writes a dataset's slice store (:mod:`delinea.preprocess`)."""
    argv = list(sys.argv[1:] if args is None else args)
    if argv[:1] == ["preprocess"]:
        from delinea.preprocess import main as preprocess

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
