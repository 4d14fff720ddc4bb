"""VDSR against references written from the definitions (CPU, float64, small images, one thread).

With the last layer zeroed the network is its interpolation u, checked per operator kind against
``bicubic_upsample`` / Aᵀy / y; the residual branch's receptive field is measured by perturbing one pixel;
then the parameter count against the formula and the registry, gradients, output shapes, the He init and
the config.
"""

from __future__ import annotations

import pytest
import torch

from sparsefold.errors import ConfigError
from sparsefold.models import MODELS, count_parameters
from sparsefold.models.classical import bicubic_upsample
from sparsefold.models.operators import (
    MRI,
    Blur,
    Downsample,
    Identity,
    Inpainting,
    Operator,
    cartesian_mask,
    gaussian_kernel,
    random_mask,
)
from sparsefold.models.vdsr import VDSR, VDSRConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

f64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def small(**kw) -> VDSR:
    return VDSR(VDSRConfig(**{**dict(depth=4, features=8), **kw})).double()


def measure(op: Operator, shape: tuple[int, ...], seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y = A x + 0.02 n): x (B, C, H, W) in [0, 1]."""
    x = torch.rand(shape, generator=gen(seed), dtype=f64)
    y = op.A(x)
    noise = torch.randn(y.shape, generator=gen(seed + 1), dtype=f64)
    return x, y + 0.02 * (noise if not y.is_complex() else torch.complex(noise, noise.flip(-1)))


def zero_last_layer(model: VDSR) -> VDSR:
    last = model.body[-1]
    assert isinstance(last, torch.nn.Conv2d) and last.out_channels == model.config.channels
    assert last.bias is not None
    with torch.no_grad():
        last.weight.zero_()
        last.bias.zero_()  # W_D = 0, b_D = 0: no residual at all
    return model


# ================================================================== the interpolation u


SR_SHAPES = [(2, (18, 22)), (2, (16, 20)), (3, (15, 21)), (3, (18, 24)), (4, (20, 28)), (4, (16, 24))]


@pytest.mark.parametrize(("factor", "hw"), SR_SHAPES, ids=[f"x{f}-{h}x{w}" for f, (h, w) in SR_SHAPES])
@pytest.mark.parametrize("channels", [1, 3])
def test_zero_residual_is_bicubic_upsampling_for_downsample(factor: int, hw: tuple[int, int], channels: int) -> None:
    """Odd and even LR sizes (the HR size divides by the factor): x̂ = bicubic(y, f) exactly, not Aᵀy."""
    op = Downsample(factor, "bicubic")
    x, y = measure(op, (2, channels, *hw))
    assert y.shape[-2:] == (hw[0] // factor, hw[1] // factor)
    model = zero_last_layer(small(channels=channels))
    with torch.no_grad():
        out = model(y, op=op)
    assert torch.equal(out, bicubic_upsample(y, factor))
    assert out.shape == x.shape and not torch.allclose(out, op.A_adjoint(y), atol=1e-2)


def test_zero_residual_is_the_back_projection_for_other_operators() -> None:
    b, h, w = 2, 16, 20
    mask = random_mask((b, 1, h, w), 0.5, gen(1))
    ops: dict[str, Operator] = {
        "inpainting": Inpainting(mask),
        "blur_circular": Blur(gaussian_kernel(5, 1.2, f64)),
        "blur_reflect": Blur(gaussian_kernel(5, 1.2, f64), "reflect"),
        "mri": MRI(cartesian_mask(h, w, 0.4, gen(2))),
    }
    model = zero_last_layer(small())
    for name, op in ops.items():
        _, y = measure(op, (b, 1, h, w))
        with torch.no_grad():
            out = model(y, op=op)
        assert torch.equal(out, op.A_adjoint(y)), name
        assert not torch.equal(out, y.real), name
    _, y = measure(Identity(), (b, 1, h, w))
    with torch.no_grad():
        assert torch.equal(model(y), y) and torch.equal(model(y, op=Identity()), y)


# ================================================================== the residual branch


@pytest.mark.parametrize("depth", [2, 3, 6])
@pytest.mark.parametrize("where", ["centre", "corner"])
def test_residual_branch_has_receptive_field_2_depth_plus_1(depth: int, where: str) -> None:
    """One pixel of u changed: f(u) changes exactly on the (2D + 1)² square around it (clipped by the image)."""
    size = 2 * depth + 9
    model = small(depth=depth).eval()
    u = torch.rand(1, 1, size, size, generator=gen(0), dtype=f64)
    i, j = (size // 2, size // 2) if where == "centre" else (1, size - 2)
    v = u.clone()
    v[0, 0, i, j] += 0.5
    with torch.no_grad():
        change = (model(v) - v) - (model(u) - u)  # f(v) − f(u), op None: u = y
    assert change.shape == u.shape  # zero padding keeps the size
    rows, cols = change[0, 0].ne(0).nonzero(as_tuple=True)
    assert (int(rows.min()), int(rows.max())) == (max(i - depth, 0), min(i + depth, size - 1))
    assert (int(cols.min()), int(cols.max())) == (max(j - depth, 0), min(j + depth, size - 1))
    assert model.tiling.halo == depth and model.tiling.align == 1


# ================================================================== parameters and gradients


def test_parameter_count_is_the_formula_and_the_registry() -> None:
    def formula(c: int, f: int, d: int) -> int:
        return c * f * 9 + f + (d - 2) * (f * f * 9 + f) + f * c * 9 + c

    default = VDSR(VDSRConfig(), init=False)
    assert count_parameters(default) == formula(1, 64, 20) == MODELS["vdsr"].params == 665_921
    assert count_parameters(VDSR(VDSRConfig(channels=3, features=16, depth=5), init=False)) == formula(3, 16, 5)
    assert sum(isinstance(m, torch.nn.Conv2d) for m in default.modules()) == 20


def test_gradients_reach_every_parameter() -> None:
    op = Downsample(3, "box")
    x, y = measure(op, (2, 1, 18, 15))
    model = small(depth=5)
    ((model(y, op=op) - x) ** 2).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and bool(p.grad.isfinite().all()), name
        assert float(p.grad.abs().sum()) > 0, name


# ================================================================== shapes


@pytest.mark.parametrize("factor", [2, 3, 4])
def test_output_has_the_image_shape(factor: int) -> None:
    op = Downsample(factor)
    x, y = measure(op, (2, 1, 12 * factor, 5 * factor))
    model = small()
    with torch.no_grad():
        out = model(y, op=op)
    assert y.shape == (2, 1, 12, 5) and out.shape == x.shape and out.dtype == f64
    mri = MRI(cartesian_mask(16, 16, 0.4, gen(2)))
    x, y = measure(mri, (2, 1, 16, 16))
    with torch.no_grad():
        out = model(y, op=mri)
    assert y.is_complex() and out.shape == x.shape and out.dtype == f64
    with pytest.raises(ConfigError, match="y"):
        model(torch.rand(1, 3, 8, 8, dtype=f64))


# ================================================================== init and config


def test_he_init_is_seeded_and_has_the_he_std() -> None:
    """He normal: std √(2 / (9·64)) for the 64→64 layers (PyTorch's own default would be 2.4× smaller)."""
    a, b, c = VDSR(VDSRConfig()), VDSR(VDSRConfig()), VDSR(VDSRConfig(init_seed=1))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.body[2].weight, c.body[2].weight)
    w = torch.cat([m.weight.detach().flatten() for m in a.body[2:-1] if isinstance(m, torch.nn.Conv2d)])
    assert float(w.std()) == pytest.approx((2 / (9 * 64)) ** 0.5, rel=0.01)
    assert abs(float(w.mean())) < 1e-3
    biases = [m.bias for m in a.body if isinstance(m, torch.nn.Conv2d)]
    assert len(biases) == 20 and all(b is not None and not b.detach().any() for b in biases)


def test_config_validation() -> None:
    for bad in (dict(channels=2), dict(features=0), dict(depth=1)):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            VDSRConfig(**bad)
