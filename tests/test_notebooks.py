"""The stage notebooks are committed clean and parameterised the papermill way.
(`make test` also executes every notebook with nbmake on configs/smoke.yaml.)"""
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
EXPECTED = ["00_data.ipynb", "01_teacher_adaptation.ipynb", "02_knowledge_transfer.ipynb",
            "03_student_refinement.ipynb", "04_evaluation.ipynb"]


def test_one_notebook_per_step():
    assert [p.name for p in NOTEBOOKS] == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_without_outputs(path):
    book = nbformat.read(path, as_version=4)
    for cell in book.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: clear outputs before committing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_one_parameters_cell_defaulting_to_the_demo(path):
    book = nbformat.read(path, as_version=4)
    tagged = [c for c in book.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{path.name}: papermill needs exactly one cell tagged 'parameters'"
    assert '"configs/demo.yaml"' in tagged[0].source and "run_name = None" in tagged[0].source


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_logic_lives_in_the_package(path):
    """Notebooks are thin callers: no function or class definitions of their own."""
    book = nbformat.read(path, as_version=4)
    for cell in book.cells:
        if cell.cell_type == "code":
            assert "def " not in cell.source and "class " not in cell.source, path.name


def test_browse_draws_into_an_image_widget_and_follows_its_controls(tmp_path, monkeypatch):
    """No Output widget: papermill hung on one that the cell cleared and redrew into."""
    import io

    import ipywidgets as widgets
    from PIL import Image

    from cast.inspection import RunInspector
    from cast.notebook import browse
    from test_app import make_synthetic_run

    box = browse(make_synthetic_run(tmp_path))
    (image, source, threshold), message, picture = box.children[0].children, box.children[1], box.children[2]
    assert not any(isinstance(w, widgets.Output) for w in (*box.children, *box.children[0].children))
    ground_truth = picture.value
    assert Image.open(io.BytesIO(ground_truth)).format == "PNG" and message.value == ""
    source.value = "predictions/student_refinement"
    threshold.value = 0.0
    assert picture.value != ground_truth and message.value == ""
    source.value = source.options[0]
    assert picture.value == ground_truth
    # a source that cannot be drawn says why and leaves the last drawing in place
    def cannot_draw(*args):
        raise ValueError("cannot draw")

    monkeypatch.setattr(RunInspector, "overlay", cannot_draw)
    image.value = image.options[-1]
    assert message.value == "cannot draw" and picture.value == ground_truth


REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_an_executed_notebook_keeps_its_figures(tmp_path):
    """Figures drawn in a stage notebook are in the executed notebook (no module may switch
    matplotlib to a non-interactive backend behind the notebook's back)."""
    import papermill

    out = tmp_path / "00_data.ipynb"
    overrides = [f"output_dir={tmp_path / 'runs'}", f"data.root={tmp_path / 'smoke'}",
                 f"teacher.pretrain.cache_dir={tmp_path / 'cache'}"]
    papermill.execute_notebook(str(REPO / "notebooks" / "00_data.ipynb"), str(out), cwd=str(REPO),
                               kernel_name="python3", progress_bar=False,
                               parameters={"config": "configs/smoke.yaml", "overrides": overrides})
    book = nbformat.read(out, as_version=4)
    figures = [c for c in book.cells if c.cell_type == "code" and "show_samples(" in c.source]
    assert len(figures) == 2
    for cell in figures:
        assert any("image/png" in output.get("data", {}) for output in cell.outputs), cell.source
    assert (tmp_path / "runs" / "smoke" / "split.json").is_file()  # the overrides took: a fresh folder


@pytest.mark.slow
def test_make_lab_starts_jupyterlab_on_localhost_with_a_token():
    """`make lab`, as root (containers) or not, serves JupyterLab on 127.0.0.1 behind its token."""
    import os
    import re
    import signal
    import socket
    import subprocess
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    lab = subprocess.Popen(["make", "-s", "lab", f"LAB_PORT={port}"], cwd=REPO, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        url, log, deadline = None, [], time.time() + 180
        while url is None and time.time() < deadline:
            line = lab.stdout.readline()
            assert line or lab.poll() is None, "make lab stopped:\n" + "".join(log)
            log.append(line)
            found = re.search(rf"(http://127\.0\.0\.1:{port}/lab\?token=\w+)", line)
            url = found.group(1) if found else None
        assert url, "no lab URL in the log:\n" + "".join(log)
        for attempt in range(30):  # the URL is logged as the server starts listening
            try:
                with urllib.request.urlopen(url, timeout=60) as response:
                    assert response.status == 200 and b"JupyterLab" in response.read()
                break
            except urllib.error.URLError as e:
                if isinstance(e, urllib.error.HTTPError) or attempt == 29:
                    raise
                time.sleep(1)
        token_less = f"http://127.0.0.1:{port}/api/contents"
        try:
            urllib.request.urlopen(token_less, timeout=30)
            raise AssertionError("the lab answered without its token")
        except urllib.error.HTTPError as e:
            assert e.code == 403
    finally:
        os.killpg(lab.pid, signal.SIGTERM)
        lab.wait(timeout=60)
