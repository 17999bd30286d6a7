"""Every notebook runs top to bottom at small settings, and its stored .ipynb is the executed form of its .py source."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
SOURCES = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.py"))

nbformat = pytest.importorskip("nbformat", reason="notebook tests need the dev extra: pip install -e '.[dev]'")
jupytext = pytest.importorskip("jupytext", reason="notebook tests need the dev extra: pip install -e '.[dev]'")


def _code(nb) -> list[str]:
    return [c.source.strip() for c in nb.cells if c.cell_type == "code" and c.source.strip()]


def test_there_are_notebooks():
    assert len(SOURCES) >= 1, f"no notebooks/NN_*.py sources in {NOTEBOOK_DIR}"


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_stored_notebook_matches_its_source_and_has_outputs(source):
    stored = source.with_suffix(".ipynb")
    assert stored.exists(), f"{stored.name} missing: run `jupytext --to ipynb --execute {source.name}` in notebooks/"
    nb = nbformat.read(stored, as_version=4)
    assert _code(nb) == _code(jupytext.read(source)), f"{stored.name} is stale: re-execute it from {source.name}"
    code_cells = [c for c in nb.cells if c.cell_type == "code" and c.source.strip()]
    assert all(c.get("execution_count") for c in code_cells), f"{stored.name} has unexecuted cells"
    errors = [o for c in code_cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, f"{stored.name} was stored with an error: {errors[0].get('ename')}: {errors[0].get('evalue')}"


@pytest.mark.slow
@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_notebook_runs_at_small_settings(source, monkeypatch):
    from nbclient import NotebookClient

    monkeypatch.setenv("DIFFLAB_NB_SMALL", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # as run_cli: two threads on a busy 2-core machine oversubscribe it
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = jupytext.read(source)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK_DIR)}}).execute()
