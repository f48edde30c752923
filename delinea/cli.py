"""What the ``delinea`` commands share on the command line: dataset names for ``--data``, reading and rewriting
argv, and user errors as one line with exit code 2."""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from delinea.datamodules import DATAMODULES
from delinea.errors import UserError

#: Names accepted by ``--data`` (case-insensitive), besides the class names.
DATA_ALIASES: dict[str, str] = {name: cls.__name__ for name, cls in DATAMODULES.items()} | {
    "atlas": "Atlas8kDataModule", "atlas-8k": "Atlas8kDataModule", "abdomenatlas": "Atlas8kDataModule",
    "cirrmri600+": "CirrMRI600DataModule", "cirrmri": "CirrMRI600DataModule", "pansegdata": "PanSegDataModule",
}  # fmt: skip
CKPT_NAMES = ("--ckpt_path", "--ckpt")


class CLIError(UserError):
    """A command-line error reported as one line with exit code 2."""


def take_option(argv: list[str], names: tuple[str, ...]) -> str | None:
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


def option_value(argv: list[str], name: str, replace: str | None = None) -> str | None:
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
