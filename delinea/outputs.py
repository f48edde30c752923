"""Writing outputs whole or not at all, and checking before any work that they can be written.

Every file delinea writes goes through :func:`atomic_path`: it is written beside its target under a temporary name,
flushed to disk and renamed over the target only when whole, so a kill or a full disk leaves the earlier file or
none, never part of one. :func:`check_writable` refuses, before a command computes anything, an output folder that
cannot be written or outputs that exist.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from delinea.errors import OutputError, UserError

__all__ = [
    "atomic_files",
    "atomic_path",
    "check_writable",
    "remove_stale_temporaries",
    "write_atomic",
]

#: A temporary file of :func:`atomic_path`: ``.<target name>.tmp-<host>-<pid><suffix>`` (``<host>-`` is missing in
#: the checkpoints of delinea 0.x before it, ``.last.ckpt.tmp-<pid>``).
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.tmp-(?:(?P<host>[A-Za-z0-9_]+)-)?(?P<pid>\d+)(?P<suffix>\.[^/]*)?$")
#: Errors of a writer that mean the disk (or the user's quota, or the file-size limit) is full.
_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
#: Folders whose stale temporary files this process has removed already.
_CLEANED: set[str] = set()


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname()) or "host"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: alive
        return True
    return True


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Remove the temporary files (and staging folders of :func:`atomic_files`) of :func:`atomic_path` that killed
    processes of this machine left in ``folder``;
    a live process's (or another machine's, on a shared filesystem) are left alone. Returns those removed."""
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        match = _TEMPORARY.match(entry.name)
        if match is None or match["host"] not in (None, _host()) or _alive(int(match["pid"])):
            continue
        with contextlib.suppress(OSError):
            if entry.is_dir(follow_symlinks=False):  # the staging folder of atomic_files
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
            removed.append(Path(entry.path))
    return removed


def _os_error(error: BaseException) -> OSError | None:
    """The OSError behind ``error`` (torch wraps a failed write in a RuntimeError), if any."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _fsync(path: Path) -> None:
    """Flush a file, or a folder's entries (where the system allows it), to the disk."""
    with contextlib.suppress(OSError):
        handle = os.open(path, os.O_RDONLY)
        try:
            os.fsync(handle)
        finally:
            os.close(handle)


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = "", fsync: bool = True) -> Iterator[Path]:
    """Write ``path`` whole or not at all: yields a temporary path beside it to write, then flushes that file to the
    disk and renames it over ``path`` (``os.replace``, atomic within a folder). On any error, or a kill, the target
    keeps its earlier content (or stays absent); the temporary file is removed on errors, and the first write of a
    later process into the folder removes one left by a kill (:func:`remove_stale_temporaries`).

    Args:
        path: the target; its folder is created.
        suffix: appended to the temporary name, for writers that choose a format by extension (``.nii.gz``).
        fsync: flush to the disk before the rename (off for caches, which may lose a file but never hold half a one).

    Raises:
        OutputError: writing failed with an operating-system error (a full disk, a read-only folder, a folder that
            is a file); the message names the file and says that the earlier one is intact.
    """
    path = Path(path)
    folder = path.parent
    _make_folder(folder, path)
    if str(folder) not in _CLEANED:
        remove_stale_temporaries(folder)
        _CLEANED.add(str(folder))
    existed = path.exists()
    temporary = folder / f".{path.name}.tmp-{_host()}-{os.getpid()}{suffix}"
    try:
        yield temporary
        if fsync:
            _fsync(temporary)
        os.replace(temporary, path)
        if fsync:
            _fsync(folder)
    except BaseException as error:
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
        cause = _os_error(error)
        if cause is None or isinstance(error, UserError):
            raise
        reason = "the disk is full" if cause.errno in _FULL else "it cannot be written"
        kept = "the earlier file there is intact" if existed else "nothing was left in its place"
        raise OutputError(f"{path}: not written, {reason} ({_describe(cause)}); {kept}") from None


def _describe(error: OSError) -> str:
    """``No space left on device [ENOSPC]``."""
    code = errno.errorcode.get(error.errno or 0)
    return f"{error.strerror or error}" + (f" [{code}]" if code else "")


def _make_folder(folder: Path, target: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        blocked = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
        why = f"{blocked} is a file, not a folder" if blocked is not None else _describe(error)
        raise OutputError(f"{target}: not written, its folder cannot be created ({why})") from None


@contextlib.contextmanager
def atomic_files(folder: str | Path, stale: Callable[[str], bool]) -> Iterator[Path]:
    """Write the files of a folder (a model's weights and config) each whole: yields a staging folder beside
    ``folder`` to write them into; then each is moved into ``folder`` by :func:`atomic_path`, ``config.json`` last,
    and the files of ``folder`` that ``stale`` names and this write did not replace (an earlier save's other shards)
    are removed. A kill between two files leaves files that disagree, which the readers refuse
    (:func:`delinea.models.weights.read_weights`), never part of one.

    Raises:
        OutputError: as :func:`atomic_path`.
    """
    folder = Path(folder)
    staging = folder.parent / f".{folder.name}.tmp-{_host()}-{os.getpid()}"
    _make_folder(folder.parent, folder)
    remove_stale_temporaries(folder.parent)
    shutil.rmtree(staging, ignore_errors=True)
    try:
        try:
            staging.mkdir()
        except OSError as error:
            raise OutputError(f"{folder}: not written ({_describe(error)})") from None
        yield staging
        names = sorted((p.name for p in staging.iterdir()), key=lambda name: (name == "config.json", name))
        for name in names:
            with atomic_path(folder / name) as temporary:
                os.replace(staging / name, temporary)
        for old in folder.iterdir():
            if old.is_file() and old.name not in names and stale(old.name):
                old.unlink()
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write text or bytes to ``path`` whole or not at all (:func:`atomic_path`)."""
    with atomic_path(path) as temporary:
        if isinstance(data, str):
            temporary.write_text(data)
        else:
            temporary.write_bytes(data)
    return Path(path)


def check_writable(folder: Path, targets: Sequence[Path], overwrite: bool) -> None:
    """Refuse before any work: an output folder that is a file or cannot be written, or existing targets.

    Raises:
        FileExistsError: a target exists and ``overwrite`` is False (the first few are named).
        NotADirectoryError: ``folder`` (or a parent) is a file.
        PermissionError: ``folder`` cannot be created or written.
    """
    for parent in (folder, *folder.parents):
        if parent.exists() and not parent.is_dir():
            raise NotADirectoryError(f"output {folder}: {parent} is a file, not a folder")
    existing = [p for p in targets if p.exists()]
    if existing and not overwrite:
        names = ", ".join(str(p) for p in existing[:3]) + (
            f" and {len(existing) - 3} more" if len(existing) > 3 else ""
        )
        raise FileExistsError(f"{names} exist(s); pass --overwrite true to replace, or choose another --output")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise PermissionError(f"output {folder} cannot be written ({error.strerror or error})") from None
