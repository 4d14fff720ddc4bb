"""Bundle the authors' DCEA releases (btolooshams/dea, MIT licence) as sparsefold models.

    python benchmarks/bundle_official_dcea.py [SRC_DIR]     # default ../shared/official/dcea

For every ``results/trained_models/model_{tied,untied}_peak*.pt`` in SRC_DIR it runs ``sparsefold import dcea``
into ``sparsefold/bundled/dcea-official-{tied,untied}-peak<P>/`` (weights, config.json, state.json: no
manifest, like the other bundles), records the source (repository, commit, path, SHA-256) in config.json,
copies the authors' LICENSE beside it (the MIT licence asks for its notice in every copy) and writes
TRAINING.md (where it comes from, the import command). Not part of the package.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

from sparsefold.trainers.importers import import_release

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "sparsefold" / "bundled"
REPO, COMMIT = "btolooshams/dea", "e21772e6b3d3492adf36f2168f5b2b3b7a4b31b4"


def bundle_name(src: Path) -> str:
    """model_tied_peak4.pt -> dcea-official-tied-peak4 (the name only; the hyperparameters come from the file)."""
    return "dcea-official-" + src.stem.removeprefix("model_").replace("_", "-")


def training_md(name: str, summary: dict, cfg: dict) -> str:
    src = summary["source"]
    return f"""# Bundled model `{name}`: the authors' DCEA release, imported

Not trained here. `{src['path']}` of [{REPO}](https://github.com/{REPO}) @ `{COMMIT[:8]}` (MIT licence, notice in
`LICENSE` beside this file; SHA-256 `{src['sha256']}`), the DCEA of Tolooshams, Song, Temereanca & Ba (ICML 2020),
imported by

```bash
sparsefold import dcea {src['file']} {name}
```

which reads the pickled module with sparsefold's restricted unpickler (nothing in it runs) and takes every
hyperparameter from the module's own attributes. The forward equals the official one within 1e-4
(`tests/test_import_dcea.py`).

| | |
|---|---|
| parameters | {summary['params']:,} |
| noise | {summary['noise']} (trained on counts Poisson(peak·x/max x): see README "Import the authors' weights") |
| model config | `{json.dumps(cfg['model'])}` |
"""


def main(argv: list[str]) -> int:
    src_dir = Path(argv[0]) if argv else ROOT.parent / "shared" / "official" / "dcea"
    licence = src_dir / "LICENSE"
    for src in sorted((src_dir / "results" / "trained_models").glob("model_*_peak*.pt")):
        name = bundle_name(src)
        with tempfile.TemporaryDirectory() as tmp:
            path = f"results/trained_models/{src.name}"
            summary = import_release("dcea", src, Path(tmp) / name,
                                     provenance={"repo": REPO, "commit": COMMIT, "path": path, "license": "MIT"})
            dst = BUNDLED / name
            if dst.exists():
                shutil.rmtree(dst)
            dst.mkdir(parents=True)
            for f in ("model.safetensors", "state.json"):
                shutil.copyfile(Path(tmp) / name / f, dst / f)
            cfg = json.loads((Path(tmp) / name / "config.json").read_text())
        cfg["params"] = summary["params"]  # listed by `sparsefold models` without building the model
        (dst / "config.json").write_text(json.dumps(cfg, indent=1, ensure_ascii=False))
        shutil.copyfile(licence, dst / "LICENSE")
        (dst / "TRAINING.md").write_text(training_md(name, summary, cfg))
        print(f"bundled {name} <- {src}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
