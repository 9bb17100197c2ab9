"""The run configuration: YAML -> dataclasses, and validation that names the offending key."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cast.config import CastConfig, ConfigError, config_to_dict, load_config, save_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _write(tmp_path: Path, values: dict) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def _error(tmp_path: Path, values: dict, **kwargs) -> str:
    path = _write(tmp_path, values)
    with pytest.raises((ConfigError, FileNotFoundError)) as info:
        load_config(path, **kwargs)
    assert str(path) in str(info.value)
    return str(info.value)


def test_defaults_and_nested_values(tmp_path):
    cfg = load_config(_write(tmp_path, {"name": "x", "training": {"knowledge_transfer": {"lr": "5e-5", "steps": 7}},
                                        "data": {"crop_size": [64, 96]}}))
    assert isinstance(cfg, CastConfig) and cfg.name == "x"
    assert cfg.stage("knowledge_transfer").lr == 5e-5 and cfg.stage("knowledge_transfer").steps == 7
    assert cfg.stage("student_refinement").steps == 100  # untouched stages keep their defaults
    assert cfg.data.crop_size == [64, 96] and cfg.run_dir == Path("runs/x")
    cfg = load_config(_write(tmp_path, {"student": {"preset_overrides": {"num_queries": 12, "decoder_layers": 2}}}))
    assert cfg.student.preset_overrides == {"num_queries": 12, "decoder_layers": 2}


def test_overrides_and_round_trip(tmp_path):
    cfg = load_config(_write(tmp_path, {}), overrides=["losses.lambda_pxl=0.2", "data.demo.num_target_val=5",
                                                       "name=other"])
    assert cfg.losses.lambda_pxl == 0.2 and cfg.data.demo.num_target_val == 5 and cfg.name == "other"
    save_config(cfg, tmp_path / "saved.yaml")
    assert config_to_dict(load_config(tmp_path / "saved.yaml")) == config_to_dict(cfg)


@pytest.mark.parametrize("values, key, problem", [
    ({"trainig": {}}, "trainig", "unknown key"),
    ({"training": {"teacher_adaptation": {"lrr": 1.0}}}, "training.teacher_adaptation.lrr", "unknown key"),
    ({"data": {"batch_size": "four"}}, "data.batch_size", "expected int"),
    ({"seed": 1.5}, "seed", "expected int"),
    ({"losses": {"lambda_pxl": True}}, "losses.lambda_pxl", "expected float"),
    ({"data": {"crop_size": 128}}, "data.crop_size", "expected a list"),
    ({"teacher": "standin"}, "teacher", "expected a mapping"),
    ({"data": {"labeled_fraction": 0}}, "data.labeled_fraction", "must be in (0, 1]"),
    ({"data": {"labeled_fraction": 1.5}}, "data.labeled_fraction", "must be in (0, 1]"),
    ({"training": {"student_refinement": {"lr": -1e-4}}}, "training.student_refinement.lr", "must be > 0"),
    ({"training": {"knowledge_transfer": {"warmup_steps": 500, "steps": 100}}},
     "training.knowledge_transfer.warmup_steps", "must be in [0, steps=100]"),
    ({"training": {"knowledge_transfer": {"amp": "fp8"}}}, "training.knowledge_transfer.amp", "not one of"),
    ({"teacher": {"pretrain": {"train": {"grad_accumulation": 0}}}}, "teacher.pretrain.train.grad_accumulation",
     "must be >= 1"),
    ({"losses": {"num_negatives": 5000}, "data": {"crop_size": [128, 128], "batch_size": 2}},
     "losses.num_negatives", "smaller than the 512 embedding pixels"),
    ({"losses": {"temperature_start": 0.05, "temperature_end": 0.07}}, "losses.temperature_start", "must be >="),
    ({"losses": {"sampler": "random"}}, "losses.sampler", "not one of"),
    ({"data": {"kind": "voc"}}, "data.kind", "not one of"),
    ({"device": "tpu"}, "device", "must be auto, cpu, cuda"),
    ({"pseudo_labels": {"score_threshold": 2.0}}, "pseudo_labels.score_threshold", "must be in [0, 1]"),
    ({"ablations": {"label_fractions": [0.1, 0.0]}}, "ablations.label_fractions", "must be in (0, 1]"),
    ({"name": "a/b"}, "name", "plain folder name"),
    ({"student": {"preset": "cast-xxl"}}, "student.preset", "is not one of"),
    ({"teacher": {"preset_overrides": {"num_querys": 5}}}, "teacher.preset_overrides", "unknown StudentConfig keys"),
    ({"student": {"preset_overrides": {"hidden_dim": 90, "num_heads": 4}}}, "student.preset_overrides",
     "not divisible by num_heads"),
    ({"student": {"preset_overrides": {"projection_stride": 4}}}, "student.preset_overrides", "set by the run"),
    ({"losses": {"embedding_stride": 6}}, "losses.embedding_stride", "must be one of 4, 8, 16, 32"),
])
def test_invalid_values_name_the_key(tmp_path, values, key, problem):
    message = _error(tmp_path, values)
    assert f"'{key}'" in message and problem in message, message


def test_missing_paths_name_the_key(tmp_path):
    message = _error(tmp_path, {"data": {"kind": "coco", "root": str(tmp_path / "nowhere")}})
    assert "'data.root'" in message and "nowhere" in message
    message = _error(tmp_path, {"teacher": {"kind": "gdino-sam2", "grounding_dino_dir": str(tmp_path),
                                            "sam_dir": str(tmp_path / "sam2-large")}})
    assert "'teacher.sam_dir'" in message and "sam2-large" in message
    assert "'teacher.grounding_dino_dir'" in _error(tmp_path, {"teacher": {"kind": "gdino-sam"}})
    assert "'data.split_file'" in _error(tmp_path, {"data": {"split_file": "missing.json"}})
    # the demo data set is generated, so its folder need not exist yet
    load_config(_write(tmp_path, {"data": {"kind": "demo", "root": str(tmp_path / "later")}}))
    with pytest.raises(FileNotFoundError, match="absent.yaml"):
        load_config(tmp_path / "absent.yaml")


def test_broken_yaml_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: invalid YAML"):
        load_config(path)


@pytest.mark.parametrize("name", ["demo.yaml", "cityscapes_10pct.yaml", "ade20k_10pct.yaml"])
def test_shipped_configs_are_valid(name):
    # GPU configs point at local model folders that only exist on a GPU machine.
    cfg = load_config(CONFIGS / name, check_paths=name == "demo.yaml")
    assert cfg.name and cfg.stage("knowledge_transfer").steps > 0
    if name != "demo.yaml":
        assert cfg.teacher.kind == "gdino-sam2" and cfg.student.preset == "cast-s"
        assert cfg.data.labeled_fraction == pytest.approx(0.1)
