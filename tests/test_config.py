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
    ({"pseudo_labels": {"min_kept_fraction": -0.1}}, "pseudo_labels.min_kept_fraction", "must be in [0, 1]"),
    ({"ablations": {"label_fractions": [0.1, 0.0]}}, "ablations.label_fractions", "must be in (0, 1]"),
    ({"ablations": {"pxl_weights": [0.1, -0.05]}}, "ablations.pxl_weights", "every weight must be >= 0"),
    ({"ablations": {"pxl_weights": []}}, "ablations.pxl_weights", "every weight must be >= 0"),
    ({"name": "a/b"}, "name", "plain folder name"),
    ({"student": {"preset": "cast-xxl"}}, "student.preset", "is not one of"),
    ({"teacher": {"preset_overrides": {"num_querys": 5}}}, "teacher.preset_overrides", "unknown CastStudentConfig keys"),
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


@pytest.mark.parametrize("values, key, problem", [
    ({"data": {"labeled_fraction": -0.1}}, "data.labeled_fraction", "must be in (0, 1], got -0.1"),
    ({"data": {"labeled_fraction": float("nan")}}, "data.labeled_fraction", "must be in (0, 1], got nan"),
    ({"data": {"labeled_fraction": "half"}}, "data.labeled_fraction", "expected float"),
    ({"data": {"crop_size": ["a", 64]}}, "data.crop_size[0]", "expected int"),
    ({"data": {"crop_size": [64]}}, "data.crop_size", "must be [height, width]"),
    ({"data": {"demo": {"image_sise": 64}}}, "data.demo.image_sise", "unknown key"),
    ({"data": {"demo": {"seed": -1}}}, "data.demo.seed", "must be >= 0, got -1"),
    ({"training": {"knowledge_transfer": {"steps": -1}}}, "training.knowledge_transfer.steps", "must be >= 0"),
    ({"training": {"student_refinement": []}}, "training.student_refinement", "expected a mapping"),
    ({"losses": {"num_negatives": 0}}, "losses.num_negatives", "R=0 must be >= 1"),
    # R against the pixels of the smallest batch the loss sees: 64x64 crops at stride 8 are 64
    # embedding pixels an image; the unlabeled batch of 1 has 64, so R=64 is impossible ...
    ({"data": {"crop_size": [64, 64], "batch_size": 4, "unlabeled_batch_size": 1}, "losses": {"num_negatives": 64}},
     "losses.num_negatives", "smaller than the 64 embedding pixels of a batch (batch 1 x 64x64 at stride 8)"),
    # ... and a coarser stride shrinks the grid: 64x64 at stride 32 is 4 pixels an image.
    ({"data": {"crop_size": [64, 64], "batch_size": 2, "unlabeled_batch_size": 2},
      "losses": {"num_negatives": 8, "embedding_stride": 32}}, "losses.num_negatives", "smaller than the 8 embedding"),
])
def test_more_invalid_values_name_the_key(tmp_path, values, key, problem):
    message = _error(tmp_path, values)
    assert f"'{key}'" in message and problem in message, message


def test_largest_possible_r_is_accepted(tmp_path):
    values = {"data": {"crop_size": [64, 64], "batch_size": 4, "unlabeled_batch_size": 1},
              "losses": {"num_negatives": 63}}
    assert load_config(_write(tmp_path, values)).losses.num_negatives == 63


def test_missing_encoder_folder_names_the_key(tmp_path):
    message = _error(tmp_path, {"student": {"pretrained_encoder_dir": str(tmp_path / "dinov2-small")}})
    assert "'student.pretrained_encoder_dir'" in message and "dinov2-small" in message


def _cli_config(root: Path) -> dict:
    return {"name": "refused", "output_dir": str(root / "runs"),
            "data": {"kind": "demo", "root": str(root / "data"), "crop_size": [64, 64], "batch_size": 2,
                     "unlabeled_batch_size": 2},
            "teacher": {"pretrain": {"cache_dir": str(root / "cache")}}, "losses": {"num_negatives": 8}}


@pytest.mark.parametrize("change, overrides, key, problem", [
    (lambda v: v.update({"training": {"knowledge_transfer": {"learning_rate": 1.0}}}), [],
     "training.knowledge_transfer.learning_rate", "unknown key"),
    (lambda v: v["data"].update({"batch_size": "2"}), [], "data.batch_size", "expected int"),
    (lambda v: v["data"].update({"kind": "coco", "root": "/nonexistent/coco"}), [], "data.root", "does not exist"),
    (lambda v: None, ["data.labeled_fraction=0"], "data.labeled_fraction", "must be in (0, 1]"),
    (lambda v: None, ["data.labeled_fraction=1.01"], "data.labeled_fraction", "must be in (0, 1]"),
    (lambda v: None, ["losses.num_negatives=128"], "losses.num_negatives", "smaller than the 128 embedding pixels"),
    (lambda v: None, ["data.labelled_fraction=0.5"], "data.labelled_fraction", "unknown key"),
])
def test_cli_refuses_a_bad_config_before_any_work_naming_the_key(tmp_path, capsys, change, overrides, key, problem):
    from cast.cli import main

    values = _cli_config(tmp_path)
    change(values)
    path = _write(tmp_path, values)
    args = ["run", "--config", str(path)] + [a for o in overrides for a in ("--set", o)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: ") and f"'{key}'" in err and problem in err, err
    # Refused before any work: no run folder, no generated data, no teacher cache.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.yaml"]
