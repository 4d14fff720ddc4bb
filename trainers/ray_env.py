"""The Ray settings every sparsefold run starts Ray with, in ONE place (``train``, ``sweep``, ``launch``).

Ray Train 2.60 reads them from the environment of the process that starts Ray (the driver), which passes
``RAY_TRAIN_*`` on to its Train controllers and workers; so they are set before Ray starts, as defaults that a
user's own environment (or ``launch --env``) overrides. Imports nothing heavy: the CLI reads it at start.
"""

from __future__ import annotations

import logging
import os
from typing import Any

RAY_TRAIN_ENV = {
    # The controller polls its workers for reports at this interval; Ray's 2 s default costs ~2 s per report
    # on small machines (measured with Ray 2.60).
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    # Ray Train's wait for a run's worker group: its placement group (resources the cluster may first have to
    # add: an autoscaler can take minutes for a GPU node; a sweep trial's workers wait for another trial's to
    # finish) and the worker processes' start. Ray's 60 s default fails such runs; 10 min covers them, and a
    # run that can never be placed still fails, naming this variable.
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "600",
}


def use_ray_train_env() -> None:
    """Set :data:`RAY_TRAIN_ENV` in this process's environment where the user has not set a value."""
    for name, value in RAY_TRAIN_ENV.items():
        os.environ.setdefault(name, value)


def verbose() -> bool:
    """``sparsefold --verbose`` (which sets ``SPARSEFOLD_VERBOSE=1``): Ray's own output on the terminal too."""
    return os.environ.get("SPARSEFOLD_VERBOSE", "") not in ("", "0")


def ray_init_args() -> dict[str, Any]:
    """The ``ray.init`` arguments of every sparsefold driver: quiet unless :func:`verbose`. The workers' output
    (Ray Train's "Reporting training result ...", the controller's, rank 1's) is not forwarded to the driver, nor
    are Ray's warnings logged there; it stays in the Ray session logs (a local run copies them into its run
    directory, ``ray_logs/``). What sparsefold itself says reaches the terminal through trainers/console.py."""
    loud = verbose()
    return {"log_to_driver": loud, "logging_level": logging.INFO if loud else logging.ERROR}
