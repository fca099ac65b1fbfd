"""The whole olive-recipes corpus (tests/data/olive/recipes-all: every workflow JSON at a pinned
commit) imported in-process, without building (bench/olive_corpus.py): no traceback, no file doit
cannot load, every file full, partial (with its left-out lines) or refused (one line); every
`params.X = V` a comment states is what the target does; the README's full count holds."""

from __future__ import annotations

import importlib.util
import re

import pytest

from conftest import REPO
from test_olive_fidelity import assert_comments_match


@pytest.fixture(scope="module")
def corpus():
    spec = importlib.util.spec_from_file_location("olive_corpus", REPO / "bench" / "olive_corpus.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def results(corpus, tmp_path_factory):
    files = sorted(corpus.CORPUS.glob("*.json"))
    assert len(files) == 700  # every workflow JSON of olive-recipes at 851b284a (recipes-all/SOURCES.md)
    work = tmp_path_factory.mktemp("corpus")
    return [corpus.classify(path, work, keep_text=True) for path in files]


def test_every_file_is_full_partial_or_refused_in_one_line(corpus, results):
    broken = [(r["file"], r["message"]) for r in results if r["status"] == "broken"]
    assert not broken, broken  # no traceback, no file doit cannot load
    for r in results:
        if r["status"] == "refused":
            message = r["message"]
            assert "\n" not in message and message.startswith(f"{corpus.CORPUS / r['file']}: "), r
        elif r["status"] == "partial":
            assert r["left_out"] and all(line.startswith("left out: ") for line in r["left_out"]), r
            assert all(f"# {line}" in r["text"] for line in r["left_out"]), r["file"]  # each is a comment of the file
        else:
            assert r["status"] == "full" and not r["left_out"] and "# left out:" not in r["text"], r["file"]


def test_comments_state_what_is_built(results):
    """Each `params.X = V` of a target's comment is that target's param, on every imported file."""
    import tomllib

    checked = 0
    for r in results:
        if r["status"] in ("full", "partial"):
            assert_comments_match(r["text"], tomllib.loads(r["text"]).get("target", {}))
            checked += 1
    assert checked > 100


def test_full_count_holds_the_readme_figure(corpus, results):
    facts = corpus.summary(results)
    readme = (REPO / "README.md").read_text()
    row = re.search(r"\| olive-recipes, all \| (\d+) \| (\d+) \| (\d+) \| (\d+) \|", readme)
    assert row, "the README's olive-recipes table"
    files, full = int(row.group(1)), int(row.group(2))
    assert files == len(results)
    assert facts["counts"]["full"] >= full, (facts["counts"], full)
