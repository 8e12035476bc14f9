"""The user-facing prose: the README and docs/ describe the software as it is, every relative link
resolves inside the repository, and the pages stay short enough to read."""

import glob
import os
import re

import pytest

from helpers import REPO

PAGES = ["README.md"] + sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "docs", "*.md")))
SOURCES = sorted(os.path.relpath(p, REPO) for d in ("ddpm_jax", "experiments", "configs", "benchmarks")
                 for p in glob.glob(os.path.join(REPO, d, "**", "*.py"), recursive=True))

# Development history: when or in which working session something was measured, which tracker
# issue asked for it. Git history holds that; the prose describes the software as it is.
HISTORY = [re.compile(r"\bsessions?\b", re.I), re.compile(r"\bissue\s*#?\s*\d+", re.I),
           re.compile(r"\b(first|second|third|fourth|fifth|sixth|seventh|eighth|ninth|tenth) (session|run|try)\b", re.I)]


def _text(path):
    with open(os.path.join(REPO, path), encoding="utf-8") as f:
        return f.read()


@pytest.mark.parametrize("path", PAGES + SOURCES)
def test_no_development_history(path):
    hits = [f"{path}:{i}: {line.strip()}" for i, line in enumerate(_text(path).splitlines(), 1)
            if any(p.search(line) for p in HISTORY)]
    assert not hits, "history in the prose (say what the software does, not when it got there):\n" + "\n".join(hits)


@pytest.mark.parametrize("path", PAGES)
def test_relative_links_resolve(path):
    text = re.sub(r"```.*?```", "", _text(path), flags=re.S)  # links, not code
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        file = target.split("#")[0]
        if not os.path.exists(os.path.normpath(os.path.join(REPO, os.path.dirname(path), file))):
            broken.append(target)
    assert not broken, f"{path} links to files that do not exist: {broken}"


@pytest.mark.parametrize("path", PAGES)
def test_docs_need_nothing_outside_the_repository(path):
    """Only the README's offline training command names the data directory beside the checkout."""
    lines = [line for line in _text(path).splitlines() if "../shared" in line]
    if path == "README.md":
        lines = [line for line in lines if not line.startswith(("python3 -m pip", "# train on MNIST"))]
    assert not lines, f"{path} leans on files outside the repository: {lines}"


@pytest.mark.parametrize("path, limit", [("README.md", 150), ("docs/performance.md", 150)])
def test_pages_stay_short(path, limit):
    n = len(_text(path).splitlines())
    assert n <= limit, f"{path} has {n} lines; keep it to {limit} (move detail to a page of its own)"
