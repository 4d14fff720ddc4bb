"""sparsefold from Python: build a model from the registry, load a bundled checkpoint, denoise a tensor, and
train a tiny model programmatically (a few steps on the embedded default data), then load what it wrote.

    python examples/python_api.py [OUT_DIR]      # OUT_DIR: where the run goes (default: a temporary folder)

About 20 s on 2 CPU cores (the first run also shards scikit-image's photos into ~/.cache/sparsefold, or
$SPARSEFOLD_CACHE). Walk-through: docs/python-api.md.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from skimage import data as skimage_data

from sparsefold.config import load_run_config
from sparsefold.models import MODELS, build_model, count_parameters
from sparsefold.trainers.checkpoint import load_model
from sparsefold.trainers.evaluate import denoise, psnr
from sparsefold.trainers.loop import train

TINY = [  # on top of the packaged quickstart config: a 2-unfolding CSCNet, 3 steps, no W&B
    "model.depth=2", "model.filters=16", "data.patch_size=48", "data.batch_size=4", "data.num_workers=0",
    "data.val=builtin:skimage", "data.val_images=1", "trainer.max_steps=3", "trainer.val_every=3",
    "trainer.ckpt_every=3", "trainer.progress=false", "wandb.mode=disabled", "runtime.fused=false",
]


def registry_model() -> torch.nn.Module:
    """A fresh (untrained) CSCNet from the registry: ``MODELS[name].config`` is its config dataclass. The
    same bank as :func:`train_tiny`'s, so that run reuses its (memoized) power-method initialization."""
    config = MODELS["cscnet"].config(depth=2, filters=16, kernel_size=7, stride=2)
    model = build_model(config)
    print(f"registry: {config.name} with {count_parameters(model):,} parameters")
    return model


def noisy_photo(sigma: float = 25.0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(clean, noisy): a 128×128 crop of scikit-image's camera photo in [0, 1], shape (1, H, W), and it plus
    Gaussian noise of std ``sigma`` on the 8-bit scale."""
    clean = torch.from_numpy(skimage_data.camera()[200:328, 200:328]).float().div(255).unsqueeze(0)
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(seed)) * sigma / 255
    return clean, clean + noise


def denoise_with_bundled(clean: torch.Tensor, noisy: torch.Tensor) -> float:
    """Load the bundled σ=25 CSCNet by name and denoise one (C, H, W) tensor; returns the PSNR gain in dB."""
    model, meta = load_model("cscnet")  # a name, a checkpoint folder, a run folder or wandb:ENTITY/PROJECT/NAME:ALIAS
    restored = denoise(model, noisy, sigma=25.0)  # (C, H, W) in [0, 1]; large images are tiled
    gain = psnr(restored, clean) - psnr(noisy.clamp(0, 1), clean)
    print(f"bundled {meta['model']['name']}: {psnr(restored, clean):.2f} dB ({gain:+.2f} dB over the noisy input)")
    return gain


def train_tiny(out_dir: Path) -> dict[str, Any]:
    """The same run as ``sparsefold train`` + :data:`TINY` overrides, in this process; returns its summary
    (checkpoint, run_dir, steps, val_psnr, ...), the JSON line the CLI prints."""
    cfg = load_run_config(None, [*TINY, f"trainer.output_dir={out_dir}"])  # None: the packaged quickstart
    summary = train(cfg)
    print(f"trained {summary['steps']} steps -> {summary['checkpoint']} (val PSNR {summary['val_psnr']:.2f} dB)")
    return summary


def main(out_dir: Path) -> dict[str, Any]:
    """Every step above; returns what a test checks."""
    fresh = registry_model()
    clean, noisy = noisy_photo()
    with torch.inference_mode():
        assert fresh(noisy.unsqueeze(0)).shape == (1, *noisy.shape)  # a forward on a (B, C, H, W) batch
    gain = denoise_with_bundled(clean, noisy)
    summary = train_tiny(out_dir)
    trained, _ = load_model(summary["checkpoint"])  # what the run wrote loads like any checkpoint (eval mode)
    restored = denoise(trained, noisy)
    return {"gain_db": gain, "summary": summary, "trained_psnr": psnr(restored, clean)}


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory(prefix="sparsefold-example-") as tmp:
            main(Path(tmp))
