"""CPU cost of CSCNet (paper configuration) against DnCNN-S, in one run, on the same images and noise.

    python benchmarks/bench_cscnet_vs_dncnn.py --data ../shared/data/bsd68 --images 68 \\
        --out benchmarks/results/cscnet_vs_dncnn.json

Measures (see benchmarks/README.md):
  * inference: median seconds per image under torch.inference_mode, after a 1-image warm-up; the two
    models alternate image by image so that a change of machine load hits both alike;
  * training: one Adam step (forward + backward + step, MSE) on a batch of random 128² noisy patches,
    median of 5 after 1 warm-up, for both models on the same batch;
  * FLOPs counted analytically (2 × multiply-adds of the GEMMs/convolutions; elementwise work ignored),
    cross-checked against torch.utils.flop_counter on the warm-ups; achieved GFLOP/s, the fraction of the
    fp32 GEMM ceiling of this machine kind (../shared/notes/cpu-ceilings.md) and the time arithmetic alone
    would need.

Weights are random unless a checkpoint is given: timing does not depend on the values.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

GEMM_FP32_GFLOPS = 194.0  # matmul fp32 2048³, 2 threads (cpu-ceilings.md)
CONV3X3_FP32_GFLOPS = 139.0  # conv2d 64→64 3×3 (cpu-ceilings.md), DnCNN's own layer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", default="../shared/data/bsd68", help="folder of test images (sorted by name)")
    p.add_argument("--images", type=int, default=68, help="first N images of the sorted folder")
    p.add_argument("--sigma", type=float, default=25.0, help="noise std on the 0..255 scale")
    p.add_argument("--seed", type=int, default=0, help="seed of the one noise generator (evaluation convention)")
    p.add_argument("--out", default="benchmarks/results/cscnet_vs_dncnn.json", help="JSON result file")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--no-mallopt", action="store_true", help="do NOT apply sparsefold.runtime.configure_cpu_allocator")
    p.add_argument("--no-fused", action="store_true", help="eager soft threshold (no torch.compile kernels)")
    p.add_argument("--label", default="", help="what code this run measures (e.g. 'before: HEAD cbf0340')")
    p.add_argument("--train-batch", type=int, default=4)
    p.add_argument("--patch", type=int, default=128)
    p.add_argument("--train-steps", type=int, default=5, help="timed Adam steps (after 1 warm-up)")
    p.add_argument("--skip-train", action="store_true", help="inference only")
    p.add_argument("--gemm-floor", action="store_true",
                   help="also time CSCNet's GEMMs alone (GemmFloor), alternated with the models")
    p.add_argument("--cscnet-ckpt", default="", help="optional state_dict (.pt/.pth/.safetensors) for CSCNet")
    p.add_argument("--dncnn-ckpt", default="", help="optional state_dict (.pt/.pth/.safetensors) for DnCNN")
    return p.parse_args(argv)


# ------------------------------------------------------------------ analytic FLOPs (2 × multiply-adds)


def cscnet_geometry(h: int, w: int, kernel: int, stride: int) -> dict[str, int]:
    from sparsefold.models.convops import shift_geometry

    top, bottom, left, right = shift_geometry(h, w, kernel, stride)
    ph, pw = h + top + bottom, w + left + right
    return dict(ph=ph, pw=pw, code_h=(ph - kernel) // stride + 1, code_w=(pw - kernel) // stride + 1)


def cscnet_macs(cfg: Any, h: int, w: int, batch: int = 1) -> dict[str, float]:
    """Multiply-adds of one forward on ``batch`` images of h×w, over all s² shifts.

    Per shift and code position: B y once, then (A γ, B(·)) for each of the T−1 unfoldings, then C γ:
    2T products of K·C·k² each. ``padding_overhead`` = code positions × s² / pixels.
    """
    g = cscnet_geometry(h, w, cfg.kernel_size, cfg.stride)
    positions = batch * cfg.stride**2 * g["code_h"] * g["code_w"]
    per_op = positions * cfg.filters * cfg.channels * cfg.kernel_size**2  # one A, B or C application
    return dict(forward=2 * cfg.depth * per_op, first_analysis=per_op,
                padding_overhead=g["code_h"] * g["code_w"] * cfg.stride**2 / (h * w), **g)


def dncnn_macs(cfg: Any, h: int, w: int, batch: int = 1) -> dict[str, float]:
    """Multiply-adds of one forward: 3×3 convolutions C→F, (D−2)·F→F, F→C at every pixel (BN/ReLU ignored)."""
    f, c = cfg.features, cfg.channels
    first = 9 * c * f * h * w * batch
    per_pixel = 9 * (c * f + (cfg.depth - 2) * f * f + f * c)
    return dict(forward=per_pixel * h * w * batch, first_analysis=first)


def train_macs(m: dict[str, float]) -> float:
    """Forward + backward: every GEMM/conv needs a weight gradient (same cost as its forward) and an input
    gradient, except the first one, whose input (the noisy image) does not require a gradient."""
    return 3 * m["forward"] - m["first_analysis"]


class GemmFloor:
    """CSCNet's GEMMs and nothing else: the 2T products of one forward (``train=True``: and the 2T weight
    gradients and 2T−1 input gradients of the backward) as single ``torch.mm`` calls on operands laid out
    beforehand (no im2col/col2im, no soft threshold, no allocation), at the shapes of an image of h×w.

    Any implementation of the paper model that computes its convolutions as GEMMs takes at least this long on
    this BLAS, so "CSCNet no slower than DnCNN" needs this floor below DnCNN's whole forward, in the same run.
    Operands are made per distinct shape on first use (warm-up image / step: outside the timed calls)."""

    def __init__(self, cfg: Any, train: bool = False) -> None:
        self.cfg, self.train = cfg, train
        self.operands: dict[int, tuple[Any, ...]] = {}

    def __call__(self, h: int, w: int, batch: int = 1) -> None:
        import torch

        cfg = self.cfg
        g = cscnet_geometry(h, w, cfg.kernel_size, cfg.stride)
        positions = batch * cfg.stride**2 * g["code_h"] * g["code_w"]
        if positions not in self.operands:
            taps, k_ = cfg.channels * cfg.kernel_size**2, cfg.filters
            self.operands[positions] = (torch.rand(k_, taps), torch.rand(taps, positions), torch.rand(k_, positions),
                                        torch.empty(k_, positions), torch.empty(taps, positions),
                                        torch.empty(k_, taps))
        wb, cols, codes, out_codes, out_cols, out_w = self.operands[positions]
        for _ in range(cfg.depth):  # forward: B (analysis) and A / C (synthesis), T each
            torch.mm(wb, cols, out=out_codes)
            torch.mm(wb.t(), codes, out=out_cols)
        if self.train:  # backward: a weight gradient per product, an input gradient for all but the first B
            for i in range(cfg.depth):
                torch.mm(codes, cols.t(), out=out_w)
                torch.mm(codes, cols.t(), out=out_w)
                torch.mm(wb.t(), codes, out=out_cols)
                if i:
                    torch.mm(wb, cols, out=out_codes)


# ------------------------------------------------------------------ helpers


def load_weights(model: Any, path: str) -> str:
    """Hook for trained weights: a raw state_dict, or a dict holding one under 'model' / 'state_dict'."""
    if not path:
        return "random"
    import torch

    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        for key in ("model", "state_dict", "model_state"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
                break
    state = {k.removeprefix("module."): v for k, v in state.items()}
    model.load_state_dict(state, strict=True)
    return f"checkpoint:{path}"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def count_flops(fn: Callable[[], Any]) -> tuple[int, Any]:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        out = fn()
    return counter.get_total_flops(), out


def psnr(out: Any, clean: Any) -> float:
    import torch

    mse = float(torch.mean((out.clamp(0, 1) - clean) ** 2))
    return 10.0 * __import__("math").log10(1.0 / mse)


def rate(flops: float, seconds: float) -> dict[str, float]:
    gflops = flops / seconds / 1e9 if seconds > 0 else float("nan")
    return dict(achieved_gflops=gflops, fraction_of_gemm_ceiling=gflops / GEMM_FP32_GFLOPS,
                arithmetic_lower_bound_s=flops / (GEMM_FP32_GFLOPS * 1e9))


# ------------------------------------------------------------------ the two measurements


def bench_inference(models: dict[str, Any], noisy: list[Any], clean: list[Any],
                    floor: GemmFloor | None = None) -> dict[str, Any]:
    import torch

    res: dict[str, Any] = {}
    with torch.inference_mode():
        if floor is not None:
            for y in noisy:  # operands for every image shape, before any timing
                floor(*y.shape[-2:])
            res["cscnet_gemm_floor"] = dict(seconds=[])
        for name, (model, _, macs_fn) in models.items():  # warm-up on image 0, FLOPs counted by torch
            model.eval()
            rss0 = peak_rss_mb()
            t, (flops, _) = timed(lambda: count_flops(lambda: model(noisy[0][None])))
            h, w = noisy[0].shape[-2:]
            res[name] = dict(warmup_s=t, counted_gflop_image0=flops / 1e9,
                             analytic_gflop_image0=2 * macs_fn(h, w)["forward"] / 1e9,
                             peak_rss_mb_after_warmup=peak_rss_mb(), peak_rss_mb_before_warmup=rss0,
                             seconds=[], psnr_db=[])
        for i, (y, x) in enumerate(zip(noisy, clean)):  # alternate the models image by image
            for name, (model, _, _) in models.items():
                t, out = timed(lambda: model(y[None]))
                res[name]["seconds"].append(t)
                res[name]["psnr_db"].append(psnr(out[0], x))
            if floor is not None:
                res["cscnet_gemm_floor"]["seconds"].append(timed(lambda: floor(*y.shape[-2:]))[0])
            print(f"  image {i + 1}/{len(noisy)} {tuple(y.shape[-2:])}: "
                  + "  ".join(f"{n} {res[n]['seconds'][-1]:.3f}s" for n in models), flush=True)
    for name, (_, _, macs_fn) in models.items():
        r = res[name]
        flops = [2 * macs_fn(*y.shape[-2:])["forward"] for y in noisy]
        r["gflop_per_image"] = statistics.median(flops) / 1e9
        r["median_s"] = statistics.median(r["seconds"])
        r["mean_psnr_db"] = statistics.fmean(r["psnr_db"])
        r.update(rate(sum(flops) / len(flops), statistics.fmean(r["seconds"])))
        r["arithmetic_lower_bound_s"] = statistics.median(flops) / (GEMM_FP32_GFLOPS * 1e9)
    if floor is not None:
        r = res["cscnet_gemm_floor"]
        r["median_s"] = statistics.median(r["seconds"])
        r["over_dncnn"] = r["median_s"] / res["dncnn"]["median_s"]
    return res


def train_step(model: Any, opt: Any, yb: Any, xb: Any) -> float:
    import torch

    opt.zero_grad(set_to_none=True)
    loss = torch.nn.functional.mse_loss(model(yb), xb)
    loss.backward()
    opt.step()
    return float(loss.detach())


def bench_training(models: dict[str, Any], yb: Any, xb: Any, steps: int,
                   floor: GemmFloor | None = None) -> dict[str, Any]:
    import torch

    res: dict[str, Any] = {}
    if floor is not None:
        args = (yb.shape[-2], yb.shape[-1], yb.shape[0])
        floor(*args)  # operands and a warm-up
        times = [timed(lambda: floor(*args))[0] for _ in range(steps)]
        res["cscnet_gemm_floor"] = dict(seconds=times, median_s=statistics.median(times))
    for name, (_, build, macs_fn) in models.items():
        model = build().train()  # a fresh copy: the inference model is left untouched
        opt = torch.optim.Adam(model.parameters(), lr=1e-4, eps=1e-3)
        t_warm, (flops, _) = timed(lambda: count_flops(lambda: train_step(model, opt, yb, xb)))
        times = []
        for i in range(steps):
            t, _ = timed(lambda: train_step(model, opt, yb, xb))
            times.append(t)
            print(f"  {name} train step {i + 1}/{steps}: {t:.3f}s", flush=True)
        macs = macs_fn(yb.shape[-2], yb.shape[-1], batch=yb.shape[0])
        analytic = 2 * train_macs(macs)
        med = statistics.median(times)
        res[name] = dict(warmup_s=t_warm, seconds=times, median_s=med, gflop_per_step=analytic / 1e9,
                         counted_gflop_warmup_step=flops / 1e9, **rate(analytic, med))
    if floor is not None:
        res["cscnet_gemm_floor"]["over_dncnn"] = res["cscnet_gemm_floor"]["median_s"] / res["dncnn"]["median_s"]
    return res


# ------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load_start = os.getloadavg()

    # The allocator setting must come before any large tensor exists.
    if args.no_mallopt:
        os.environ["SPARSEFOLD_NO_MALLOPT"] = "1"
    from sparsefold.runtime import configure_cpu_allocator

    mallopt = configure_cpu_allocator()
    why = "--no-mallopt" if args.no_mallopt else ("" if mallopt else "not Linux/glibc, or mallopt refused")
    print(f"configure_cpu_allocator(): {'applied' if mallopt else 'NOT applied'}" + (f" ({why})" if why else ""))
    import sparsefold.runtime as runtime

    fuse = getattr(runtime, "configure_process", None)  # absent before the fused soft threshold (issue 17)
    if fuse is not None and not args.no_fused:
        fuse()  # what evaluate/denoise and training (runtime.fused) run with
    fused = fuse is not None and not args.no_fused

    import torch

    from sparsefold.datasets import gaussian_eval_noise, list_images, load_image
    from sparsefold.models import CSCNetConfig, DnCNNConfig, build_model, count_parameters

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    files = list_images(args.data)[: args.images]
    if not files:
        print(f"no images in {args.data}", file=sys.stderr)
        return 2
    clean = [load_image(f) for f in files]
    noisy = gaussian_eval_noise(clean, args.sigma, seed=args.seed)

    csc_cfg = CSCNetConfig(depth=12, filters=175, kernel_size=11, stride=8)
    dn_cfg = DnCNNConfig()

    def build_csc() -> Any:
        return build_model(csc_cfg)

    def build_dn() -> Any:
        torch.manual_seed(0)  # DnCNN's init draws from the global RNG
        return build_model(dn_cfg)

    csc, dn = build_csc(), build_dn()
    weights = {"cscnet": load_weights(csc, args.cscnet_ckpt), "dncnn": load_weights(dn, args.dncnn_ckpt)}
    models = {  # DnCNN first: its (small) peak RSS is measured before CSCNet's (large) one
        "dncnn": (dn, build_dn, lambda h, w, batch=1: dncnn_macs(dn_cfg, h, w, batch)),
        "cscnet": (csc, build_csc, lambda h, w, batch=1: cscnet_macs(csc_cfg, h, w, batch)),
    }
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {len(files)} images from {args.data}, "
          f"sigma {args.sigma:g}, load average at start {load_start[0]:.2f}")

    print("inference (torch.inference_mode, 1 warm-up image, models alternate per image):")
    inf = bench_inference(models, noisy, clean, GemmFloor(csc_cfg) if args.gemm_floor else None)

    train: dict[str, Any] = {}
    if not args.skip_train:
        g = torch.Generator().manual_seed(args.seed + 1)
        crops = []
        for _ in range(args.train_batch):
            x = clean[int(torch.randint(len(clean), (1,), generator=g))]
            r = int(torch.randint(x.shape[-2] - args.patch + 1, (1,), generator=g))
            c = int(torch.randint(x.shape[-1] - args.patch + 1, (1,), generator=g))
            crops.append(x[:, r : r + args.patch, c : c + args.patch])
        xb = torch.stack(crops)
        yb = xb + args.sigma / 255.0 * torch.randn(xb.shape, generator=g)
        print(f"training step (Adam, MSE, batch {args.train_batch}×{args.patch}², median of {args.train_steps} "
              "after 1 warm-up):")
        train = bench_training(models, yb, xb, args.train_steps,
                               GemmFloor(csc_cfg, train=True) if args.gemm_floor else None)

    load_end = os.getloadavg()
    report = report_table(inf, train, {n: count_parameters(m[0]) for n, m in models.items()}, weights)
    print(report)
    print(f"load average: start {load_start[0]:.2f} / end {load_end[0]:.2f} on {os.cpu_count()} CPUs "
          "(> ~0.5 before the run means the numbers are contended)")

    result = dict(
        date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        torch=torch.__version__, python=platform.python_version(), cpu=cpu_name(), cpus=os.cpu_count(),
        threads=torch.get_num_threads(), mallopt_applied=mallopt, no_mallopt_flag=args.no_mallopt, fused=fused,
        label=args.label, code=runtime.__file__,
        loadavg_start=list(load_start), loadavg_end=list(load_end), peak_rss_mb=peak_rss_mb(),
        args=vars(args), images=[f.name for f in files], weights=weights,
        configs={"cscnet": dataclasses.asdict(csc_cfg), "dncnn": dataclasses.asdict(dn_cfg)},
        parameters={n: count_parameters(m[0]) for n, m in models.items()},
        ceilings_gflops={"matmul_fp32": GEMM_FP32_GFLOPS, "conv3x3_64_fp32": CONV3X3_FP32_GFLOPS},
        cscnet_padding_overhead=statistics.median(cscnet_macs(csc_cfg, *y.shape[-2:])["padding_overhead"]
                                                  for y in noisy),
        inference=inf, training=train,
        ratio_cscnet_over_dncnn={"inference_median_s": inf["cscnet"]["median_s"] / inf["dncnn"]["median_s"],
                                 **({"train_step_median_s": train["cscnet"]["median_s"] / train["dncnn"]["median_s"]}
                                    if train else {})},
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def report_table(inf: dict[str, Any], train: dict[str, Any], params: dict[str, int], weights: dict[str, str]) -> str:
    c, d = inf["cscnet"], inf["dncnn"]
    rows: list[tuple[str, str, str, str]] = [
        ("parameters", f"{params['cscnet']:,}", f"{params['dncnn']:,}", ""),
        ("weights", weights["cscnet"], weights["dncnn"], ""),
        ("inference: median s / image", f"{c['median_s']:.3f}", f"{d['median_s']:.3f}",
         f"{c['median_s'] / d['median_s']:.2f}"),
        ("  GFLOP / image (analytic)", f"{c['gflop_per_image']:.1f}", f"{d['gflop_per_image']:.1f}",
         f"{c['gflop_per_image'] / d['gflop_per_image']:.2f}"),
        ("  GFLOP image 0: counted by torch", f"{c['counted_gflop_image0']:.1f}", f"{d['counted_gflop_image0']:.1f}", ""),
        ("  achieved GFLOP/s (mean)", f"{c['achieved_gflops']:.1f}", f"{d['achieved_gflops']:.1f}", ""),
        ("  % of fp32 GEMM ceiling (194)", f"{100 * c['fraction_of_gemm_ceiling']:.1f}",
         f"{100 * d['fraction_of_gemm_ceiling']:.1f}", ""),
        ("  arithmetic lower bound s / image", f"{c['arithmetic_lower_bound_s']:.3f}",
         f"{d['arithmetic_lower_bound_s']:.3f}", ""),
        ("  mean PSNR dB (random weights: meaningless)" if "random" in weights.values() else "  mean PSNR dB",
         f"{c['mean_psnr_db']:.2f}", f"{d['mean_psnr_db']:.2f}", ""),
        ("  peak RSS MB after warm-up", f"{c['peak_rss_mb_after_warmup']:.0f}",
         f"{d['peak_rss_mb_after_warmup']:.0f}", ""),
    ]
    if "cscnet_gemm_floor" in inf:
        f = inf["cscnet_gemm_floor"]
        rows.insert(3, ("  CSCNet's GEMMs alone (floor)", f"{f['median_s']:.3f}", "", f"{f['over_dncnn']:.2f}"))
    if train:
        tc, td = train["cscnet"], train["dncnn"]
        rows += [
            ("train step: median s", f"{tc['median_s']:.3f}", f"{td['median_s']:.3f}",
             f"{tc['median_s'] / td['median_s']:.2f}"),
            *([("  CSCNet's GEMMs alone (floor)", f"{train['cscnet_gemm_floor']['median_s']:.3f}", "",
                f"{train['cscnet_gemm_floor']['over_dncnn']:.2f}")] if "cscnet_gemm_floor" in train else []),
            ("  GFLOP / step (analytic)", f"{tc['gflop_per_step']:.1f}", f"{td['gflop_per_step']:.1f}", ""),
            ("  GFLOP warm-up step: counted", f"{tc['counted_gflop_warmup_step']:.1f}",
             f"{td['counted_gflop_warmup_step']:.1f}", ""),
            ("  achieved GFLOP/s", f"{tc['achieved_gflops']:.1f}", f"{td['achieved_gflops']:.1f}", ""),
            ("  % of fp32 GEMM ceiling (194)", f"{100 * tc['fraction_of_gemm_ceiling']:.1f}",
             f"{100 * td['fraction_of_gemm_ceiling']:.1f}", ""),
            ("  arithmetic lower bound s", f"{tc['arithmetic_lower_bound_s']:.3f}",
             f"{td['arithmetic_lower_bound_s']:.3f}", ""),
        ]
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len("CSCNet (paper)"), *(len(r[1]) for r in rows))
    w2 = max(len("DnCNN-S"), *(len(r[2]) for r in rows))
    lines = [f"{'':{w0}}  {'CSCNet (paper)':>{w1}}  {'DnCNN-S':>{w2}}  {'CSCNet/DnCNN':>12}"]
    lines.append("-" * len(lines[0]))
    lines += [f"{a:{w0}}  {b:>{w1}}  {c_:>{w2}}  {r:>12}" for a, b, c_, r in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
