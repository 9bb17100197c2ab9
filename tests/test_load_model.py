"""`cast.load_model` reads any saved model by the model_type its config.json names: the student,
the demo's stand-in teacher (a student preset) and the foundation-model teacher."""
from __future__ import annotations

import json

import pytest
import torch

import cast
from cast.models.auto import MODEL_TYPES
from cast.models.protocol import SegmentationModel, weights_hash
from cast.models.student import CastStudent, build_student

pytestmark = pytest.mark.usefixtures("one_thread")


def test_every_saved_kind_loads_as_itself(tmp_path):
    from cast.teachers.sam3 import Sam3Teacher, random_sam3_teacher
    from cast.teachers.vfm import GroundingDinoSamTeacher, random_teacher

    models = {"student": build_student("cast-tiny", 2, ["a", "b"]),
              "standin": build_student("cast-tiny", 2, ["a", "b"], decoder_layers=2),
              "vfm": random_teacher(["disc", "square"]), "sam3": random_sam3_teacher(["disc", "square"])}
    for name, model in models.items():
        model.save_pretrained(tmp_path / name)
        loaded = cast.load_model(tmp_path / name)
        assert type(loaded) is type(model) and isinstance(loaded, SegmentationModel)
        assert not loaded.training and weights_hash(loaded) == weights_hash(model)
        assert json.loads((tmp_path / name / "config.json").read_text())["model_type"] == model.model_type
    assert isinstance(cast.load_model(tmp_path / "vfm"), GroundingDinoSamTeacher)
    assert isinstance(cast.load_model(tmp_path / "sam3"), Sam3Teacher)
    assert set(MODEL_TYPES) == {CastStudent.model_type, GroundingDinoSamTeacher.model_type, Sam3Teacher.model_type}


def test_a_student_saved_before_model_type_existed_still_loads(tmp_path):
    model = build_student("cast-tiny", 2)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["model_type"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert torch.equal(cast.load_model(tmp_path).decoder.class_head.weight, model.decoder.class_head.weight)


def test_what_is_not_a_model_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere: model folder not found"):
        cast.load_model(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="config.json: file not found"):
        cast.load_model(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ValueError, match=r"config\.json: model_type 'bert' is not a CAST model"):
        cast.load_model(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="expected a json object"):
        cast.load_model(tmp_path)
