"""The folders of a run: which ``last.ckpt`` ``--ckpt_path last`` resumes, a ``version_N`` folder claimed atomically
per run, and run configs saved without overwriting an earlier one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import SaveConfigCallback

from delinea.cli import CLIError
from delinea.tasks.checkpoints import read_checkpoint


def _flat(options: Any, prefix: str = "") -> dict[str, Any]:
    """Nested options as ``{"model.init_args.lr": 0.001, ...}``."""
    if isinstance(options, dict):
        return {k: v for key, value in options.items() for k, v in _flat(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): options}


def find_last_checkpoint(trainer: Trainer, options: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    """The ``last*.ckpt`` that ``--ckpt_path last`` resumes, with its contents (read once, weights-only and
    memory-mapped, the copy the trainer resumes from): the newest among those saved by a run with ``options``
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

    read = {path: read_checkpoint(path, mmap=True) for path in found}
    recorded = {path: checkpoint.get("delinea_options") for path, checkpoint in read.items()}
    matching = [path for path, saved in recorded.items() if saved == options]
    if matching:
        chosen = max(matching, key=lambda p: p.stat().st_mtime)
        return chosen, read[chosen]
    if len(found) == 1 and None in recorded.values():
        chosen = next(iter(found))
        return chosen, read[chosen]
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
    # Lightning has no public way to give a logger its version once it is built: its private ``_version`` (None
    # until the first use) and ``_get_next_version`` are read and set here.
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
