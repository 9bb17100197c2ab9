"""The foundation-model teachers through the whole CAST pipeline, from the command line, on tiny
configurations: theta_T^0 from hub-layout folders, zero-shot evaluation, 1a, pseudo-labels, 1b,
pseudo-labels again, the transfer to the student, refinement and the baseline."""
from __future__ import annotations

import json

import pytest
import yaml
from test_sam3_teacher import write_sam3_folder
from test_vfm_teacher import CLASSES, write_hub_folders

import cast
from cast.cli import main
from cast.runs import STAGES, RunFolder
from cast.teachers.sam3 import Sam3Teacher
from cast.teachers.vfm import GroundingDinoSamTeacher

pytestmark = pytest.mark.usefixtures("one_thread")
TEACHERS = {"gdino-sam2": GroundingDinoSamTeacher, "sam3": Sam3Teacher}


def tiny_config(root, teacher: dict) -> dict:
    def fast() -> dict:
        return {"steps": 2, "checkpoint_every": 1}

    return {
        "name": "foundation", "output_dir": str(root / "runs"), "seed": 0, "device": "cpu",
        "data": {"kind": "demo", "root": str(root / "demo"), "labeled_fraction": 0.25, "crop_size": [64, 64],
                 "test_size": 64, "batch_size": 2, "unlabeled_batch_size": 2, "eval_batch_size": 4,
                 "demo": {"image_size": 64, "num_source_train": 2, "num_target_train": 8, "num_target_val": 3,
                          "max_objects": 3}},
        "teacher": teacher,
        "student": {"preset": "cast-tiny"},
        "training": {"teacher_adaptation": fast(), "teacher_self_training": fast(), "knowledge_transfer": fast(),
                     "student_refinement": {"steps": 1}, "student_supervised": {"steps": 2}},
        "losses": {"num_negatives": 8, "embedding_stride": 8},
        "pseudo_labels": {"score_threshold": 0.0, "min_area": 0, "max_instances": 5},
    }


@pytest.mark.slow
@pytest.mark.parametrize("kind", TEACHERS)
def test_the_cli_runs_every_stage_with_a_foundation_teacher(kind, tmp_path):
    if kind == "sam3":
        # The tiny random SAM 3 scores every pair about 0.25: a lower threshold gives it pseudo-labels.
        teacher = {"kind": "sam3", "sam3_dir": str(write_sam3_folder(tmp_path / "sam3", CLASSES)),
                   "box_threshold": 0.2}
    else:
        gdino_dir, sam_dir = write_hub_folders(tmp_path / "hub", "sam2")
        teacher = {"kind": kind, "grounding_dino_dir": str(gdino_dir), "sam_dir": str(sam_dir)}
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tiny_config(tmp_path, teacher)))
    assert main(["run", "--config", str(config)]) == 0

    folder = RunFolder(tmp_path / "runs" / "foundation")
    report = json.loads(folder.report_json.read_text())
    assert {r["model"] for r in report["rows"]} == {"teacher_zero_shot", *STAGES}
    assert all(r["params_m"] > 0 and r["gflops"] > 0 for r in report["rows"])
    for stage in ("teacher_adaptation", "teacher_self_training"):
        assert type(cast.load_model(folder.model(stage))) is TEACHERS[kind]
        metrics = folder.metrics(stage).read_text()
        assert "loss_sup" in metrics and "loss_pxl_labeled" in metrics
    # 1b and the transfer learn from the teachers' pseudo-labels of D_u.
    assert folder.available_pseudo_labels() == ["teacher_adaptation", "teacher_self_training"]
    for stage in ("teacher_adaptation", "teacher_self_training"):
        labels = json.loads(folder.pseudo_labels(stage).read_text())
        assert labels and all("counts" in r["segmentation"] for r in labels)
    for stage in ("teacher_self_training", "knowledge_transfer"):
        assert "loss_semi" in folder.metrics(stage).read_text()
    assert type(cast.load_model(folder.model("knowledge_transfer"))).__name__ == "CastStudent"


def test_a_sam3_teacher_needs_its_folder(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tiny_config(tmp_path, {"kind": "sam3"})))
    assert main(["run", "--config", str(config)]) == 2  # refused before any work, naming the key
