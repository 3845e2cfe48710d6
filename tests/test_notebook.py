"""example.ipynb runs top to bottom in its quick mode, against the CPU demo's smoke checkpoint, and is
committed without outputs."""

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from scripts import demo

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "example.ipynb"


def test_notebook_is_committed_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.outputs == [] and c.execution_count is None for c in code)


@pytest.fixture
def smoke_demo(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("demo")
    demo.main(demo.get_parser().parse_args(["--quick", "--workdir", str(workdir)]))
    return workdir


def test_notebook_runs_in_quick_mode(smoke_demo, tmp_path, monkeypatch):
    out = tmp_path / "nb"
    monkeypatch.setenv("SYNCHFORMER_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("SYNCHFORMER_NOTEBOOK_DIR", str(out))
    monkeypatch.setenv("SYNCHFORMER_DEMO_DIR", str(smoke_demo))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}).execute()

    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert f"--ckpt_path {smoke_demo / 'stage2' / 'stage2_best.pt'}" in text  # no download in quick mode
    assert "Prediction Results" in text and "DeSync:" in text and "drift.mp4: offset" in text
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) == 4  # class probabilities, offset over time, DeSync bars, similarity matrices
    assert {p.name for p in out.iterdir()} >= {"clip.mp4", "probs.png", "drift.mp4", "track", "desync.csv"}
