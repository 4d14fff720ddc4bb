r"""LIDIA: non-local, two-scale learned patch denoiser (Vaksman, Elad & Milanfar, CVPR-W 2020).

Problem: denoise y = x + v by collaborative filtering, the classical non-local pipeline (NLM, BM3D): for each
p×p reference patch, (a) group its K nearest patches in a search window, (b) transform the group jointly over
pixels × neighbours, (c) shrink, (d) invert, (e) average the overlapping patch estimates. LIDIA learns (b)–(d)
as separable FC layers ("VerHor": one map over the pixel axis, one over the neighbour axis, bias, ReLU as the
shrinkage), with learned neighbour weights, a second scale, in-network aggregation and noise prediction.

Pipeline. u = 2(y − m) (the paper's [−1, 1] range, m the per-image channel mean); scale s ∈ {0, 1} has dilation
δ_s = 2^s; ũ₀ = u reflect-padded by p−1, ũ₁ = h ⊛ u reflect-padded, h = [¼,½,¼]ᵀ[¼,½,¼]; P_s(i) = the p×p patch
of ũ_s with dilation δ_s at grid position i (same centres at both scales); references i on the step-``stride``
sub-grid, neighbours j anywhere on the grid:

    j_1..j_K = K-argmin_j ‖P_s(i) − P_s(j)‖² =: d_s(i, j),  j = i + δ_s(dr, dc),
               |dr|, |dc| ≤ ⌊window/2⌋,  j_1 = i                                         (Eq. 1, no grad)
    w_s(i) = FcNet_s(exp(−|α_s|·[d_s(i, j_2..j_K), Cp²·var(P_s(i))])) ∈ R^K                  (Eq. 2)
    Z_s(i) = diag(w_s(i)) [P_s(j_1); …; P_s(j_K)] ∈ R^{K×Cp²}                                (Eq. 3)
    L(Z)   = ReLU(BN(W_h Z W_vᵀ + B))          separable layer; BN over the K rows, if any   (Eq. 4)
    X_s    = L_{s,0}(Z_s);   X_s ← a_s X_s + (1 − a_s) L_{s,1}(X_s)                 (stage 1, Eq. 5)
    E_0    = 𝒜_0(Pre_0 X_0),  E_1 = w_{1,1} 𝒜_1(Pre_1 X_1 / w_{1,1}),  Y_s = Post_s(E_s)           (Eq. 6)
             Pre_s: K×F → 1×Cp² (linear), Post_s: 1×Cp² → K×F (ReLU, no BN),
             𝒜_0 = unfold ∘ fold/count,  𝒜_1 = unfold_δ=2 ∘ blur(fold_δ=2)/blur(count)
    H      = L_2([X_0; X_1; Y_0; Y_1]);   H ← a₂ H + (1 − a₂) L_3(H) ∈ R^{4K×F}     (stage 2, Eq. 7)
    n̂(i)  = W_h^o H W_v^oᵀ + b^o ∈ R^{1×Cp²},   x̂(i) = P_0(i) − n̂(i)             (residual, Eq. 8)
    x̂     = Σ_i ω_i R_iᵀ x̂(i) / Σ_i ω_i R_iᵀ 1,  ω_i = exp(−|β| var x̂(i));  output x̂/2 + m   (Eq. 9)

Symbol → attribute (K = ``neighbours``, F = ``width``, p = ``patch_size``, C = ``channels``):

    ======================  ===============================================  =========================
    FcNet_s, α_s            ``weight_net[s]``, ``alpha[s]``                  6×(K→K, BN, ReLU) + K→K
    L_{s,0}, L_{s,1}, a_s   ``stage1[s][0]``, ``stage1[s][1]``, ``a1[s]``    (K,Cp²)→(K,F)→(K,F)
    Pre_s, Post_s           ``agg_pre[s]``, ``agg_post[s]``                  (K,F)→(1,Cp²)→(K,F)
    L_2, L_3, a₂            ``stage2[0]``, ``stage2[1]``, ``a2``             (4K,F)→(4K,F)
    W_h^o, W_v^o, b^o; β    ``out`` (.hor, .ver, .bias); ``beta``            (4K,F)→(1,Cp²); scalar
    W_h, W_v, B of a layer  ``SepLayer.hor`` (K_out,K_in), ``.ver`` (F_out,F_in), ``.bias`` (K_out,F_out)
    ======================  ===============================================  =========================

Paper configuration (gray, σ=25): p=7, K=14, window 29, F=64, 2 blocks per stage, 6-layer FcNet, every patch a
reference: 61,589 trainable parameters, the official checkpoint's count (``blocks=1``, LIDIA-S: 40,226; colour,
p=5, F=80, C=3: 94,067). The defaults are that, except ``stride=2``. ``sparsefold import lidia`` loads the
authors' releases with ``stride=1, search="official", aggregation="official", w11_min=0``: the forward is then
the official inference forward (code/modules.py NonLocalDenoiser in eval mode) to float rounding (≤ 3e-7).

Defaults that differ from the official code (grishavak/LIDIA-denoiser, no training script); the option:

* ``stride=2``: references on every 2nd grid row/column (paper: all, ``stride=1``), as BM3D's step; each pixel
  keeps ⌈p/2⌉² = 16 estimates (49); forward+backward of a 4×64² batch: 2.4 vs 9.6 CPU-s, 0.93 vs 3.5 GB of
  saved activations. Scale-1 references then lie on the even polyphase component, and an untrained
  model's position-dependent patch biases show as a 2-periodic pattern (they average out at stride 1).
* ``aggregation="normalized"``: 𝒜_1 divides blur(fold) by blur(count) (``"official"``: blur(fold/count));
  equal where the count is constant over 3×3, i.e. away from the padded border at stride 1, and defined at
  stride 2 where odd pixels have count 0. ``w11_min=1e-2``: |w_{1,1}| ≥ 1e-2 in Eq. 6 (``0``: unguarded).
* ``search="inside"``: candidates lie inside the padded image; j_1 is the patch itself also under ties; exact
  and vectorized (offsets as channels, box sums, running top-k): ≈15 % of a training step, ≈30 % of
  inference. ``"official"`` (stride 1, ≈ the official speed): ũ_s also padded with −1 by δ_s·⌊window/2⌋
  (candidates there too), distances by per-offset p×p convolutions, one top-k over the window, u computed as
  (2y − 1) − mean(2y − 1): distances tie exactly in the reflect-padded border and break as there.
* same-size output in training too (reflect padding as at inference; the official training crops a margin).
* ``sigma`` is ignored (a model per σ, or a blind one trained on a σ range, as in the paper); the gradient
  w.r.t. y flows through patch values, not through the discrete choice of neighbours.
* BatchNorm as in the paper (over the K rows in L_{s,1}, L_2, L_3 and in FcNet; none in L_{s,0}, Pre, Post):
  training couples a batch's patches; eval uses the running statistics, in patch chunks. The official
  scripts never call ``.eval()``: FcNet normalizes by all of an image's patches, the stages by each
  40,000-patch chunk's own (``eval_bn="official"``, which imports get; that data-dependent normalization is
  0.04–0.07 dB better on BSD68, up to 0.7 dB on test066). ``"official"`` is exact for one whole image
  (a batch shares the chunks as there; tiles of a large image get their own statistics).
* training setup is the trainer's (Adam, MSE, our crops); the checkpoints record SGD with momentum 0.9,
  200k iterations and a log10(MSE) loss; the training data are unknown.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparsefold.errors import check
from sparsefold.models.convops import reflect_pad
from sparsefold.models.neighbours import fold_average, search_neighbours
from sparsefold.models.tiling import Tiling

_EVAL_CHUNK = 2048  # patches per chunk at eval (BN uses running statistics, so stages are patch-wise);
# 8192 held ≈ 0.5 GB of stage buffers whatever the image size, as fast (trainers/tiling.py sizes tiles by it)
_OFFICIAL_CHUNK = 40_000  # eval_bn="official": the official scripts' max_chunk (code/denoise_*.py)


@dataclass(frozen=True, kw_only=True)
class LIDIAConfig:
    """Hyperparameters of :class:`LIDIA` (defaults: the paper's gray model, except ``stride``)."""

    name: str = "lidia"
    channels: int = 1
    patch_size: int = 7
    neighbours: int = 14
    window: int = 29
    stride: int = 2
    width: int = 64
    blocks: int = 2
    weight_layers: int = 6
    init_seed: int = 0
    # added in 0.1 (trainers/storage.py named_fields); "official": the authors' forward (module docstring)
    search: str = field(default="inside", metadata={"run_name": "if_set"})
    aggregation: str = field(default="normalized", metadata={"run_name": "if_set"})
    w11_min: float = field(default=1e-2, metadata={"run_name": "if_set"})
    eval_bn: str = field(default="running", metadata={"run_name": "if_set"})  # added in 0.2

    def __post_init__(self) -> None:
        check(self.channels in (1, 3), "channels", f"must be 1 or 3, got {self.channels}")
        for f, v in (("patch_size", self.patch_size), ("window", self.window)):
            check(v >= 3 and v % 2 == 1, f, f"must be odd and >= 3, got {v}")
        check(2 <= self.neighbours <= self.window ** 2, "neighbours",
              f"must be in [2, window²={self.window ** 2}], got {self.neighbours}")
        check(1 <= self.stride <= self.patch_size, "stride",
              f"must be in [1, patch_size={self.patch_size}], got {self.stride}")
        check(self.width >= 1, "width", f"must be >= 1, got {self.width}")
        check(self.blocks in (1, 2), "blocks", f"must be 1 (LIDIA-S) or 2 (LIDIA), got {self.blocks}")
        check(self.weight_layers >= 0, "weight_layers", f"must be >= 0, got {self.weight_layers}")
        for opt, val, ours in (("search", self.search, "inside"), ("aggregation", self.aggregation, "normalized")):
            check(val in (ours, "official"), opt, f"must be {ours!r} or 'official', got {val!r}")
            check(val == ours or self.stride == 1, opt, "'official' needs stride 1 (every patch a reference)")
        check(self.w11_min >= 0, "w11_min", f"must be >= 0, got {self.w11_min}")
        check(self.eval_bn in ("running", "official"), "eval_bn",
              f"must be 'running' or 'official', got {self.eval_bn!r}")


def _uniform(shape: tuple[int, ...], fan_in: int, g: torch.Generator | None) -> nn.Parameter:
    """nn.Linear's default init U(±1/√fan_in) from a seeded generator; ``g=None``: allocated only (the model
    was built with ``init=False``, a state dict fills it)."""
    t = torch.empty(shape)
    return nn.Parameter(t if g is None else nn.init.uniform_(t, -fan_in ** -0.5, fan_in ** -0.5, generator=g))


def _batch_norm(bn: nn.modules.batchnorm._BatchNorm, x: Tensor, own_stats: bool) -> Tensor:
    """bn(x); in eval mode with ``own_stats``, normalized by x's own statistics as a BatchNorm left in
    training mode would be (the official scripts' inference), the running statistics untouched."""
    if bn.training or not own_stats:
        return bn(x)
    return F.batch_norm(x, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)


class SepLayer(nn.Module):
    """Eq. 4 on neighbour stacks laid out (K, M, F) (M = batch·patches): Z ↦ ρ(BN(W_h Z W_vᵀ + B)).

    Both maps are single GEMMs in this layout; they commute, so the cheaper order is used."""

    def __init__(self, k_in: int, k_out: int, f_in: int, f_out: int, g: torch.Generator | None,
                 bn: bool, relu: bool, own_stats: bool = False) -> None:
        super().__init__()
        self.ver, self.hor = _uniform((f_out, f_in), f_in, g), _uniform((k_out, k_in), k_in, g)  # W_v, W_h
        b = torch.empty(k_out, f_out)
        self.bias = nn.Parameter(b if g is None else nn.init.xavier_normal_(b, math.sqrt(2), generator=g))  # B
        self.bn = nn.BatchNorm2d(k_out) if bn else None
        self.relu, self.own_stats = relu, own_stats  # own_stats: eval_bn="official"
        self.tally: list[tuple[int, int]] | None = None  # when set, collects (non-zeros, entries) per call
        self.hor_first = k_out * f_in * (k_in + f_out) <= k_in * f_out * (f_in + k_out)  # fewer MACs

    def forward(self, z: Tensor) -> Tensor:
        k_in, m = z.shape[:2]
        if self.hor_first:
            v = (self.hor @ z.reshape(k_in, -1)).view(-1, m, z.shape[-1])  # W_h Z: (K_out, M, F_in)
            z = torch.baddbmm(self.bias[:, None], v, self.ver.T.expand(v.shape[0], -1, -1))  # ·W_vᵀ + B
        else:
            u = F.linear(z, self.ver)  # Z W_vᵀ: (K_in, M, F_out)
            z = (self.hor @ u.reshape(k_in, -1)).view(-1, m, u.shape[-1]) + self.bias[:, None]
        if self.bn is not None:
            z = _batch_norm(self.bn, z.unsqueeze(0), self.own_stats)  # (1, K_out, M, F): statistics per row k
        z = torch.relu_(z) if self.relu else z  # in place: neither BN nor baddbmm saves its output
        if self.tally is not None:
            self.tally.append((int((z != 0).sum()), z.numel()))
        return z.view(-1, m, z.shape[-1])


def _fc_net(k: int, layers: int, g: torch.Generator | None) -> nn.Sequential:
    """FcNet of Eq. 2: ``layers`` × (Linear K→K no bias, BN, ReLU) + Linear K→K, nn.Linear's init."""
    net = nn.Sequential(*[m for _ in range(layers) for m in (nn.Linear(k, k, bias=False), nn.BatchNorm1d(k),
                                                            nn.ReLU(inplace=True))], nn.Linear(k, k))
    linears = [m for m in net if isinstance(m, nn.Linear)]  # net[::3]
    for lin in linears:
        lin.weight = _uniform((k, k), k, g)
    linears[-1].bias = _uniform((k,), k, g)
    return net


class LIDIA(nn.Module):
    """Two-scale non-local separable patch denoiser. See the module docstring."""

    blur: Tensor  # the 3×3 binomial filter h (a non-persistent buffer)

    def __init__(self, config: LIDIAConfig, init: bool = True) -> None:
        """``init=False``: the layers allocated but not drawn, for a state dict to fill."""
        super().__init__()
        self.config = config
        g = torch.Generator().manual_seed(config.init_seed) if init else None
        K, F_, n, two = config.neighbours, config.width, config.channels * config.patch_size ** 2, config.blocks == 2
        own = config.eval_bn == "official"
        layer = lambda k_in, k_out, f_in, f_out, bn=True, relu=True: SepLayer(k_in, k_out, f_in, f_out, g, bn, relu,
                                                                              own)
        self.weight_net = nn.ModuleList(_fc_net(K, config.weight_layers, g) for _ in range(2))
        self.stage1 = nn.ModuleList(nn.ModuleList([layer(K, K, n, F_, bn=False)] + [layer(K, K, F_, F_)] * two)
                                    for _ in range(2))
        self.agg_pre = nn.ModuleList(layer(K, 1, F_, n, bn=False, relu=False) for _ in range(2))
        self.agg_post = nn.ModuleList(layer(1, K, n, F_, bn=False) for _ in range(2))
        self.stage2 = nn.ModuleList([layer(4 * K, 4 * K, F_, F_)] + [layer(4 * K, 4 * K, F_, F_)] * two)
        self.out = layer(4 * K, 1, F_, n, bn=False, relu=False)
        self.alpha = nn.Parameter(torch.full((2,), 0.5))
        self.beta = nn.Parameter(torch.tensor(0.5))
        if two:
            self.a1, self.a2 = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(1))
        self.register_buffer("blur", torch.tensor([1.0, 2, 1]).outer(torch.tensor([1.0, 2, 1])) / 16, persistent=False)

    @property
    def tiling(self) -> Tiling:
        """Halo r + (4r + 1) + (2·⌊window/2⌋ + 2r + 1), r = (p−1)/2, from the output back through scale 1:
        Eq. 9's fold (r), 𝒜_1 (overlapping δ=2 patches and the blur: 4r + 1), Eq. 1 at δ=2 (window offsets,
        the patch, ũ₁'s blur); scale 0 reaches less. m is global: tiles get the whole image's (``mean``)."""
        r = (self.config.patch_size - 1) // 2
        return Tiling(r + 4 * r + 1 + 2 * (self.config.window // 2) + 2 * r + 1, self.config.stride)

    # ------------------------------------------------------------------ grouping (Eqs. 1–3)
    def _blur(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape  # h ⊛ x, valid, per channel (channels as batch: the official code's arithmetic)
        return F.conv2d(x.reshape(b * c, 1, h, w), self.blur[None, None]).view(b, c, h - 2, w - 2)

    def _group(self, img: Tensor, s: int) -> tuple[Tensor, Tensor]:
        """img = ũ_s (B, C, Hs, Ws) -> neighbour stack (K, M, Cp²) (row 0: the patch itself), features (M, K)."""
        cfg = self.config
        p, K, d = cfg.patch_size, cfg.neighbours, 2 ** s
        dist, idx, img = search_neighbours(img, p, K, cfg.window, d, cfg.stride, cfg.search == "official")  # Eq. 1
        rows = F.unfold(img, p, dilation=d).transpose(1, 2)  # every grid patch: (B, G, Cp²)
        flat = idx + torch.arange(len(idx), device=img.device).view(-1, 1, 1) * rows.shape[1]
        stack = rows.reshape(-1, rows.shape[-1])[flat.reshape(-1, K).T]  # gather: (K, M, Cp²), M = B·Q
        energy = stack[0].var(dim=-1, keepdim=True) * stack.shape[-1]  # p²C·var(P_s(i)) (unbiased, official)
        return stack, torch.cat([dist.reshape(-1, K)[:, 1:], energy], 1)

    def _aggregate(self, s: int, pre: Tensor, hw: tuple[int, ...], b: int) -> Tensor:
        """𝒜_s of Eq. 6: patch estimates (M, Cp²) -> their fold-average, unfolded again (1, M, Cp²)."""
        p, st, d = self.config.patch_size, self.config.stride, 2 ** s
        smooth = (lambda t: self._blur(F.pad(t, (1,) * 4, mode="reflect"))) if s == 1 else None
        est = fold_average(pre.view(b, -1, pre.shape[-1]).transpose(1, 2), hw, p, d, st, smooth,
                           self.config.aggregation == "official")  # (B, C, Hs, Ws)
        return F.unfold(est, p, dilation=d, stride=st).transpose(1, 2).reshape(1, -1, pre.shape[-1])

    def _stage(self, layers: nn.ModuleList, a: Tensor | None, z: Tensor) -> Tensor:
        """Eqs. 5 and 7: x = L_first(z); x ← a·x + (1 − a)·L_second(x) when there are two blocks (a given)."""
        x = layers[0](z)
        return x if a is None else torch.lerp(layers[1](x), x, a)

    def _weights(self, s: int, feats: Tensor) -> Tensor:
        """FcNet_s of Eq. 2 on (M, K) features; eval_bn="official": BN by the M patches' own statistics."""
        net = self.weight_net[s]
        assert isinstance(net, nn.Sequential)  # built by _fc_net
        for m in net:
            feats = _batch_norm(m, feats, self.config.eval_bn == "official") if isinstance(m, nn.BatchNorm1d) \
                else m(feats)
        return feats

    def _chunked(self, fn, *xs: Tensor) -> Tensor:
        """fn over patch chunks (dim 1) at eval, where every stage is patch-wise (eval_bn="official": the
        official chunks, whose own statistics BN uses); one call in training."""
        m, n = xs[0].shape[1], _OFFICIAL_CHUNK if self.config.eval_bn == "official" else _EVAL_CHUNK
        if self.training or m <= n:
            return fn(*xs)
        return torch.cat([fn(*(x[:, i:i + n] for x in xs)) for i in range(0, m, n)], -2)

    # ------------------------------------------------------------------ forward
    def forward(self, y: Tensor, sigma: Tensor | None = None, mean: Tensor | None = None) -> Tensor:
        """y (B, C, H, W) in [0, 1] -> x̂ (B, C, H, W). ``sigma`` is ignored (see the module docstring);
        ``mean`` (B, C, 1, 1) replaces y's channel mean m (a tile of a larger image gets the whole image's)."""
        p, st = self.config.patch_size, self.config.stride
        q, r = p - 1, (p - 1) // 2
        b, _, h, w = y.shape
        eh, ew = -(h + q - 1) % st, -(w + q - 1) % st  # extra bottom/right pad: last reference = last patch
        m = y.mean(dim=(-2, -1), keepdim=True) if mean is None else mean
        u = 2 * (y - m)  # the paper's [−1, 1] scale, mean removed
        if self.config.search == "official":  # in the official order: Eq. 1's ties break bit for bit as there
            u = (v := 2 * y - 1) - (v.mean((-2, -1), True) if mean is None else 2 * mean - 1)
        u0 = reflect_pad(u, (q, q + ew, q, q + eh))  # ũ₀: (B, C, H+2q+eh, W+2q+ew)
        u1 = self._blur(reflect_pad(u, (q + r + 1, q + r + 1 + ew, q + r + 1, q + r + 1 + eh)))  # ũ₁, 2r more
        xs, ys = [], []
        for s, img in enumerate((u0, u1)):
            stack, feats = self._group(img, s)  # Eq. 1
            wts = self._weights(s, torch.exp(-self.alpha[s].abs() * feats))  # Eq. 2: (M, K)
            z = stack * wts.T.unsqueeze(-1)  # Eq. 3: (K, M, Cp²)
            a1 = self.a1[s] if self.config.blocks == 2 else None
            xs.append(self._chunked(lambda z_, a=a1, s=s: self._stage(self.stage1[s], a, z_), z))  # Eq. 5: (K, M, F)
            pre = self._chunked(self.agg_pre[s], xs[-1])[0]  # Pre_s: (M, Cp²)
            if s == 0:
                centre, e = stack[0], self._aggregate(0, pre, u0.shape[-2:], b)  # P_0(i); Eq. 6
            else:  # Eq. 6: undo the centre weight w_{1,1} before averaging, redo it after (|w_{1,1}| ≥ w11_min)
                w11, w_min = wts[:, :1], self.config.w11_min  # (M, 1)
                w11 = torch.where(w11 < 0, -1.0, 1.0) * w11.abs().clamp_min(w_min) if w_min > 0 else w11
                e = self._aggregate(1, pre / w11, u1.shape[-2:], b) * w11
            ys.append(self._chunked(self.agg_post[s], e))  # Post_s: (K, M, F)
        a2 = self.a2 if self.config.blocks == 2 else None
        noise = self._chunked(lambda *t: self.out(self._stage(self.stage2, a2, torch.cat(t, 0)))[0], *xs, *ys)  # Eqs. 7–8
        est = centre - noise  # x̂(i) = P_0(i) − n̂(i)
        omega = torch.exp(-self.beta.abs() * est.var(dim=-1, unbiased=False, keepdim=True))  # (M, 1)
        num = F.fold((est * omega).view(b, -1, est.shape[-1]).transpose(1, 2), u0.shape[-2:], p, stride=st)
        den = F.fold(omega.view(b, -1, 1).expand(-1, -1, p * p).transpose(1, 2), u0.shape[-2:], p, stride=st)
        x = (num / den)[..., q:q + h, q:q + w]  # Eq. 9, crop the padding
        return x / 2 + m  # back to [0, 1]: (x̂ + 2m − 1 + 1)/2

    # ------------------------------------------------------------------ monitoring
    def dictionary(self) -> Tensor:
        """The first pixel-axis transform of scale 0, W_v of L_{0,0}, as F atoms (F, C, p, p)."""
        p = self.config.patch_size
        first = self.get_submodule("stage1.0.0")
        assert isinstance(first, SepLayer)  # built so in __init__
        return first.ver.detach().view(-1, self.config.channels, p, p)

    @torch.no_grad()
    def code_sparsity(self, y: Tensor) -> list[float]:
        """Fraction of non-zero activations after each ReLU layer (L_{0,·}, L_{1,·}, Post_0, Post_1, L_2, L_3),
        in eval mode (running BN statistics, which stay untouched)."""
        groups = (*self.stage1, self.agg_post, self.stage2)  # L_{0,·}, L_{1,·}, Post_0, Post_1, L_2, L_3
        layers = [m for group in groups for m in group.children() if isinstance(m, SepLayer)]  # all of them
        tallies: list[list[tuple[int, int]]] = [[] for _ in layers]  # one entry per patch chunk
        for layer, tally in zip(layers, tallies):
            layer.tally = tally
        was_training = self.training
        try:
            self.eval()(y)
            return [sum(t[0] for t in tally) / sum(t[1] for t in tally) for tally in tallies]
        finally:
            self.train(was_training)
            for layer in layers:
                layer.tally = None
