"""Small configurations of every registered model, so that a test over the whole registry runs in seconds on
2 cores (``tests/test_models.py``, ``tests/test_model_contract.py``). Not a test module: imported by name
(``pythonpath = ["tests"]`` in pyproject.toml)."""

from __future__ import annotations

from typing import Any

SMALL: dict[str, dict[str, Any]] = {
    "cscnet": dict(depth=3, filters=16, kernel_size=7, stride=4),
    "dncnn": dict(depth=5, features=16),
    "lista": dict(patch_size=4, atoms=16, depth=3, tied=False),
    "deep_ksvd": dict(patch_size=4, atoms=16, depth=2),
    "cdlnet": dict(depth=3, filters=8, kernel_size=5),
    "dcea_c": dict(depth=3, filters=16, kernel_size=7, stride=4),
    "dcea_uc": dict(depth=3, filters=16, kernel_size=7, stride=4),
    "lidia": dict(window=7, neighbours=6, width=8, weight_layers=2),
    "pgnet": dict(depth=3, filters=8, kernel_size=5),
    "admmnet": dict(depth=3),
    "vdsr": dict(depth=4, features=8),
}
