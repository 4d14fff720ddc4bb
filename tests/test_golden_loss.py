"""Golden losses (torchtitan style): the first steps of a fixed-seed tiny CSCNet run on CPU must give the
losses stored in ``tests/assets/golden_losses_cscnet.json``. Any change to the loop, the data order, the
noise, the model's maths or the optimizer moves them; a change meant to move them regenerates the file
(``python tests/test_golden_loss.py``) and says why in its commit.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import sparsefold.trainers.loop as loop
from sparsefold.config import load_config
from sparsefold.trainers.tracking import NullTracker

pytestmark = pytest.mark.usefixtures("one_thread")

GOLDEN = Path(__file__).resolve().parent / "assets" / "golden_losses_cscnet.json"
STEPS = 10


class LossRecorder(NullTracker):
    """Stands in for the W&B tracker: keeps ``train/loss`` by step."""

    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def log(self, metrics: dict, step: int) -> None:
        if "train/loss" in metrics:
            self.losses[step] = metrics["train/loss"]

    def log_images(self, images, step) -> None:
        pass

    def finish(self) -> None:
        pass


def images(d: Path, n: int = 4) -> Path:
    """``n`` fixed 64×64 grey images (a seeded smooth pattern + texture): data that no library update moves."""
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:64, 0:64] / 64.0
    for i in range(n):
        img = 128 + 80 * np.sin(2 * np.pi * (xx * (i + 1) + yy * 0.5)) + rng.normal(0, 20, (64, 64))
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(d / f"im{i}.png")
    return d


def run_losses(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The per-step training losses of the golden run (one thread, no loader workers, no W&B)."""
    rec = LossRecorder()
    monkeypatch.setattr(loop, "make_tracker", lambda *a, **k: rec)
    data = images(tmp / "img")
    cfg = load_config(None, [
        "model.name=cscnet", "model.depth=3", "model.filters=8", "model.kernel_size=5", "model.stride=2",
        f"data.train={data}", f"data.val={data}", "data.val_images=1", "data.patch_size=32", "data.batch_size=2",
        "data.num_workers=0", "data.shuffle_buffer=8", f"data.cache_dir={tmp / 'cache'}", "noise.sigma=25",
        f"trainer.output_dir={tmp / 'runs'}", "trainer.progress=false", f"trainer.max_steps={STEPS}",
        "trainer.log_every=1", "trainer.val_every=1000", "trainer.ckpt_every=1000", "runtime.threads=1",
        "trainer.seed=7", "optim.lr=1e-3", "optim.schedule=constant", "optim.warmup_steps=0", "wandb.mode=disabled",
    ])
    loop.train(cfg)
    return [rec.losses[s] for s in range(1, STEPS + 1)]


def test_first_losses_match_the_golden_file(tmp_path, monkeypatch):
    golden = json.loads(GOLDEN.read_text())
    losses = run_losses(tmp_path, monkeypatch)
    assert len(golden["losses"]) == STEPS
    np.testing.assert_allclose(losses, golden["losses"], rtol=1e-4, atol=0)
    assert len(set(np.round(losses, 6))) > 1  # the losses do move: a stuck run would not pin anything


if __name__ == "__main__":  # regenerate: python tests/test_golden_loss.py
    import tempfile

    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp, pytest.MonkeyPatch.context() as mp:
        out = run_losses(Path(tmp), mp)
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps({"what": "train/loss of steps 1..10, tests/test_golden_loss.py:run_losses",
                                  "torch": torch.__version__, "losses": out}, indent=1) + "\n")
    print(GOLDEN, out, file=sys.stderr)
