"""Execute ``notebooks/curation_tour.ipynb`` end to end (what CI does) and check its outputs.

The kernel is the interpreter running the tests (a kernelspec written to a temporary
directory), so a ``python3`` kernelspec installed elsewhere on the machine cannot be picked
up instead. Everything the notebook writes goes to ``$CURATION_TOUR_DIR``.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "curation_tour.ipynb"


def kernel_manager(directory: Path):
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    spec = directory / "python3"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(
        json.dumps({"argv": argv, "display_name": "Python 3", "language": "python"})
    )
    specs = KernelSpecManager(kernel_dirs=[str(directory)], ensure_native_kernel=False)
    return KernelManager(kernel_name="python3", kernel_spec_manager=specs)


def stream_text(nb) -> str:
    return "".join(
        out.get("text", "")
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
        if out.get("output_type") == "stream"
    )


@pytest.mark.slow
def test_curation_tour_notebook(tmp_path, monkeypatch):
    workdir = tmp_path / "tour"
    monkeypatch.setenv("CURATION_TOUR_DIR", str(workdir))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert not any(cell.get("outputs") for cell in nb.cells if cell.cell_type == "code"), (
        "commit the notebook without outputs"
    )
    client = nbclient.NotebookClient(
        nb,
        km=kernel_manager(tmp_path / "kernels"),
        timeout=300,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()  # raises CellExecutionError, naming the cell, on any error

    text = stream_text(nb)
    kept = int(re.search(r"records kept: (\d+) of 128", text).group(1))
    exported = int(re.search(r"exported records: (\d+)", text).group(1))
    read_back = int(re.search(r"read back: (\d+) records", text).group(1))
    assert 0 < kept < 128
    assert exported == read_back == kept
    assert "bytes identical to the input: True" in text
    assert f"exported {kept} of 128 records" in text
    for figure in ("score_histograms.png", "kept_and_removed.png"):
        assert (workdir / figure).stat().st_size > 1000
    images = [
        out
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.outputs
        if "image/png" in out.get("data", {})
    ]
    assert len(images) == 2
    assert sorted(p.name for p in (workdir / "curated").glob("*.tar")) == [
        f"{n:05d}.tar" for n in range(-(-kept // 20))
    ]
