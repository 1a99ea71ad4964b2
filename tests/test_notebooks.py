"""notebooks/: committed without outputs (fast check); each runs top to bottom with nbclient (slow)."""

from __future__ import annotations

import pytest
from fsseg_testing import REPO, compose, tiny_overrides

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    names = {p.stem for p in NOTEBOOKS}
    assert {"01_browse_episodes", "02_compare_predictions", "03_inside_apanet"} <= names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_committed_notebook_has_no_outputs(path):
    """Strip outputs before committing (README, section Notebooks, has the command)."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.get("outputs") == [], f"{path.name} cell {i} has outputs: strip them before committing"
            assert cell.get("execution_count") is None, f"{path.name} cell {i} has an execution count"
    assert "widgets" not in nb.metadata, f"{path.name}: widget state in the metadata"


@pytest.fixture(scope="module")
def two_runs(synth_root, tmp_path_factory):
    """Two tiny finished run directories (PFENet, APANet) evaluated on the same manifest."""
    from fsseg.cli.train import run

    tmp = tmp_path_factory.mktemp("nbruns")
    dirs = {}
    for label, extra in {"PFENet": {}, "APANet": {"experiment": "apanet_effl0_synth"}}.items():
        cfg = compose(tiny_overrides(synth_root, tmp / "cache", **extra))
        run(cfg, tmp / label)
        dirs[label] = tmp / label
    return dirs


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, synth_root, two_runs, tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("FSSEG_NB_DATA", str(synth_root))
    monkeypatch.setenv("FSSEG_NB_OUT", str(tmp_path))
    monkeypatch.setenv("FSSEG_NB_RUNS", ";".join(f"{k}={v}" for k, v in two_runs.items()))
    monkeypatch.delenv("FSSEG_NB_APANET_RUN", raising=False)  # 03: an untrained APANet (ImageNet encoder)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}).execute()
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert images, f"{path.name} drew no figure"
    # the committed file is untouched (executed in memory)
    assert all(c.get("outputs") == [] for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code")
