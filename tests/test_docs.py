"""The user-facing prose: the README and docs/ describe the software as it is, every relative link
resolves inside the repository, and the pages stay short enough to read."""

import glob
import json
import os
import re

import numpy as np
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


# ------------------------------------------------------------------------------------------------
# Numbers say where they come from: results tables agree with the files they cite, every results
# file records its provenance, and no committed output names a directory of the machine that wrote it
# ------------------------------------------------------------------------------------------------

RESULTS = os.path.join(REPO, "docs", "results")
#: A decimal number as the docs print it: 4.51, 0.0096, 1,112.5, −0.22 (integers are counts,
#: sizes and settings: not checked).
DECIMAL = re.compile(r"(?<![\w.])[−-]?\d{1,3}(?:,\d{3})*\.\d+(?:e[−-]?\d+)?(?![\d])|(?<![\w.,])[−-]?\d+\.\d+(?:e[−-]?\d+)?(?![\d])")
#: Files that are runs' own records, not reports: a run's config and its training metrics
#: (``config.json``, ``metrics.jsonl``, also with a prefix naming the run).
RUN_RECORDS = ("config.json", "metrics.jsonl")


def _numbers(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _numbers(v)
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield float(obj)


def _file_numbers(path):
    text = open(path, encoding="utf-8").read()
    if path.endswith(".json"):
        return list(_numbers(json.loads(text)))
    if path.endswith(".jsonl"):
        return [v for line in text.splitlines() if line.strip() for v in _numbers(json.loads(line))]
    return [float(m.replace(",", "")) for m in re.findall(r"\d[\d,]*(?:\.\d+)?", text)]


def _tables(text):
    """(line number, the prose since the last heading or table, the table's rows) per table."""
    lines, out, i = text.splitlines(), [], 0
    while i < len(lines):
        if not lines[i].startswith("|"):
            i += 1
            continue
        j = i
        while j < len(lines) and lines[j].startswith("|"):
            j += 1
        k = i - 1
        while k >= 0 and not lines[k].startswith(("#", "|")):
            k -= 1
        out.append((i + 1, "\n".join(lines[k + 1:i]), lines[i:j]))
        i = j
    return out


def _cited_tables():
    for page in PAGES:
        for lineno, lead, rows in _tables(_text(page)):
            targets = re.findall(r"\]\(([^)\s]+)\)", lead + "\n" + "\n".join(rows))
            files = [os.path.normpath(os.path.join(REPO, os.path.dirname(page), t.split("#")[0])) for t in targets]
            files = [f for f in files if f.startswith(RESULTS) and f.endswith((".json", ".jsonl", ".log", ".txt"))]
            if any(f.endswith((".json", ".jsonl")) for f in files):
                yield f"{page}:{lineno}", files, rows


@pytest.mark.parametrize("where, files, rows", list(_cited_tables()), ids=lambda v: v if isinstance(v, str) else "")
def test_results_tables_print_what_their_files_hold(where, files, rows):
    """Each decimal number in a results table that cites a JSON file under docs/results/ is a
    value of the cited files (the table's own or its lead-in paragraph's) to the precision it is
    printed with: |value − printed| ≤ half a unit of its last digit (a percentage: of 100·value;
    a speed-up printed as ×r: of the ratio of two of the files' values)."""
    values = np.array(sorted({v for f in files for v in _file_numbers(f)}))
    ratios = None
    missing = []
    for row in rows[2:]:  # past the header and the rule
        for cell in row.strip().strip("|").split("|"):
            cell = re.sub(r"\]\([^)]*\)", "]", cell)  # link targets are not numbers
            for m in DECIMAL.finditer(cell):
                printed = m.group()
                x = float(printed.replace("−", "-").replace(",", ""))
                mantissa, _, exponent = printed.replace("−", "-").partition("e")
                half = 0.5 * 10.0 ** (int(exponent or 0) - len(mantissa.split(".")[1])) * (1 + 1e-9)
                if cell[max(0, m.start() - 1):m.start()] == "×" or cell[m.end():m.end() + 1] == "×":
                    if ratios is None:  # a speed-up: the ratio of two of the file's values
                        nonzero = values[values != 0]
                        ratios = (nonzero[:, None] / nonzero[None, :]).ravel()
                    found = np.any(np.abs(ratios - x) <= half)
                else:
                    found = np.any(np.abs(values - x) <= half) or np.any(np.abs(100 * values - x) <= half)
                if not found:
                    missing.append(printed)
    assert not missing, f"{where}: {missing} are in none of {[os.path.relpath(f, REPO) for f in files]}"


def _results_files():
    return sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(RESULTS, "**", "*.json*"), recursive=True))


@pytest.mark.parametrize("path", [p for p in _results_files() if not p.endswith(RUN_RECORDS)])
def test_every_results_file_records_its_provenance(path):
    from ddpm_jax import provenance

    text = _text(path)
    if path.endswith("provenance.jsonl"):  # a training run's: a record per command
        blocks = [json.loads(line) for line in text.splitlines() if line.strip()]
    elif path.endswith(".jsonl"):  # benchmark output: the provenance is a line of its own
        blocks = [json.loads(line)["provenance"] for line in text.splitlines() if '"provenance"' in line]
    else:
        blocks = [json.loads(text).get("provenance")]
    assert blocks and blocks[-1], f"{path} has no provenance block"
    block = blocks[-1]
    assert set(provenance.REQUIRED_FIELDS) <= set(block), f"{path}: provenance lacks {set(provenance.REQUIRED_FIELDS) - set(block)}"
    assert block["command"].startswith("python "), f"{path}: provenance.command {block['command']!r}"
    assert block["machine"].get("cores") and block["machine"].get("platform"), f"{path}: provenance.machine {block['machine']}"
    if block["git"].get("commit") is None:  # a file older than the scripts' records says so
        assert block.get("reconstructed") and block["git"].get("first_committed_in"), path


#: An absolute path on a POSIX machine: /work/…, /tmp/…, /home/… (a path in a command a user
#: types, e.g. a venv in the docs' prose, is not output and lives in the .md pages, not here).
ABSOLUTE = re.compile(r"(?<![\w.~/-])/(?:work|tmp|home|root|Users|mnt|scratch|opt|usr|var|data)/")


def test_no_committed_output_holds_an_absolute_path():
    files = [p for p in glob.glob(os.path.join(RESULTS, "**", "*"), recursive=True) if os.path.isfile(p)
             and p.endswith((".json", ".jsonl", ".log", ".txt", ".csv"))]
    assert files
    hits = [f"{os.path.relpath(p, REPO)}:{i}: {line.strip()[:120]}" for p in files
            for i, line in enumerate(open(p, encoding="utf-8"), 1) if ABSOLUTE.search(line)]
    assert not hits, "absolute paths of the machine that wrote these files:\n" + "\n".join(hits[:20])
