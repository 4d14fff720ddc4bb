"""LIDIA-lite (models/lidia.py) and its non-local operators (models/neighbours.py) against references written here:
a brute-force neighbour search, constant images through the fold-average-unfold aggregations, the gathered
neighbour stacks against the search's distances, translation equivariance, and the official parameter
counts (61,589 gray / 40,226 LIDIA-S / 94,067 colour, read from the released checkpoints).
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from sparsefold.config import ConfigError
from sparsefold.models import MODELS, build_model, count_parameters
from sparsefold.models import lidia as lidia_mod
from sparsefold.models.lidia import LIDIA, LIDIAConfig
from sparsefold.models.neighbours import fold_average, patch_knn

TINY = dict(window=7, neighbours=6, width=8, weight_layers=2)  # fast, same code paths


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def brute_knn(img: torch.Tensor, p: int, k: int, window: int, d: int, s: int):
    """Every candidate of every reference patch, one by one: (dist, idx) of the k−1 nearest non-self ones."""
    n, _, h, w = img.shape
    gh, gw, r = h - d * (p - 1), w - d * (p - 1), window // 2
    patches = F.unfold(img, p, dilation=d)  # (N, p², G)
    queries = [a * gw + b for a in range(0, gh, s) for b in range(0, gw, s)]
    dist = torch.full((n, len(queries), gh * gw), float("inf"), dtype=img.dtype)
    for qi, i in enumerate(queries):
        a, b = divmod(i, gw)
        for dr, dc in itertools.product(range(-r, r + 1), repeat=2):
            aa, bb = a + d * dr, b + d * dc
            if (dr, dc) != (0, 0) and 0 <= aa < gh and 0 <= bb < gw:
                dist[:, qi, aa * gw + bb] = ((patches[:, :, i] - patches[:, :, aa * gw + bb]) ** 2).sum(1)
    best, idx = dist.topk(k - 1, dim=-1, largest=False)
    return best, idx, torch.tensor(queries)


@pytest.mark.parametrize("d, s", [(1, 1), (2, 1), (1, 2), (2, 2), (1, 3), (2, 3)])
def test_knn_matches_brute_force_and_starts_with_the_patch_itself(d: int, s: int) -> None:
    img = torch.randn(2, 1, 17, 20, generator=torch.Generator().manual_seed(d * 10 + s), dtype=torch.float64)
    dist, idx = patch_knn(img, 3, 6, 5, d, s, rows_per_chunk=2)  # chunks: exercises the running top-k
    ref_d, ref_i, queries = brute_knn(img, 3, 6, 5, d, s)
    assert torch.equal(idx[..., 0], queries.expand(2, -1)) and torch.equal(dist[..., 0], torch.zeros_like(dist[..., 0]))
    torch.testing.assert_close(dist[..., 1:], ref_d)
    assert torch.equal(idx[..., 1:], ref_i)


def test_knn_self_first_under_ties_and_tiny_images() -> None:
    flat = torch.zeros(1, 1, 12, 12)  # every candidate ties at distance 0
    dist, idx = patch_knn(flat, 3, 5, 5)
    assert torch.equal(idx[..., 0], torch.arange(100).view(1, -1)) and float(dist.abs().max()) == 0.0
    dist, idx = patch_knn(torch.rand(1, 1, 9, 9), 3, 14, 29, 2)  # 5×5 grid, dilation 2: the centre has 8
    assert torch.equal(idx[0, 12, 9:], torch.full((5,), 12)) and bool((dist[0, 12, 9:] > 1e6).all())
    assert sorted(idx[0, 12, 1:9].tolist()) == [0, 2, 4, 10, 14, 20, 22, 24] and bool((dist[0, 12, 1:9] < 1e3).all())


@pytest.mark.parametrize("d, s, smooth", [(1, 1, False), (2, 1, True), (1, 2, False), (2, 2, True), (1, 3, False)])
def test_fold_average_is_exact_on_constants(d: int, s: int, smooth: bool) -> None:
    p, hw = 3, ((18, 21) if s == 3 else (17, 21))  # aligned: the last reference patch ends on the border
    n_q = ((hw[0] - d * (p - 1) - 1) // s + 1) * ((hw[1] - d * (p - 1) - 1) // s + 1)
    blur = LIDIA(LIDIAConfig(**TINY))._blur
    sm = (lambda t: blur(F.pad(t, (1,) * 4, mode="reflect"))) if smooth else None
    out = fold_average(torch.full((2, 2 * p * p, n_q), 0.7), hw, p, d, s, sm)
    torch.testing.assert_close(out, torch.full((2, 2, *hw), 0.7))


@pytest.mark.parametrize("stride", [1, 2])
def test_in_network_aggregations_are_exact_on_constant_patches(stride: int) -> None:
    model = LIDIA(LIDIAConfig(**TINY, stride=stride))
    y = torch.rand(2, 1, 19, 24)
    geometry = {}
    real = model._aggregate
    model._aggregate = lambda s, pre, hw, b: geometry.setdefault(s, (pre.shape, hw, b)) and real(s, pre, hw, b)
    model.eval()(y)  # records the patch-estimate shapes and image sizes of both scales
    for s, (shape, hw, b) in geometry.items():
        torch.testing.assert_close(real(s, torch.full(shape, -0.3), hw, b), torch.full((1, *shape), -0.3))


@pytest.mark.parametrize("scale", [0, 1])
def test_gathered_stacks_match_the_search(scale: int) -> None:
    """Row 0 is the reference patch; ‖row k − row 0‖² is the distance the search reported for neighbour k."""
    model = LIDIA(LIDIAConfig(**TINY))
    img = torch.randn(2, 1, 30, 27, dtype=torch.float64)
    stack, feats = model._group(img, scale)  # (K, M, p²), (M, K)
    d, s, p = 2 ** scale, model.config.stride, model.config.patch_size
    centres = F.unfold(img, p, dilation=d).view(2, p * p, img.shape[-2] - d * (p - 1), -1)[..., ::s, ::s]
    torch.testing.assert_close(stack[0], centres.flatten(2).transpose(1, 2).reshape(-1, p * p))
    torch.testing.assert_close(((stack[1:] - stack[:1]) ** 2).sum(-1).T, feats[:, :-1])
    assert stack.shape == (6, centres[0, 0].numel() * 2, p * p)


def test_translation_equivariance_away_from_borders() -> None:
    """Shifting the image by a multiple of the stride shifts the output (eval mode: no batch coupling).
    Columns are zero-mean so both crops have the same mean (the model removes the image mean)."""
    model = LIDIA(LIDIAConfig(**TINY, stride=2)).eval()
    big = torch.rand(1, 1, 40, 104, generator=torch.Generator().manual_seed(0))
    big = big - big.mean(dim=-2, keepdim=True) + 0.5
    shift, width, margin = 4, 96, 36
    with torch.no_grad():
        a, b = model(big[..., :width]), model(big[..., shift:shift + width])
    torch.testing.assert_close(a[..., margin + shift:width - margin], b[..., margin:width - margin - shift],
                               rtol=1e-4, atol=1e-5)
    assert not torch.allclose(a[..., :width - shift], b[..., :width - shift], atol=1e-3)  # it is a real shift


def test_stride_one_maps_constant_images_to_constants() -> None:
    model = LIDIA(LIDIAConfig(**TINY, stride=1)).eval()
    with torch.no_grad():
        out = model(torch.full((1, 1, 23, 30), 0.4))
    assert float(out.std()) < 1e-5


def test_eval_chunks_equal_one_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    model = LIDIA(LIDIAConfig(**TINY)).eval()
    y = torch.rand(2, 1, 29, 31)
    with torch.no_grad():
        whole = model(y)
        monkeypatch.setattr(lidia_mod, "_EVAL_CHUNK", 37)  # uneven chunks of the patch axis
        chunked = model(y)
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-6)


def test_parameter_counts_match_the_official_checkpoints() -> None:
    assert MODELS["lidia"].params == 61_589
    assert count_parameters(build_model(LIDIAConfig())) == 61_589
    assert count_parameters(LIDIA(LIDIAConfig(blocks=1))) == 40_226  # LIDIA-S
    assert count_parameters(LIDIA(LIDIAConfig(channels=3, patch_size=5, width=80))) == 94_067  # colour


def test_colour_forward_dictionary_and_sparsity() -> None:
    model = LIDIA(LIDIAConfig(**TINY, channels=3, patch_size=5))
    y = torch.rand(1, 3, 20, 22)
    assert model(y).shape == y.shape
    assert model.dictionary().shape == (8, 3, 5, 5)
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    sp = model.train().code_sparsity(y)
    assert len(sp) == 8 and all(0.0 < v < 1.0 for v in sp)
    assert model.training and all(torch.equal(v, model.state_dict()[k]) for k, v in stats.items())  # no side effect


@pytest.mark.parametrize("field, value", [("window", 8), ("stride", 9), ("neighbours", 50), ("blocks", 3)])
def test_bad_config_names_the_field(field: str, value: int) -> None:
    with pytest.raises(ConfigError, match=f"^{field}:"):
        LIDIAConfig(**{**TINY, field: value})
