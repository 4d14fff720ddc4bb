"""The CPU-tuned paths of the unfolded core (issue 17) compute what the plain formulation computes.

* CSCNet's unfolding takes the residual in image space, γ − B(Aγ − y), where the previous code computed
  γ + By − BAγ over the code maps: a reference written here in that older form, with F.unfold / F.fold and a
  plain-autograd soft threshold, gives the same loss and gradients (float64, to rounding).
* im2col / col2im (models/convops.py) are F.unfold / F.fold, and each other's adjoint (gradcheck).
* The compiled soft threshold (models/prox.py, ``runtime.fused``) gives the eager one's output and gradients;
  a backend that cannot compile falls back to eager with one warning.
"""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from sparsefold.models import CSCNet, CSCNetConfig, prox
from sparsefold.models.convops import _Col2im, _Im2col, im2col, shift_average, shift_stack

f64 = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def plain_cscnet(model: CSCNet, y: torch.Tensor) -> torch.Tensor:
    """The unfolded iteration as first written: γ_{t+1} = S_θ(γ_t + By − B A γ_t), plain autograd ops."""
    cfg = model.config
    k, s = cfg.kernel_size, cfg.stride
    ys = shift_stack(y, k, s)
    hw = ys.shape[-2:]
    th = model.threshold.view(1, -1, 1, 1)

    def shrink(v: torch.Tensor) -> torch.Tensor:
        return torch.sign(v) * F.relu(v.abs() - th)

    def analysis(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, w, stride=s)

    def synthesis(g: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        n, kk, h, ww = g.shape
        cols = w.reshape(kk, -1).t() @ g.reshape(n, kk, h * ww)  # (N, C·k², h·w)
        return F.fold(cols, hw, k, stride=s)

    By = analysis(ys, model.B)
    g = shrink(By)
    for _ in range(cfg.depth - 1):
        g = shrink(g + By - analysis(synthesis(g, model.A), model.B))
    return shift_average(synthesis(g, model.C), y.shape[-2], y.shape[-1], k, s)


def test_cscnet_equals_the_plain_formulation_with_gradients() -> None:
    torch.manual_seed(0)
    model = CSCNet(CSCNetConfig(depth=4, filters=12, kernel_size=7, stride=3)).to(f64)
    with torch.no_grad():
        model.threshold.uniform_(0.001, 0.05)
    x = torch.rand(2, 1, 23, 20, dtype=f64)
    y = x + 0.1 * torch.randn_like(x)
    grads = []
    for forward in (model, lambda t: plain_cscnet(model, t)):
        model.zero_grad(set_to_none=True)
        loss = F.mse_loss(forward(y), x)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (la, ga), (lb, gb) = grads
    torch.testing.assert_close(la, lb, rtol=1e-12, atol=0)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("shape,kernel,stride", [((2, 1, 23, 19), 5, 3), ((1, 3, 30, 30), 11, 8), ((3, 2, 9, 12), 3, 1)])
def test_im2col_col2im_are_unfold_fold_and_adjoint(shape, kernel, stride) -> None:
    x = torch.randn(*shape, dtype=f64)
    assert torch.equal(im2col(x, kernel, stride), F.unfold(x, kernel, stride=stride))
    assert torch.equal(im2col(x[..., 1:, :], kernel, stride), F.unfold(x[..., 1:, :], kernel, stride=stride))  # a view
    cols = F.unfold(x, kernel, stride=stride).clone().requires_grad_()
    xi = x.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda t: _Im2col.apply(t, kernel, stride), (xi,))
    assert torch.autograd.gradcheck(lambda t: _Col2im.apply(t, tuple(shape[-2:]), kernel, stride), (cols,))


@pytest.fixture
def fused_small(monkeypatch):
    """Fusion on for every size (the default floor would keep a test's small maps eager)."""
    monkeypatch.setattr(prox, "FUSE_MIN_NUMEL", 0)
    monkeypatch.setattr(prox, "_FUSED", {"on": True, "failed": None})
    return prox


