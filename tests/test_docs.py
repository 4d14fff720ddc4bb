"""The docs cannot rot: every command in ``docs/*.md`` is checked against the code, and the Python runs.

* Each line of a fenced ``bash`` block (backslash continuations joined, ``#`` comments, ``&&``/``|``/``&``
  and redirections split off, leading ``VAR=value`` dropped) that runs ``sparsefold`` is parsed by the real
  parser (``sparsefold.cli.parser``; an argparse error fails); then ``train`` goes through ``--print-config``
  (``cmd_train``: the file and overrides resolved and validated, nothing trained), ``sweep`` through
  ``--dry-run`` (every point of the space validated, nothing started) and ``launch`` through its own
  pre-submit checks. Placeholders (CKPT, /path/to/images) are fine where nothing reads them.
* ``sparsefold train --print-config ... > FILE`` writes FILE and a ```` ```yaml ```` block whose first line is
  ``# file: NAME`` is NAME, for the later commands of the same page (a scratch folder, never the repository).
* Any word of any shell line that names a repository path (``cluster/rayjob.yaml``) must exist; the command
  after ``ray job submit ... --`` is checked as above; a ``{000..009}`` shard range must be quoted (bash
  would expand it).
* Relative links (and their ``#anchors``) of the docs and of the README's Documentation section resolve.
* The Python of ``docs/python-api.md`` and ``examples/python_api.py`` runs (a 3-step training each; marked
  ``slow``: ~22 s for the first of the two on 2 cores, ~3 s for the second).

The checker is tested too: planted broken commands must each produce an error.
"""

from __future__ import annotations

import contextlib
import io
import math
import re
import runpy
import shlex
from pathlib import Path

import pytest
import yaml

from sparsefold.cli import parser
from sparsefold.launch import check_sweep, check_train

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md"))
WORKFLOW_PAGES = ("local-run.md", "ray-cluster.md", "kuberay.md", "sweeps.md", "import-weights.md", "python-api.md",
                  "restoration.md")
REPO_PATH = re.compile(r"^(?:cluster|sparsefold|sweeps|examples|docs|benchmarks|models|datasets|trainers)/")
OPERATORS = {"|", "||", "&&", ";", "&", ">", ">>", "<", "<<", "2>", "&>", "|&"}
REDIRECTS = {">", ">>", "<", "2>", "&>"}
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_]\w*=")
FENCE = re.compile(r"^```(\w*)\s*$")


def fenced_blocks(text: str) -> list[tuple[str, int, list[str]]]:
    """(language, first line number, lines) of every fenced block."""
    blocks, lang, start, body = [], None, 0, []
    for n, line in enumerate(text.splitlines(), 1):
        m = FENCE.match(line.strip())
        if m and lang is None:
            lang, start, body = m[1], n + 1, []
        elif line.strip() == "```" and lang is not None:
            blocks.append((lang, start, body))
            lang = None
        elif lang is not None:
            body.append(line)
    return blocks


def shell_lines(start: int, body: list[str]) -> list[tuple[int, str]]:
    """(line number, logical line): continuations joined, heredoc bodies skipped."""
    out: list[tuple[int, str]] = []
    pending, first, heredoc = "", start, None
    for n, line in enumerate(body, start):
        if heredoc is not None:
            heredoc = None if line.strip() == heredoc else heredoc
            continue
        first = n if not pending else first
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        logical, pending = pending + line, ""
        m = re.search(r"<<-?\s*['\"]?(\w+)['\"]?", logical)
        heredoc = m[1] if m else None
        if logical.strip():
            out.append((first, logical.strip()))
    return out


