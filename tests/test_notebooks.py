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
