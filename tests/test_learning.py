"""The pipeline on an easy generated set (64x64 images, at most two shapes each, half of them
labeled) with enough steps to learn: a wrong loss, objective or label path would leave these
models near 0 AP, which the tiny run's 0 <= AP <= 100 cannot tell."""
from __future__ import annotations

import json

import pytest
import yaml

from cast.cli import main
from cast.runs import RunFolder
from test_pipeline import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")
STEPS = 80
FLOOR = 3.0  # mask AP; untrained models score about 0 here, these reach 5 or more at 80 steps


def learning_config(root) -> dict:
    """test_pipeline's tiny run with the demo presets, more images and enough steps to learn."""
    def steps(n: int, lr: float) -> dict:
        return {"steps": n, "lr": lr, "checkpoint_every": n}

    cfg = tiny_config(root)
    cfg["name"] = "learn"
    cfg["data"].update(labeled_fraction=0.5, batch_size=4, unlabeled_batch_size=4, eval_batch_size=16,
                       demo={"image_size": 64, "num_source_train": 32, "num_target_train": 32, "num_target_val": 12,
                             "max_objects": 2})
    cfg["teacher"].update(preset="demo-student")
    cfg["teacher"]["pretrain"]["train"] = steps(STEPS, 1e-3)
    cfg["student"] = {"preset": "demo-student"}
    cfg["training"] = {"teacher_adaptation": steps(STEPS // 2, 6e-4), "teacher_self_training": steps(STEPS // 2, 6e-4),
                       "knowledge_transfer": steps(STEPS, 1e-3), "student_refinement": steps(10, 3e-4),
                       "student_supervised": steps(STEPS, 1e-3)}
    cfg["losses"]["num_negatives"] = 16
    cfg["pseudo_labels"] = {"score_threshold": 0.3, "min_area": 4, "max_instances": 5}
    return cfg


@pytest.mark.slow
def test_every_stage_learns_on_an_easy_set(tmp_path):
    config = tmp_path / "learn.yaml"
    config.write_text(yaml.safe_dump(learning_config(tmp_path)))
    assert main(["run", "--config", str(config)]) == 0
    rows = {r["model"]: r for r in json.loads(RunFolder(tmp_path / "runs" / "learn").report_json.read_text())["rows"]}
    for model in ("teacher_adaptation", "teacher_self_training", "student_supervised", "knowledge_transfer",
                  "student_refinement"):
        assert rows[model]["AP"] >= FLOOR, (model, rows[model]["AP"])
    # adapting to the target domain's labels beats the teacher pretrained on the source domain only
    assert rows["teacher_adaptation"]["AP"] > rows["teacher_zero_shot"]["AP"]
