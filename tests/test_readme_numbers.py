"""The README's measured numbers are the ones recipes/reproduce_readme.py wrote to docs/results/readme_numbers.json.

Two checks per numbers block of README.md and docs/recipes.md: the block is exactly what the results file renders
to, and, independently of the renderer, every decimal number printed in it is a value of the results file (as a
fraction, a percentage, or seconds/minutes), so neither a hand edit of the README nor a renderer that prints the
wrong field gets through.
"""

import json
import os
import re
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "recipes"))
import reproduce_readme  # noqa: E402

DOCUMENTS = {"README.md": os.path.join(ROOT, "README.md"), "docs/recipes.md": os.path.join(ROOT, "docs", "recipes.md")}


def _results():
    with open(reproduce_readme.RESULTS_FILE) as f:
        return json.load(f)


def _read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def _numbers_in(value):
    """Every number of a JSON value, recursively."""
    if isinstance(value, bool):
        return []
    if isinstance(value, (int, float)):
        return [float(value)]
    if isinstance(value, dict):
        return [n for v in value.values() for n in _numbers_in(v)]
    if isinstance(value, list):
        return [n for v in value for n in _numbers_in(v)]
    return []


def _explained(printed: str, values) -> bool:
    """A printed decimal matches a value of the file at its printed precision: as is, x100 (percent), x1000 (ms),
    /60 (minutes), or as a ratio/difference of two values (overheads, ranges, epochs) when nothing simpler fits."""
    decimals = len(printed.split(".")[1])
    target = float(printed)
    half = 0.5 * 10**-decimals + 1e-9
    for v in values:
        for scaled in (v, 100 * v, 1000 * v, v / 60):
            if abs(scaled - target) <= half or abs(-scaled - target) <= half:
                return True
    return False


def test_the_results_file_has_every_part_the_readme_shows():
    results = _results()
    shown = set()
    for path in DOCUMENTS.values():
        shown |= set(reproduce_readme.blocks(_read(path)))
    assert {"main_job", "autoattack", "methods"} <= shown, "the README lost a numbers block"
    missing = sorted(shown - set(results))
    assert not missing, f"blocks {missing} have no section in {reproduce_readme.RESULTS_FILE}"
    for name in shown:
        section = results[name]
        assert section["machine"] and section["date"] and section["command"]
        assert section.get("recorded_run") or section["wall_seconds"] > 0, f"{name}: no wall time"


@pytest.mark.parametrize("document", sorted(DOCUMENTS))
def test_every_numbers_block_is_what_the_results_file_renders(document):
    text = _read(DOCUMENTS[document])
    rendered = reproduce_readme.render_document(text, _results())
    for name, block in reproduce_readme.blocks(text).items():
        assert block == reproduce_readme.blocks(rendered)[name], (
            f"{document}: the numbers:{name} block differs from {reproduce_readme.RESULTS_FILE}; regenerate it with "
            "`python recipes/reproduce_readme.py --render_only` (or rerun the part), never by hand"
        )


@pytest.mark.parametrize("document", sorted(DOCUMENTS))
def test_every_decimal_in_a_numbers_block_is_a_value_of_the_results_file(document):
    results = _results()
    for name, block in reproduce_readme.blocks(_read(DOCUMENTS[document])).items():
        values = _numbers_in(results[name])
        # derived numbers (overheads, epoch seconds) need pairs of values: add ratios and products of the section's
        values += [a / b - 1 for a in values for b in values if b] if name == "gpu" else []
        values += [a * 391 for a in values] if name == "gpu" else []
        body = re.sub(r"\d{4}-\d{2}-\d{2}", "", block)  # dates
        body = re.sub(r"torch [\w.+]+", "", body)  # versions
        unexplained = [p for p in re.findall(r"(?<![\w./])\d+\.\d+(?![\w/])", body) if not _explained(p, values)]
        assert not unexplained, f"{document}, block {name}: {unexplained} are in no field of the results file"


def test_the_checker_catches_a_hand_edited_number(tmp_path):
    """A README whose main-job median was edited by hand fails both checks."""
    results = _results()
    text = _read(DOCUMENTS["README.md"])
    block = reproduce_readme.blocks(text)["main_job"]
    median = f"{results['main_job']['summary']['final_pgd']['median']:.4f}"
    assert median in block
    edited = text.replace(median, f"{float(median) + 0.0123:.4f}")
    assert (
        reproduce_readme.blocks(reproduce_readme.render_document(edited, results))["main_job"]
        != reproduce_readme.blocks(edited)["main_job"]
    )
    values = _numbers_in(results["main_job"])
    assert not _explained(f"{float(median) + 0.0123:.4f}", values)
