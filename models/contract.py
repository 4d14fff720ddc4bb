"""The model contract: what the trainer, evaluation, tiling and W&B panels rely on, as ``typing.Protocol``s.

Every registered model is a :class:`Denoiser`. The other protocols are optional capabilities, each checked
with ``isinstance`` where it is used (all are ``runtime_checkable``: the check is that the attributes
exist, not their signatures, which the tests exercise per model). Models know nothing of Ray, DDP, W&B or
WebDataset.

* Construction: ``Model(config, init=True)``; weights depend on the config only (seed
  ``config.init_seed``). ``init=False`` allocates the parameters without computing their initial values
  (power method, random or DCT dictionaries), for a loader that fills every one from a state dict; what
  the state dict does not hold (non-persistent buffers, constants) is still computed.
* ``forward(y, sigma=None) -> x̂``: ``y`` (B, C, H, W) noisy, any H, W; ``sigma`` (B,) the Gaussian noise
  std in 0..255 units (0 for Poisson/Binomial data) or None (unknown). Models that do not use σ ignore it;
  noise-adaptive models estimate it from ``y`` when it is None. Models that centre on the image mean take
  ``forward(y, sigma=None, mean=None)``: a tile of a large image gets the whole image's
  (``trainers/tiling.py`` reads the signature).
* config method ``check_noise(noise)`` (:class:`NoiseChecked`): raise ``ConfigError`` when the model
  cannot serve that noise (config validation).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from sparsefold.models.tiling import Tiling

if TYPE_CHECKING:  # annotations only: the config layer checks these protocols without importing torch
    from torch import Tensor


@runtime_checkable
class Denoiser(Protocol):
    """Required of every model: its config (``config.name`` is its registry key) and ``forward``."""

    config: Any

    def forward(self, y: Tensor, sigma: Tensor | None = None) -> Tensor: ...

    def __call__(self, y: Tensor, sigma: Tensor | None = None) -> Tensor: ...


@runtime_checkable
class Multilayer(Protocol):
    """x̂ after each unfolding, the last equal to ``forward`` (``loss.kind=multilayer``)."""

    def reconstructions(self, y: Tensor, sigma: Tensor | None = None) -> list[Tensor]: ...


@runtime_checkable
class Deepening(Protocol):
    """Incremental depth (``trainer.depth_stages``): ``set_depth(T)`` runs T unfoldings from now on, untied
    models warm-starting new layers from the last trained one; ``depth`` is the depth in use,
    ``config.depth`` the maximum."""

    depth: int

    def set_depth(self, depth: int) -> None: ...


@runtime_checkable
class Checkpointed(Protocol):
    """An unfolded model whose unfoldings can be recomputed in the backward pass instead of stored
    (``trainer.activation_checkpointing``): the training loop sets ``checkpoint_unfoldings = True`` once at
    the start; the model wraps each unfolding in :func:`.unfolding.unfolding`. A class attribute (default
    False), so that config validation can check the class without building a model."""

    checkpoint_unfoldings: bool


@runtime_checkable
class Restorer(Protocol):
    """A model for y = A x + n with a known operator (``task.kind`` other than denoise):
    ``forward(y, sigma=None, op=None)``, ``op`` a :class:`~.operators.Operator` (None: A = I), ``y`` of the
    measurement's shape (smaller for super-resolution, complex for MRI), x̂ of the image's. A class attribute
    ``takes_operator = True``, so that config validation can check the class without building a model; a
    model that serves only some tasks also lists them in ``task_kinds`` (a tuple of ``task.kind`` values)."""

    takes_operator: bool


@runtime_checkable
class Likelihood(Protocol):
    """Natural parameter η of the noise model's likelihood, for the unsupervised loss (``loss.kind=nll``,
    see :mod:`.likelihoods`)."""

    def natural(self, y: Tensor, sigma: Tensor | None = None) -> Tensor: ...


@runtime_checkable
class HasDictionary(Protocol):
    """Atoms (K, C, k, k) for the W&B grid."""

    def dictionary(self) -> Tensor: ...


@runtime_checkable
class CodeSparsity(Protocol):
    """Fraction of non-zero codes after each unfolding (or activations after each layer), for W&B."""

    def code_sparsity(self, y: Tensor) -> list[float]: ...


@runtime_checkable
class Tiled(Protocol):
    """Exact receptive-field radius and grid period (``Tiling(halo, align)``), for tiled inference of large
    images; without it an image always runs whole."""

    @property
    def tiling(self) -> Tiling: ...


@runtime_checkable
class Projected(Protocol):
    """Constraints applied after every optimizer step (e.g. CDLNet: τ ≥ 0, filters in the unit ball)."""

    def project_(self) -> None: ...


@runtime_checkable
class NoiseChecked(Protocol):
    """A model config that refuses a noise model it cannot serve (a Poisson DCEA on Gaussian data)."""

    def check_noise(self, noise: Any) -> None: ...

