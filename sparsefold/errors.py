"""Expected failures, in a module that imports nothing (every layer may raise them).

The CLI turns each into ONE line on stderr and the exit code below; a traceback is printed only with
``--debug`` (or ``SPARSEFOLD_DEBUG=1``). Raise them with a message that names the file or field and says
what to do, e.g. ``InputError("out.png: exists; pass --overwrite to replace it")``.

    =======================  ====  ==========================================================
    class                    exit  when
    =======================  ====  ==========================================================
    InputError               2     bad input: argument, config value, file, path, permission
    ConfigError(InputError)  2     a bad config value; one line that names the field
    RunError                 1     a run that started and then failed (diverged, disk full)
    =======================  ====  ==========================================================

:func:`check` is the field check every config dataclass uses in ``__post_init__``; it lives here (not in
:mod:`sparsefold.config`) so that the model files, which define their own config dataclasses, depend on
this module only and never on the config module, which itself imports the model registry.
"""

from __future__ import annotations


class SparsefoldError(Exception):
    """Base of the expected failures; ``exit_code`` is what the CLI exits with."""

    exit_code = 2


class InputError(SparsefoldError, ValueError):
    """Bad input the user can fix: an argument, a config value, an unreadable file, an unwritable path."""

    exit_code = 2


class RunError(SparsefoldError, RuntimeError):
    """A run that started and failed: training diverged, the disk filled up while checkpointing."""

    exit_code = 1


class ConfigError(InputError):
    """A bad configuration value (exit 2). ``str(err)`` is one line that names the field; the CLI prints
    it as ``config error: <field>: ...``."""


def check(ok: bool, name: str, msg: str) -> None:
    """Raise ``ConfigError("<name>: <msg>")`` unless ``ok`` (used in ``__post_init__``)."""
    if not ok:
        raise ConfigError(f"{name}: {msg}")
