"""Copy trained zoo checkpoints into the package as bundled models (``sparsefold/bundled/<name>/``).

    python benchmarks/bundle.py benchmarks/results/zoo_gaussian_s25.json lista=lista deep_ksvd=deep_ksvd ...

For each ``NAME=ENTRY`` it copies the entry's final checkpoint (weights, config, state — no optimizer) and
writes a TRAINING.md with the exact training command, the CPU budget and the measured scores, so that
``sparsefold evaluate NAME DIR`` and ``sparsefold denoise NAME IN OUT`` work out of the box.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "sparsefold" / "bundled"


# Same convention (shared data README), BSD68 at sigma=25: where a budget model stands.
BSD68_S25 = {"BM3D": 28.62, "DnCNN-S (published weights)": 29.23}


def reference(r: dict, cfg: dict) -> str:
    noise, bsd = cfg["run"]["noise"], r["scores"].get("BSD68")
    if noise["kind"] != "gaussian" or noise.get("sigma") != 25 or not bsd:
        return ""
    gaps = ", ".join(f"{bsd['psnr'] - v:+.2f} dB vs {k} ({v})" for k, v in BSD68_S25.items())
    return (f"\nOn BSD68 at σ=25 it stands at {gaps}. For a better model, run the command below with a larger "
            "`trainer.budget_cpu_seconds` (or a `trainer.max_steps` instead of the budget) and bundle the result.\n")


def main(argv: list[str]) -> int:
    result_file, pairs = Path(argv[0]), [a.split("=", 1) for a in argv[1:]]
    data = json.loads(result_file.read_text())
    # the suite file the results came from (recorded by bench_zoo.py; older result files: guessed from the name)
    suite_file = data.get("suite_file", f"benchmarks/zoo/{result_file.stem.removeprefix('zoo_')}.yaml")
    for name, entry in pairs:
        r = data["results"][entry]
        src = Path(r["train"]["checkpoint"])
        dst = BUNDLED / name
        if dst.exists():
            shutil.rmtree(dst)
        dst.mkdir(parents=True)
        for f in ("model.safetensors", "config.json", "state.json"):
            shutil.copy2(src / f, dst / f)
        text = (src / "config.json").read_text().replace(str(ROOT) + "/", "")  # no paths of this machine
        cfg = json.loads(text)
        cfg["params"] = r["train"]["params"]  # listed by `sparsefold models` without building the model
        (dst / "config.json").write_text(json.dumps(cfg, indent=1, ensure_ascii=False))
        scores = "\n".join(f"| {t} ({' '.join(map(str, s_args))}) | **{s['psnr']:.2f} dB** PSNR, SSIM {s['ssim']:.3f}; "
                           f"noisy input {s['input_psnr']:.2f} dB; {s['cpu_sec_per_image']:.2f} CPU s/image |"
                           for t, s, s_args in ((t, s, [x for test in data['suite']['models'][entry].get('tests', data['suite']['tests'])
                                                        if test['name'] == t for x in test.get('args', [])])
                                                for t, s in r["scores"].items()))
        (dst / "TRAINING.md").write_text(f"""# Bundled model `{name}` — {cfg['model']['name']}, {cfg['run']['noise']['kind']} noise

Trained by `benchmarks/bench_zoo.py {suite_file}` (entry `{entry}`): the CLI on
`../shared/data/bsd432` (gray) under a budget of {data['suite']['budget_cpu_seconds']} process CPU-seconds (one
thread), {r['train']['steps']} steps of {cfg['run']['data']['batch_size']} patches {cfg['run']['data']['patch_size']}²,
on a 2-core CPU machine ({data['date']}). It is a budget model, not a reproduction of the paper's training.
{reference(r, cfg)}

| | |
|---|---|
| parameters | {r['train']['params']:,} |
| model config | `{json.dumps(cfg['model'])}` |
{scores}

Training command (from the repository root, `../shared/data` beside it):

```bash
sparsefold train {' '.join(r['overrides']).replace(str(ROOT) + '/', '')}
```
""")
        print(f"bundled {name} <- {src}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
