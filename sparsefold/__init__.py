"""sparsefold: deep-unfolded sparse-coding denoisers, trained at scale.

Sub-packages (each a top-level folder of the repository, installed under this name):
``sparsefold.models`` (the zoo), ``sparsefold.datasets`` (shards, streaming, noise),
``sparsefold.trainers`` (plain loop, Ray wrapper, checkpoints, evaluation), ``sparsefold.sweeps``.
Nothing heavy is imported here.
"""

__version__ = "0.1.0"
