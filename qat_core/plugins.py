"""Which model factories may run, and running one so that it cannot hang or end the process.

A config is data: the ``model`` field names a factory ``package.module:callable``, and naming it is
not enough to run it. A factory runs only when the user chose it: an installed package declares it
as an entry point in group ``qat_studio.models`` (installing the package is the choice, as with
pytest plugins), or the user allows its top-level package (``--allow-plugin PKG`` on the command
line, ``QAT_STUDIO_PLUGINS=PKG,...`` in the environment, which child processes inherit). The
standard library and QAT Studio itself are never factories. Anything else is refused before it is
imported.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from importlib import metadata
from typing import Any, TypeVar

from qat_core.errors import ConfigError, PluginError

GROUP = "qat_studio.models"  # entry point group of the factories installed packages declare
ALLOW_ENV = "QAT_STUDIO_PLUGINS"  # comma-separated top-level packages the user allows
TIMEOUT_ENV = "QAT_STUDIO_PLUGIN_TIMEOUT"  # seconds a factory may take
DEFAULT_TIMEOUT = 300.0
NEVER = frozenset(sys.stdlib_module_names) | {"builtins", "__main__", "qat_core"}
HOW_TO_ALLOW = (f"allow its package: --allow-plugin {{package}} (qat-studio) or {ALLOW_ENV}={{package}} in the "
                f"environment (the app too), or install a package that declares it as an entry point in group {GROUP}")

T = TypeVar("T")


def allowed_packages() -> list[str]:
    """The packages the user allowed through ``QAT_STUDIO_PLUGINS`` (and ``--allow-plugin``)."""
    return [p.strip() for p in os.environ.get(ALLOW_ENV, "").split(",") if p.strip()]


def allow(packages: list[str]) -> None:
    """Allow ``packages`` in this process and the processes it starts (runs, sweep workers)."""
    os.environ[ALLOW_ENV] = ",".join(dict.fromkeys(allowed_packages() + [p.strip() for p in packages if p.strip()]))


def entry_points() -> dict[str, str]:
    """``package.module:callable`` → the entry point naming it (``name (distribution)``) in group ``GROUP``."""
    found = {}
    for ep in metadata.entry_points(group=GROUP):
        dist = getattr(ep, "dist", None)
        found[f"{ep.module}:{ep.attr}"] = f"{ep.name} ({dist.name})" if dist is not None else ep.name
    return found


def check(factory: str) -> None:
    """Refuse ``factory`` (``package.module:callable``) unless the user chose it; nothing is imported."""
    package = factory.partition(":")[0].split(".")[0]
    if package == "qat_core":
        raise PluginError(f"plugin {factory!r} is part of QAT Studio itself; a plugin is your own module whose "
                          "factory returns (model, train_loader, test_loader)")
    if package in NEVER:
        raise PluginError(f"plugin {factory!r} is in Python's standard library, which is never a model factory; a "
                          "plugin is your own module whose factory returns (model, train_loader, test_loader)")
    if package in allowed_packages() or factory in entry_points():
        return
    raise PluginError(f"plugin {factory!r} is not allowed: a config names a model factory, but only you decide which "
                      f"code runs. If you trust it, {HOW_TO_ALLOW.format(package=package)}")


def describe() -> str:
    """What may run as a factory here, and how to allow more (for the Model page)."""
    packages, points = allowed_packages(), entry_points()
    allowed = ([f"packages {', '.join(packages)}"] if packages else []) + \
              ([f"entry points {', '.join(sorted(points))}"] if points else [])
    now = f"Plugins allowed here: {'; '.join(allowed)}." if allowed else "No plugin is allowed here."
    return f"{now} To run another factory, {HOW_TO_ALLOW.format(package='PKG')}, then restart the app."


def time_limit() -> float:
    text = os.environ.get(TIMEOUT_ENV)
    if text is None:
        return DEFAULT_TIMEOUT
    try:
        seconds = float(text)
    except ValueError:
        seconds = 0.0
    if not 0 < seconds < float("inf"):
        raise ConfigError(f"{TIMEOUT_ENV} must be a number of seconds above 0, got {text!r}")
    return seconds


class _Exit(BaseException):
    """``os._exit`` called by a plugin: unwinds its thread (a BaseException, so ``except Exception`` keeps it)."""


_guarded: dict[int, dict[str, Any]] = {}  # plugin thread id → its outcome: its os._exit unwinds instead
_real_exit = os._exit


def _exit(code: int) -> None:
    outcome = _guarded.get(threading.get_ident())
    if outcome is None or outcome["pid"] != os.getpid():  # not a plugin's thread (or a process it forked)
        _real_exit(code)
    outcome["exit"] = code  # reported even where the plugin catches the exception
    raise _Exit(code)


def run(factory: str, fn: Callable[[], T]) -> T:
    """``fn()``, the plugin's own code (import, factory, first batch), within the time limit, its faults as
    PluginErrors: an exception, ``sys.exit``, ``os._exit``, a hang. It runs in a daemon thread, so a factory
    that never returns is left behind and does not keep the process alive."""
    limit = time_limit()
    outcome: dict[str, Any] = {"pid": os.getpid()}

    def target() -> None:
        _guarded[threading.get_ident()] = outcome
        try:
            outcome["value"] = fn()
        except BaseException as err:  # the plugin's, whatever it is: reported below
            outcome["error"] = err
        finally:
            del _guarded[threading.get_ident()]

    os._exit = _exit  # once per process; it passes every call but a plugin thread's through
    thread = threading.Thread(target=target, name=f"plugin {factory}", daemon=True)
    thread.start()
    thread.join(limit)
    if thread.is_alive():
        raise PluginError(f"plugin factory {factory} did not return within {limit:g} s; make it faster, or raise the "
                          f"limit with {TIMEOUT_ENV}=SECONDS")
    err = outcome.get("error")
    if "exit" in outcome or isinstance(err, SystemExit):
        how = f"os._exit({outcome['exit']!r})" if "exit" in outcome else f"SystemExit: {err.code!r}"
        raise PluginError(f"plugin factory {factory} tried to end the process ({how}); it must return "
                          "(model, train_loader, test_loader)") from None
    if err is None:
        return outcome["value"]
    if isinstance(err, PluginError | KeyboardInterrupt):
        raise err
    hint = " (QAT Studio gives a plugin no input: stdin is empty)" if isinstance(err, EOFError) else ""
    raise PluginError(f"plugin factory {factory} raised {type(err).__name__}: {err}{hint}") from None
