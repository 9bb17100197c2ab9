"""The one environment holds every package of the design card, and environment.yml agrees with
pyproject.toml."""
import importlib
import re
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~ \[;]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _pyproject_requirements() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        reqs += extra
    return {_name(r): r.replace(" ", "") for r in reqs}


def _environment_requirements() -> dict[str, str]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    assert any(str(d).startswith("python=3.11") for d in env["dependencies"])
    return {_name(r): r.replace(" ", "") for r in pip if not r.startswith("-e")}


def test_environment_yml_lists_what_pyproject_lists():
    py, env = _pyproject_requirements(), _environment_requirements()
    assert set(py) == set(env), f"only in pyproject: {set(py) - set(env)}; only in environment.yml: {set(env) - set(py)}"
    for name, req in py.items():
        if name != "torch":  # environment.yml pins the exact CPU build the Makefile installs
            assert env[name] == req, f"{name}: pyproject says {req}, environment.yml says {env[name]}"
    assert env["torch"] == "torch==2.13.0"


def test_constraints_pin_every_direct_dependency():
    pinned = {_name(line) for line in (ROOT / "constraints.txt").read_text().splitlines() if "==" in line}
    missing = set(_pyproject_requirements()) - pinned
    assert not missing, f"constraints.txt does not pin {missing}"


@pytest.mark.parametrize("module", [
    "torch", "transformers", "jupyterlab", "ipywidgets", "gradio", "gradio_client", "pycocotools",
    "papermill", "nbmake", "kornia", "cv2", "scipy", "safetensors", "onnx", "onnxruntime",
    "skimage", "matplotlib", "tqdm", "yaml", "cityscapesscripts", "hypothesis",
])
def test_design_card_package_imports(module):
    importlib.import_module(module)


def test_torch_is_the_pinned_build_and_torchvision_is_absent():
    import importlib.util

    import torch
    assert torch.__version__.startswith("2.13.0")
    assert importlib.util.find_spec("torchvision") is None, "nothing may pull torchvision in"


def test_fiftyone_and_gradio_coexist_and_database_starts():
    import fiftyone as fo
    import gradio
    import starlette

    assert gradio.__version__.startswith("6.")
    assert starlette.__version__.startswith("1.3.")
    ds = fo.Dataset()
    try:
        ds.add_sample(fo.Sample(filepath="/nonexistent.png"))
        assert len(ds) == 1
    finally:
        ds.delete()
