"""Reading a file the user (or a damaged workspace) supplies: typed and bounded before anything parses it.

A FIFO would block a plain ``open``/``read`` forever, a link to ``/dev/zero`` never ends, and a
directory or device in place of a file makes parsers fail with errors that name neither the file
nor the fix. Every read of a file QAT Studio did not just write itself goes through :func:`read_bytes`:
opened without blocking, checked to be a regular file, read to at most ``limit`` bytes.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from qat_core.errors import ConfigError, QATError

KB, MB = 1 << 10, 1 << 20
JSON_LIMIT = 16 * MB  # a run record, a result, a sweep state: KBs in practice


def _clip(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def read_bytes(path: str | Path, limit: int, what: str, error: type[QATError] = QATError) -> bytes:
    """The contents of a regular file of at most ``limit`` bytes, else ``error`` naming ``what`` and the fix.

    ``what`` says what the file should be ("config file", "run record"); the message adds the path.
    """
    name = _clip(str(path))
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO opens at once, unread
    except FileNotFoundError:
        raise error(f"{what} {name} does not exist") from None
    except (OSError, ValueError) as err:  # ValueError: a NUL character in the name
        raise error(f"{what} {name} cannot be opened: {getattr(err, 'strerror', None) or err}") from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise error(f"{what} {name} is a directory, not a file")
        if not stat.S_ISREG(mode):
            raise error(f"{what} {name} is not a regular file (a device, pipe or socket)")
        with os.fdopen(fd, "rb") as f:
            fd = -1  # closed by the file object from here on
            data = f.read(limit + 1)  # one byte more than allowed tells a file that is too large
    except OSError as err:
        raise error(f"{what} {name} cannot be read: {err.strerror or err}") from None
    finally:
        if fd >= 0:
            os.close(fd)
    if len(data) > limit:
        raise error(f"{what} {name} is over {_size(limit)}; is it the right file?")
    return data


def read_text(path: str | Path, limit: int, what: str, error: type[QATError] = QATError) -> str:
    data = read_bytes(path, limit, what, error)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise error(f"{what} {_clip(str(path))} is not UTF-8 text") from None


def read_json(path: str | Path, what: str, error: type[QATError] = QATError, limit: int = JSON_LIMIT) -> Any:
    """A JSON file's value (any shape: the caller checks it), refused as ``error`` when the file is not
    a small regular file of valid JSON."""
    text = read_text(path, limit, what, error)
    return parse_json(text, f"{what} {_clip(str(path))}", error)


def parse_json(text: str, where: str, error: type[QATError] = QATError) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as err:  # RecursionError: nested past Python's limit (damage, not data)
        raise error(f"{where} is not valid JSON ({_clip(str(err), 120)}): it is damaged") from None


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
    return f"{n / MB:g} MB" if n >= MB else f"{n / KB:g} KB" if n >= KB else f"{n} bytes"