def segments(line: str) -> list[tuple[list[str], str | None]]:
    """The simple commands of a shell line: (words without leading VAR=value, the file stdout goes to)."""
    lex = shlex.shlex(line, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    tokens, out, words, target, i = list(lex), [], [], None, 0
    while i < len(tokens):
        tok = tokens[i]
        if tok in REDIRECTS:
            target = tokens[i + 1] if tok in (">", ">>") and i + 1 < len(tokens) else target
            i += 2
            continue
        if tok in OPERATORS:
            out.append((words, target))
            words, target = [], None
        else:
            words.append(tok)
        i += 1
    out.append((words, target))
    return [(list(without_env(w)), t) for w, t in out if w]


def without_env(words: list[str]) -> list[str]:
    i = 0
    while i < len(words) and ENV_ASSIGNMENT.match(words[i]):
        i += 1
    return words[i:]


def run_quietly(fn, *args) -> str:
    """``fn(*args)``'s stdout; stderr (warnings, argparse usage) is swallowed."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        fn(*args)
    return out.getvalue()


def check_sparsefold(args: list[str], made: dict[str, Path], target: str | None, scratch: Path) -> None:
    """Parse ``sparsefold ARGS`` and validate what the command would run (module docstring); raises."""
    args = [str(made.get(a, a)) for a in args]
    err = io.StringIO()
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            a = parser().parse_args(args)
    except SystemExit as e:
        if e.code not in (0, None):
            raise AssertionError(f"argparse: {err.getvalue().strip().splitlines()[-1]}") from None
        return  # --help, --version
    if a.cmd == "train":
        a.print_config = True
        printed = run_quietly(a.fn, a)
        if target is not None:
            made[target] = scratch / Path(target).name
            made[target].write_text(printed)
    elif a.cmd == "sweep":
        a.dry_run = True
        run_quietly(a.fn, a)
    elif a.cmd == "launch":
        run_quietly(check_sweep if a.sweep else check_train, a.config, list(a.overrides))
        if a.runtime_env and not (ROOT / a.runtime_env).is_file():
            raise AssertionError(f"--runtime-env {a.runtime_env}: no such file in the repository")


def check_words(words: list[str], made: dict[str, Path], target: str | None, scratch: Path) -> None:
    for w in words:
        if REPO_PATH.match(w) and not any(c in w for c in "*?{") and not (ROOT / w).exists():
            raise AssertionError(f"{w}: no such file in the repository")
    if words[0] == "sparsefold":
        check_sparsefold(words[1:], made, target, scratch)
    elif words[:3] == ["ray", "job", "submit"] and "--" in words:
        rest = words[words.index("--") + 1:]
        if rest[:1] == ["sparsefold"]:
            check_sparsefold(rest[1:], made, None, scratch)


def check_markdown(text: str, where: str, scratch: Path) -> tuple[list[str], int]:
    """Errors (``where:line: command: why``) of every shell line of ``text``, and how many sparsefold
    commands were checked."""
    errors, checked, made = [], 0, {}
    for lang, start, body in fenced_blocks(text):
        if lang == "yaml" and body and body[0].startswith("# file: "):
            name = body[0][len("# file: "):].strip()
            made[name] = scratch / name
            made[name].write_text("\n".join(body) + "\n")
        if lang not in ("bash", "sh", "shell"):
            continue
        for n, line in shell_lines(start, body):
            raw = shlex.shlex(line, posix=False)
            raw.whitespace_split = True
            if any(re.search(r"\{\d+\.\.\d+\}", w) and not re.search("['\"]", w) for w in raw):
                errors.append(f"{where}:{n}: {line}: unquoted {{a..b}} range (bash expands it): quote the word")
            for words, target in segments(line):
                checked += words[0] == "sparsefold" or (words[:3] == ["ray", "job", "submit"] and "sparsefold" in words)
                try:
                    check_words(words, made, target, scratch)
                except Exception as e:  # noqa: BLE001  (any failure of the real code is the finding)
                    errors.append(f"{where}:{n}: {line}: {type(e).__name__}: {str(e).strip()}")
    return errors, checked


@pytest.fixture
def in_root(monkeypatch):
    """Commands run from the repository root, as the docs assume; W&B and caches stay out of it."""
    monkeypatch.chdir(ROOT)


def test_docs_pages_exist_and_are_indexed():
    assert {p.name for p in PAGES} == {"README.md", *WORKFLOW_PAGES}
    index = (DOCS / "README.md").read_text()
    readme = (ROOT / "README.md").read_text()
    for name in WORKFLOW_PAGES:
        assert f"]({name})" in index, f"docs/README.md does not link {name}"
        assert f"](docs/{name})" in readme, f"README.md's Documentation section does not link docs/{name}"


@pytest.mark.parametrize("page", [p.name for p in PAGES])
def test_every_command_of_a_page_is_valid(page, tmp_path, in_root):
    errors, checked = check_markdown((DOCS / page).read_text(), f"docs/{page}", tmp_path)
    assert not errors, "\n".join(errors)
    if page not in ("README.md", "python-api.md"):
        assert checked >= 1, f"docs/{page}: no sparsefold command was checked"


BROKEN = {
    "unknown flag": "sparsefold train --no-such-flag",
    "missing positional": "sparsefold evaluate",
    "unknown subcommand": "sparsefold fly cscnet",
    "continued line": "sparsefold denoise cscnet in.png out.png \\\n  --no-such-flag",
    "bad value": "sparsefold train model.stride=99",
    "unknown key": "sparsefold train trainer.no_such_key=1",
    "missing config": "sparsefold train no-such-config.yaml",
    "bad sweep point": "sparsefold sweep cscnet_depth_filters 'space.model.depth={grid: [0, 4]}'",
    "relative launch output": "sparsefold launch cluster/cscnet.yaml trainer.output_dir=runs --address http://h:8265",
    "missing repo file": "kubectl apply -f cluster/no-such-rayjob.yaml",
    "bad submitted command": ("ray job submit --address http://127.0.0.1:8265 --runtime-env cluster/runtime_env.yaml "
                              "-- sparsefold train cluster/cscnet.yaml model.depth=0"),
    "unquoted shard range": "sparsefold train ray.enabled=true data.train=s3://b/train-{000000..000009}.tar",
    "config file never made": "sparsefold train --print-config > made.yaml\nsparsefold train other.yaml",
}


@pytest.mark.parametrize("command", BROKEN.values(), ids=BROKEN.keys())
def test_a_planted_broken_command_fails_the_checker(command, tmp_path, in_root):
    errors, _ = check_markdown(f"Text.\n\n```bash\nsparsefold models\n{command}\n```\n", "planted.md", tmp_path)
    assert len(errors) == 1, errors


def test_the_checker_follows_files_a_page_makes(tmp_path, in_root):
    page = ("```bash\nsparsefold train --print-config model.depth=3 > mine.yaml   # then edit it\n"
            "sparsefold train mine.yaml trainer.max_steps=5 && echo done\n```\n"
            "```yaml\n# file: spec.yaml\nname: s\nbase: quickstart.yaml\nspace:\n  model.depth: {grid: [2, 3]}\n```\n"
            "```bash\nsparsefold sweep spec.yaml --dry-run\nRAY_AUTH_MODE=token ray job submit -- sparsefold --version\n```\n")
    assert check_markdown(page, "ok.md", tmp_path) == ([], 4)
    assert yaml.safe_load((tmp_path / "mine.yaml").read_text())["model"]["depth"] == 3
    assert not list(ROOT.glob("mine.yaml")) and not list(ROOT.glob("spec.yaml"))


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def anchors(md: Path) -> set[str]:
    """GitHub's heading anchors of a Markdown file (headings inside code blocks are not headings)."""
    out, fence = set(), False
    for line in md.read_text().splitlines():
        fence = fence != line.startswith("```")
        if not fence and (m := re.match(r"#{1,6} (.+)", line)):
            out.add(re.sub(r"[^\w\- ]", "", m[1].strip().lower()).replace(" ", "-"))
    return out


def bad_links(text: str, page: str) -> list[str]:
    """Relative links of ``text`` (a file at ``page``, relative to the root) whose file or anchor is missing."""
    bad = []
    for target in LINK.findall(text):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = target.partition("#")
        dest = (ROOT / page).parent / path if path else ROOT / page
        if not dest.exists():
            bad.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    return bad


@pytest.mark.parametrize("page", [*(p.relative_to(ROOT).as_posix() for p in PAGES), "README.md"])
def test_relative_links_resolve(page):
    text = (ROOT / page).read_text()
    if page == "README.md":
        text = text.split("## Documentation", 1)[1].split("\n## ", 1)[0]
    assert not bad_links(text, page), f"{page}: " + "; ".join(bad_links(text, page))


def test_a_planted_broken_link_is_found():
    text = "[a](local-run.md#train-on-your-images) [b](local-run.md#no-such) [c](nope.md) [d](../README.md#wb)"
    assert bad_links(text, "docs/x.md") == ["local-run.md#no-such: no heading #no-such in docs/local-run.md",
                                            "nope.md: no such file"]


def test_kuberay_page_shows_the_real_entrypoint():
    docs = [yaml.safe_load("\n".join(b)) for lang, _, b in fenced_blocks((DOCS / "kuberay.md").read_text()) if lang == "yaml"]
    job = next(d for d in yaml.safe_load_all((ROOT / "cluster" / "rayjob.yaml").read_text()) if d["kind"] == "RayJob")
    assert [d["entrypoint"] for d in docs if "entrypoint" in d] == [job["spec"]["entrypoint"]]


@pytest.fixture
def sandbox(tmp_path, cache_dir, monkeypatch):
    """A scratch working directory; the builtin photos' shards in the session cache (never ~/.cache)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SPARSEFOLD_CACHE", str(cache_dir))
    return tmp_path


@pytest.mark.slow  # ~22 s alone on 2 cores (sharding the photos, CSCNet's power-method init); ~3 s after the other
def test_python_api_page_runs(sandbox):
    code = "\n".join("\n".join(b) for lang, _, b in fenced_blocks((DOCS / "python-api.md").read_text())
                     if lang == "python")
    ns: dict = {}
    with contextlib.redirect_stdout(io.StringIO()):
        exec(compile(code, str(DOCS / "python-api.md"), "exec"), ns)  # noqa: S102  (our own docs)
    assert ns["summary"]["steps"] == 3 and Path(ns["summary"]["checkpoint"]).is_relative_to(sandbox / "runs")
    assert ns["psnr"](ns["restored"], ns["clean"]) > ns["psnr"](ns["noisy"].clamp(0, 1), ns["clean"]) + 3
    assert ns["batch_out"].shape == (1, *ns["noisy"].shape)


@pytest.mark.slow  # as test_python_api_page_runs: the first of the two pays for the shards and the init
def test_example_script_runs(sandbox):
    example = runpy.run_path(str(ROOT / "examples" / "python_api.py"))
    with contextlib.redirect_stdout(io.StringIO()):
        out = example["main"](sandbox / "out")
    assert out["gain_db"] > 3  # the bundled σ=25 CSCNet on a σ=25 photo crop: +8.5 dB measured
    assert out["summary"]["steps"] == 3 and Path(out["summary"]["checkpoint"]).is_relative_to(sandbox / "out")
    assert math.isfinite(out["trained_psnr"])  # the trained checkpoint loaded and denoised
