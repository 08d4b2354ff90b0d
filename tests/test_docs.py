"""The documentation: its examples run, its links resolve, it names every
command-line flag (and no flag that does not exist), and the front page
stays a front page."""

import re
import unicodedata
from pathlib import Path

import pytest
from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
PAGES = [README, *sorted(DOCS.glob("*.md")), ROOT / "bench" / "README.md"]
# Where the docs describe the flags of model.py and serve.py.
FLAG_PAGES = [DOCS / "app.md", DOCS / "http.md", DOCS / "scaling.md"]
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*(?![\w])")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
README_LIMIT = 15_000  # bytes


def test_layers_page_examples_run(tmp_path, monkeypatch):
    page = DOCS / "layers.md"
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(), re.S)
    assert len(blocks) >= 4
    monkeypatch.chdir(tmp_path)  # an example saves a model
    namespace = {}
    for block in blocks:
        exec(compile(block, str(page), "exec"), namespace)


def test_readme_is_a_front_page():
    size = len(README.read_bytes())
    assert size <= README_LIMIT, (
        f"README.md is {size} bytes, more than {README_LIMIT}: move detail to "
        "docs/ and figures to bench/README.md"
    )


def test_readme_results_are_in_bench_readme():
    # The front page's figures are measured, so each is in bench/README.md
    # with the command that produced it.
    text = README.read_text(encoding="utf-8")
    results = text.split("\n## Results\n", 1)[1].split("\n## ", 1)[0]
    bench = (ROOT / "bench" / "README.md").read_text(encoding="utf-8")
    missing = [
        figure
        for figure in re.findall(r"\d+(?: \d{3}(?![\d.]))*(?:\.\d+)?", results)
        if figure not in bench
    ]
    assert not missing, f"README.md's Results not in bench/README.md: {missing}"


# --- Links -------------------------------------------------------------------


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation dropped (but
    `-` and `_`), spaces to `-`."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # link text
    text = text.replace("`", "").strip().lower()
    text = "".join(
        c for c in text if c in "-_ " or unicodedata.category(c)[0] in "LN"
    )
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    result = set()
    for heading in re.findall(r"^#{1,6} (.+)$", prose(page), re.M):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        result.add(base if count == 0 else f"{base}-{count}")
    return result


def prose(page: Path) -> str:
    """The page without its fenced code blocks."""
    return FENCE.sub("", page.read_text(encoding="utf-8"))


def test_slug_follows_github():
    assert slug("`layer_step_time.py` — step times") == (
        "layer_step_timepy--step-times"
    )
    assert slug('`"hash"`: a fixed hash') == "hash-a-fixed-hash"
    assert slug("Results") == "results"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    broken = []
    for target in LINK.findall(prose(page)):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.is_file():
            broken.append(f"{target}: no file {linked}")
        elif anchor and linked.suffix == ".md":
            if anchor not in anchors(linked):
                broken.append(f"{target}: no heading with that anchor")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


# What the pages name: repository paths (with a file suffix, or a folder
# ending in `/`) and dotted names under `moe`.
REPO_PATH = re.compile(
    r"(?<![\w./-])((?:moe|bench|tests|docs|\.ci)/(?:[\w.-]+/)*(?:[\w-]+\.\w+)?)"
    r"(?![\w/-])"
)
DOTTED_NAME = re.compile(r"(?<![\w.])(moe(?:\.[A-Za-z_]\w*)+)")


def resolves(name: str) -> bool:
    """Whether `moe.a.b.c` imports: the longest module prefix, then
    attributes."""
    import importlib

    parts = name.split(".")
    for split in range(len(parts), 0, -1):
        try:
            found = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for attribute in parts[split:]:
            found = getattr(found, attribute, None)
        return found is not None
    return False


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_named_paths_and_modules_exist(page):
    text = page.read_text(encoding="utf-8")
    missing = sorted(
        {path for path in REPO_PATH.findall(text) if not (ROOT / path).exists()}
        | {name for name in DOTTED_NAME.findall(text) if not resolves(name)}
    )
    assert not missing, (
        f"{page.relative_to(ROOT)} names what is not there: {missing}"
    )


# --- Flags -------------------------------------------------------------------


def help_flags(script: str, capsys) -> set[str]:
    """The flags of `python <script> --help`, asked in this process (on one
    wide line per option, so that no flag is cut at its hyphens)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("COLUMNS", "10000")
        with pytest.raises(SystemExit) as exit_info:
            load_script(script).main(["--help"])
    assert exit_info.value.code == 0
    return set(FLAG.findall(capsys.readouterr().out)) - {"--help"}


def documented_flags(page: Path) -> set[str]:
    """The flags a page gives as code: spans such as `--epochs 40` and
    command lines of `model.py` or `serve.py` (other commands' options, such
    as `ruff format --check`, are not counted)."""
    text = page.read_text(encoding="utf-8")
    chunks = re.findall(r"`([^`\n]+)`", FENCE.sub("", text))
    for block in FENCE.findall(text):
        chunks.extend(block.splitlines())
    flags = set()
    for chunk in chunks:
        chunk = chunk.strip()
        if chunk.startswith(("--", "...")) or re.search(
            r"\b(model|serve)\.py\b", chunk
        ):
            flags.update(FLAG.findall(chunk))
    return flags


def test_every_flag_is_documented(capsys):
    documented = set().union(*map(documented_flags, FLAG_PAGES))
    for script in ("model.py", "serve.py"):
        missing = help_flags(script, capsys) - documented
        assert not missing, (
            f"`python {script} --help` has flags that none of "
            f"{[p.name for p in FLAG_PAGES]} names: {sorted(missing)}"
        )


def test_documented_flags_exist(capsys):
    real = help_flags("model.py", capsys) | help_flags("serve.py", capsys)
    for page in [README, *FLAG_PAGES]:
        unknown = documented_flags(page) - real - {"--help"}
        assert not unknown, (
            f"{page.relative_to(ROOT)} names flags that neither model.py nor "
            f"serve.py has: {sorted(unknown)}"
        )


def test_flag_tables_show_the_defaults():
    # A row `| `--epochs` | 40 | ... |` shows the parser's default; rows
    # whose default is prose ("the built-in corpus") are not compared.
    from moe.lm import cli

    defaults = {
        option: action.default
        for action in cli.training_parser()._actions
        for option in action.option_strings
    }
    wrong = []
    for page in (README, DOCS / "app.md"):
        rows = re.findall(
            r"^\| `(--[a-z-]+)[^`]*` \| `?([\w.]+)`? \|", prose(page), re.M
        )
        for flag, shown in rows:
            if flag in defaults and shown != str(defaults[flag]):
                wrong.append(f"{page.name}: {flag} {shown} ({defaults[flag]})")
    assert not wrong, "; ".join(wrong)
