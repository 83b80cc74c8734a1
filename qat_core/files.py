"""Reading a file the user (or a damaged workspace) supplies: typed and bounded before anything parses it.

A FIFO would block a plain ``open``/``read`` forever, a link to ``/dev/zero`` never ends, and a
directory or device in place of a file makes parsers fail with errors that name neither the file
nor the fix. Every read of a file QAT Studio did not just write itself goes through :func:`open_regular`:
opened without blocking and checked to be a regular file, then read to at most ``limit`` bytes
(:func:`read_bytes` and the readers over it; :func:`read_tail` for logs) or handed, size-checked, to a
reader that takes a file object (``torch.load``, pandas).
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any, BinaryIO

from qat_core.errors import ConfigError, QATError

KB, MB, GB = 1 << 10, 1 << 20, 1 << 30
JSON_LIMIT = 16 * MB  # a run record, a result, a sweep state: KBs in practice


def _clip(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _refuse(error: type[QATError], what: str, path: str | Path, reason: str) -> QATError:
    err = error(f"{what} {_clip(str(path))} {reason}")
    err.reason = reason  # type: ignore[attr-defined]  # for callers that phrase it themselves ("X is damaged (reason)")
    return err


def open_regular(path: str | Path, what: str, error: type[QATError] = QATError, limit: int | None = None) -> BinaryIO:
    """``path`` opened for reading (binary) once it is known to be a regular file, of at most ``limit``
    bytes by its size when given; else ``error`` naming ``what`` and the path. For readers that take a
    file object (torch.load, pandas); the caller closes it."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO opens at once, unread
    except FileNotFoundError:
        raise _refuse(error, what, path, "does not exist") from None
    except (OSError, ValueError) as err:  # ValueError: a NUL character in the name
        raise _refuse(error, what, path, f"cannot be opened: {getattr(err, 'strerror', None) or err}") from None
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise _refuse(error, what, path, "is a directory, not a file")
        if not stat.S_ISREG(info.st_mode):
            raise _refuse(error, what, path, "is not a regular file (a device, pipe or socket)")
        if limit is not None and info.st_size > limit:
            raise _refuse(error, what, path, f"is over {_size(limit)}; is it the right file?")
        os.set_blocking(fd, True)  # a regular file never blocks; some readers check the flag
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_bytes(path: str | Path, limit: int, what: str, error: type[QATError] = QATError) -> bytes:
    """The contents of a regular file of at most ``limit`` bytes, else ``error`` naming ``what`` and the fix.

    ``what`` says what the file should be ("config file", "run record"); the message adds the path, and
    the error's ``reason`` attribute is the message without them.
    """
    with open_regular(path, what, error) as f:
        try:
            data = f.read(limit + 1)  # one byte more than allowed tells a file that is too large (or one that grew)
        except OSError as err:
            raise _refuse(error, what, path, f"cannot be read: {err.strerror or err}") from None
    if len(data) > limit:
        raise _refuse(error, what, path, f"is over {_size(limit)}; is it the right file?")
    return data


def read_tail(path: str | Path, limit: int, what: str, error: type[QATError] = QATError) -> bytes:
    """The last ``limit`` bytes of a regular file (all of a smaller one), from the start of a line: for
    logs that grow without bound, where the newest lines matter."""
    with open_regular(path, what, error) as f:
        try:
            size = os.fstat(f.fileno()).st_size
            if size > limit:
                f.seek(size - limit - 1)
            data = f.read(limit + 1)
        except OSError as err:
            raise _refuse(error, what, path, f"cannot be read: {err.strerror or err}") from None
    if size > limit:  # started inside a line (or just after one): keep only whole lines
        data = data[data.find(b"\n") + 1:] if b"\n" in data else b""
    return data


def read_text(path: str | Path, limit: int, what: str, error: type[QATError] = QATError) -> str:
    data = read_bytes(path, limit, what, error)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise _refuse(error, what, path, "is not UTF-8 text") from None


def read_json(path: str | Path, what: str, error: type[QATError] = QATError, limit: int = JSON_LIMIT) -> Any:
    """A JSON file's value (any shape: the caller checks it), refused as ``error`` when the file is not
    a small regular file of valid JSON."""
    text = read_text(path, limit, what, error)
    try:
        return _loads(text)
    except ValueError as err:
        raise _refuse(error, what, path, f"is not valid JSON ({err})") from None


def parse_json(text: str, where: str, error: type[QATError] = QATError) -> Any:
    try:
        return _loads(text)
    except ValueError as err:
        raise error(f"{where} is not valid JSON ({err}): it is damaged") from None


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as err:  # RecursionError: nested past Python's limit (damage, not data)
        raise ValueError(_clip(str(err), 120)) from None


def output_file(path: str | Path, what: str) -> Path:
    """A path the user chose for a file QAT Studio writes (``what``: "report"): a regular file, replaced
    whole, or a new file in an existing folder. A device, FIFO or socket is refused (the file would be
    renamed over ``/dev/full`` itself), as is a directory; no folder is created for a mistyped path."""
    path = Path(path)
    name = _clip(str(path))
    try:
        mode = os.stat(path).st_mode  # through a link: its target is what would be replaced
    except FileNotFoundError:
        if not path.parent.is_dir():
            raise ConfigError(f"cannot write the {what} to {name}: the folder {_clip(str(path.parent))} does not "
                              "exist; create it first, or give a file in an existing folder") from None
        return path
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot write the {what} to {name}: {getattr(err, 'strerror', None) or err}") from None
    if stat.S_ISDIR(mode):
        raise ConfigError(f"{name} is a directory; give a file name for the {what} (in it, or elsewhere)")
    if not stat.S_ISREG(mode):
        raise ConfigError(f"{name} is not a regular file (a device, pipe or socket); give a file name for the {what} "
                          "in an existing folder")
    return Path(os.path.realpath(path))


def _size(n: int) -> str:
    return next((f"{n / unit:g} {name}" for unit, name in ((GB, "GB"), (MB, "MB"), (KB, "KB")) if n >= unit), f"{n} bytes")
