"""Whether W&B can be reached with credentials here, decided without importing wandb (fast) and without
keeping or logging the key: the question ``wandb.mode=auto`` (trainers/tracking.py) and a ``wandb:`` checkpoint
reference (trainers/storage.py) both ask.

A key is available when the wandb library would find one: ``WANDB_API_KEY`` (or ``WANDB_IDENTITY_TOKEN_FILE``)
in the environment, or a netrc entry for the W&B host -- where ``wandb login`` saves the key. The netrc file is
the one wandb reads (``$NETRC``, else ``~/.netrc``, else ``~/_netrc``); the host is that of ``WANDB_BASE_URL``,
else W&B's cloud (api.wandb.ai, or the api.forge.coreweave.com proxy that wandb >= 0.31 defaults to).
"""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from urllib.parse import urlsplit

CLOUD_HOSTS = ("api.wandb.ai", "api.forge.coreweave.com")


def netrc_file() -> Path | None:
    """The netrc file wandb reads, or None when there is none."""
    if os.environ.get("NETRC"):
        return Path(os.environ["NETRC"]).expanduser()
    for name in ("~/.netrc", "~/_netrc"):
        if Path(name).expanduser().exists():
            return Path(name).expanduser()
    return None


def api_key_available() -> bool:
    """Whether wandb would find an API key here (module docstring). The key's value is only tested for
    being non-empty."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    path = netrc_file()
    base = os.environ.get("WANDB_BASE_URL", "")
    hosts = (urlsplit(base).netloc,) if base else CLOUD_HOSTS
    try:
        entries = netrc.netrc(str(path)) if path is not None else None
    except (OSError, netrc.NetrcParseError):
        return False
    return entries is not None and any((entries.authenticators(h) or ("", "", ""))[2] for h in hosts)