@pytest.mark.skipif(not any(map(shutil.which, ("g++", "c++", "clang++"))), reason="inductor needs a C++ compiler on CPU")
def test_fused_soft_threshold_equals_eager(fused_small) -> None:
    g = torch.Generator().manual_seed(0)
    v = torch.randn(3, 5, 6, 7, generator=g)
    theta = torch.tensor([0.3, -0.1, 0.0, 0.5, 1.0]).view(1, -1, 1, 1)
    w = torch.randn(v.shape, generator=g)
    out = []
    for on in (False, True):
        fused_small.use_fused(on)
        vv, th = v.clone().requires_grad_(), theta.clone().requires_grad_()
        (prox.soft_threshold(vv, th) * w).sum().backward()
        out.append((prox.soft_threshold(v, theta.clamp_min(0)), vv.grad, th.grad))
    assert fused_small._FUSED["failed"] is None, fused_small._FUSED["failed"]
    assert {"forward", "backward"} <= set(fused_small._FUSED)  # the compiled kernels did run
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(not any(map(shutil.which, ("g++", "c++", "clang++"))), reason="inductor needs a C++ compiler on CPU")
def test_recompile_limit_means_eager_for_that_call_only(fused_small, monkeypatch) -> None:
    """A process that meets many dtypes/ranks (a test session, a sweep) hits dynamo's recompile limit: those
    calls run eager, fusion stays on (CI once failed here with FailOnRecompileLimitHit)."""
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 1)
    for dtype, shape in ((torch.float32, (2, 3, 4, 4)), (torch.float64, (2, 3, 4, 4)), (torch.float32, (3, 4, 5))):
        v = torch.randn(shape, dtype=dtype, requires_grad=True)
        out = prox.soft_threshold(v, torch.tensor(0.2))
        out.sum().backward()
        torch.testing.assert_close(out, v - v.detach().clamp(-0.2, 0.2))
        torch.testing.assert_close(v.grad, (v.detach().abs() > 0.2).to(dtype))
    assert fused_small._FUSED["failed"] is None and fused_small._FUSED["on"]


def test_fused_falls_back_to_eager_once(fused_small, monkeypatch) -> None:
    def broken(*args, **kwargs):
        def run(*a):
            raise RuntimeError("no C++ compiler\nmore detail")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    v = torch.randn(2, 3, 4, 4, requires_grad=True)
    with pytest.warns(UserWarning, match="fused soft threshold unavailable .RuntimeError: no C.. compiler.; using"):
        prox.soft_threshold(v, torch.tensor(0.2)).sum().backward()
    assert fused_small._FUSED["failed"] == "RuntimeError: no C++ compiler"
    torch.testing.assert_close(v.grad, (v.detach().abs() > 0.2).float())


def test_traces_and_exports_use_the_eager_ops(fused_small, monkeypatch) -> None:
    """A compiled kernel inside a TorchScript trace / ONNX export would be baked in or break it: eager there."""
    monkeypatch.setattr(torch, "compile", lambda *a, **k: pytest.fail("compiled inside a trace"))
    v = torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        traced = torch.jit.trace(lambda t: prox.soft_threshold(t, 0.2), (v,), check_trace=False)
    torch.testing.assert_close(traced(v), v - v.clamp(-0.2, 0.2))
    assert "inference" not in fused_small._FUSED


def test_a_dispatch_mode_keeps_fusion_for_later(fused_small) -> None:
    """FLOP counting (and the tile planner's memory probe) run eager; fusion is not given up for good."""
    from torch.utils.flop_counter import FlopCounterMode

    v = torch.randn(2, 3, 4, 4)
    with torch.no_grad(), FlopCounterMode(display=False):
        prox.soft_threshold(v, 0.2)
    assert fused_small._FUSED["failed"] is None and "inference" not in fused_small._FUSED
