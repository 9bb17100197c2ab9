"""The run configuration: YAML -> nested dataclasses, validated before any work starts.

Every error names the file and the dotted key (``training.knowledge_transfer.lr``) so that a
typo or an impossible value is caught in the first second of a run, not an hour into it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cast.data.registry import DATA_KINDS
from cast.losses import SAMPLERS
from cast.runs import STAGES
from cast.teachers.hub import FOUNDATION_TEACHERS, ZeroShotSettings
from cast.utils.typed import ConfigError, build_dataclass

TEACHER_KINDS = ("standin", *FOUNDATION_TEACHERS)
AMP_MODES = ("none", "bf16", "fp16")
ABLATION_STUDIES = ("losses", "stages", "samplers", "label_fraction", "pxl_weight")


@dataclass
class DemoDataConfig:
    """Arguments of cast.data.demo.generate (data.kind=demo)."""

    image_size: int = 128
    num_source_train: int = 400
    num_target_train: int = 300
    num_target_val: int = 100
    max_objects: int = 10
    # The data set's own draw, not the run's seed: every seed of a study sees the same images, and runs
    # of different seeds can share one data root.
    seed: int = 0


@dataclass
class DataConfig:
    kind: str = "demo"
    # demo: generated here when missing. coco: train/ and val/ folders, each with its
    # annotations.json (file_name relative to that folder). cityscapes / ade20k: the data set's own layout.
    root: str = "data/demo"
    labeled_fraction: float = 0.1
    split_file: str | None = None  # an existing split.json to reuse instead of drawing one
    crop_size: list[int] = field(default_factory=lambda: [128, 128])  # training crop (h, w)
    test_size: int = 128  # short side at evaluation
    batch_size: int = 4  # labeled images per optimizer step, summed over all processes
    unlabeled_batch_size: int = 4  # pseudo-labeled images per optimizer step
    eval_batch_size: int = 4
    num_workers: int = 0
    max_val_images: int | None = None  # cap for quick runs; None = the whole val set
    demo: DemoDataConfig = field(default_factory=DemoDataConfig)


@dataclass
class TrainConfig:
    steps: int = 100  # optimizer steps
    lr: float = 1e-4
    weight_decay: float = 0.05
    backbone_lr_multiplier: float = 0.1
    warmup_steps: int = 0  # linear warm-up before the poly decay
    poly_power: float = 0.9
    clip_grad_norm: float = 1.0  # 0 turns clipping off
    grad_accumulation: int = 1  # micro-batches per optimizer step
    amp: str = "none"  # none | bf16 | fp16 (CUDA only; ignored on CPU)
    checkpoint_every: int = 50
    log_every: int = 1
    eval_every: int = 0  # steps between val AP evaluations during training; 0 = only at the end


@dataclass
class TeacherPretrainConfig:
    """How the stand-in teacher is pretrained on the demo's source domain (kind=standin)."""

    source: str = "source_train"  # folder under data.root with the source-domain images
    cache_dir: str = "data/cache"
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class TeacherConfig(ZeroShotSettings):
    kind: str = "standin"
    preset: str = "demo-teacher"  # stand-in teacher: a preset of cast.models.build_student
    preset_overrides: dict[str, Any] = field(default_factory=dict)  # CastStudentConfig fields to replace
    grounding_dino_dir: str | None = None  # local hub folders of a foundation-model teacher
    sam_dir: str | None = None
    sam3_dir: str | None = None  # kind=sam3: a facebook/sam3 folder; box_threshold is its instance-score threshold
    # Stand-in: keep its image encoder as pretrained through 1a / 1b, as a foundation model's image
    # encoder is kept (SAM's, in the paper); only its neck and decoder adapt.
    freeze_encoder: bool = False
    pretrain: TeacherPretrainConfig = field(default_factory=TeacherPretrainConfig)


@dataclass
class StudentConfig:
    preset: str = "demo-student"
    preset_overrides: dict[str, Any] = field(default_factory=dict)  # CastStudentConfig fields to replace
    pretrained_encoder_dir: str | None = None  # local DINOv2 folder; None = random init


# One TrainConfig per stage of cast.runs.STAGES (student_supervised, the baseline, deserves the
# budget of knowledge_transfer + student_refinement).
TrainingConfig = dataclasses.make_dataclass(
    "TrainingConfig", [(stage, TrainConfig, field(default_factory=TrainConfig)) for stage in STAGES])
TrainingConfig.__module__ = __name__


@dataclass
class LossConfig:
    lambda_semi: float = 1.0  # stage 2 weight of the pseudo-label loss (stage 1b uses 1)
    lambda_pxl: float = 0.1
    sampler: str = "fusion"  # uniform | mask | class | fusion
    num_negatives: int = 200  # R
    temperature_start: float = 0.35
    temperature_end: float = 0.07
    # Feature level (stride) the student's projection head reads; sets the L_pxl pixel grid.
    embedding_stride: int = 8


@dataclass
class PseudoLabelConfig:
    score_threshold: float = 0.5
    min_area: int = 16  # pixels, at the image's stored resolution
    max_instances: int = 100
    # When set, overlaps are resolved as in ground truth (each pixel in at most one instance, better
    # scores first) and an instance left with less than this fraction of its mask is dropped as a
    # duplicate of a better one (Mask2Former-style teachers name one object under several queries
    # or classes); 0 keeps every non-empty remainder. None: the teacher's instances as they are.
    min_kept_fraction: float | None = None


@dataclass
class AblationConfig:
    label_fractions: list[float] = field(default_factory=lambda: [0.05, 0.1, 0.3])
    samplers: list[str] = field(default_factory=lambda: list(SAMPLERS))
    # The weights of L_pxl the paper's figure sweeps (its Proposition 3.1: the margin grows with it).
    pxl_weights: list[float] = field(default_factory=lambda: [0.01, 0.05, 0.1, 0.2])


@dataclass
class CastConfig:
    name: str = "demo"
    output_dir: str = "runs"
    seed: int = 0
    # The seed of what the seeds of one study share: the demo data, the labeled split, the stand-in
    # teacher and the teacher stages (null: `seed`). `--seeds` sets it to its first seed.
    teacher_seed: int | None = None
    # Run folder where those shared stages, their pseudo-labels and evaluations live (null: the run's own).
    shared_dir: str | None = None
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    losses: LossConfig = field(default_factory=LossConfig)
    pseudo_labels: PseudoLabelConfig = field(default_factory=PseudoLabelConfig)
    ablations: AblationConfig = field(default_factory=AblationConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    @property
    def shared_seed(self) -> int:
        return self.seed if self.teacher_seed is None else self.teacher_seed

    def stage(self, stage: str) -> TrainConfig:
        return getattr(self.training, stage)


# --------------------------------------------------------------------------- parsing


def config_from_dict(values: dict, source: str = "<dict>") -> CastConfig:
    """Build a CastConfig from a nested dict (missing keys take their defaults); no validation."""
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(values).__name__}")
    return build_dataclass(CastConfig, values, "", source)


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def apply_overrides(values: dict, overrides: list[str], source: str) -> dict:
    """Apply ``a.b.c=value`` overrides (value parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{source}: override '{item}' is not of the form key=value")
        dotted, raw = item.split("=", 1)
        node = values
        parts = dotted.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{source}: override '{item}': '{part}' is not a section")
        node[parts[-1]] = yaml.safe_load(raw)
    return values


def load_config(path: str | Path, overrides: list[str] | None = None, check_paths: bool = True) -> CastConfig:
    """Read, convert and validate a YAML config; raises ConfigError naming the file and key."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: config file not found")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    apply_overrides(values, overrides or [], str(path))
    cfg = config_from_dict(values, str(path))
    validate_config(cfg, str(path), check_paths=check_paths)
    return cfg


def save_config(cfg: CastConfig, path: str | Path) -> None:
    from cast.utils.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


# --------------------------------------------------------------------------- validation


def _check(ok: bool, source: str, key: str, problem: str) -> None:
    if not ok:
        raise ConfigError(f"{source}: key '{key}': {problem}")


def _check_choice(value: str, choices: tuple[str, ...], source: str, key: str) -> None:
    _check(value in choices, source, key, f"{value!r} is not one of {', '.join(choices)}")


def _check_dir(path: str | None, source: str, key: str) -> None:
    if path is not None:
        _check(Path(path).is_dir(), source, key, f"folder {path} does not exist")


def _validate_train(t: TrainConfig, source: str, key: str) -> None:
    _check(t.steps >= 0, source, f"{key}.steps", f"must be >= 0, got {t.steps}")
    _check(t.lr > 0, source, f"{key}.lr", f"must be > 0, got {t.lr}")
    _check(t.weight_decay >= 0, source, f"{key}.weight_decay", f"must be >= 0, got {t.weight_decay}")
    _check(t.backbone_lr_multiplier >= 0, source, f"{key}.backbone_lr_multiplier",
           f"must be >= 0, got {t.backbone_lr_multiplier}")
    _check(0 <= t.warmup_steps <= max(t.steps, 0), source, f"{key}.warmup_steps",
           f"must be in [0, steps={t.steps}], got {t.warmup_steps}")
    _check(t.poly_power >= 0, source, f"{key}.poly_power", f"must be >= 0, got {t.poly_power}")
    _check(t.clip_grad_norm >= 0, source, f"{key}.clip_grad_norm", f"must be >= 0, got {t.clip_grad_norm}")
    _check(t.grad_accumulation >= 1, source, f"{key}.grad_accumulation",
           f"must be >= 1, got {t.grad_accumulation}")
    _check_choice(t.amp, AMP_MODES, source, f"{key}.amp")
    _check(t.checkpoint_every >= 1, source, f"{key}.checkpoint_every", f"must be >= 1, got {t.checkpoint_every}")
    _check(t.log_every >= 1, source, f"{key}.log_every", f"must be >= 1, got {t.log_every}")
    _check(t.eval_every >= 0, source, f"{key}.eval_every", f"must be >= 0, got {t.eval_every}")


def _validate_preset(preset: str, overrides: dict[str, Any], source: str, section: str) -> None:
    """The model preset exists and its overrides are valid StudentConfig fields and values."""
    from cast.models.config import PRESETS, preset_config

    _check(preset in PRESETS, source, f"{section}.preset", f"{preset!r} is not one of {', '.join(sorted(PRESETS))}")
    reserved = {"num_classes", "class_names", "preset", "projection_stride"} & set(overrides)
    _check(not reserved, source, f"{section}.preset_overrides",
           f"{sorted(reserved)} are set by the run (data classes, losses.embedding_stride)")
    try:
        preset_config(preset, 1, **overrides)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{source}: key '{section}.preset_overrides': {e}") from None


def validate_config(cfg: CastConfig, source: str = "<config>", check_paths: bool = True) -> None:
    """Check every value that can be checked without touching data or models."""
    _check(bool(cfg.name) and "/" not in cfg.name and cfg.name not in (".", ".."), source, "name",
           f"must be a plain folder name, got {cfg.name!r}")
    for key in ("seed", "teacher_seed"):
        _check(getattr(cfg, key) is None or getattr(cfg, key) >= 0, source, key, f"must be >= 0, got {getattr(cfg, key)}")
    dev = cfg.device
    _check(dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit()), source,
           "device", f"must be auto, cpu, cuda or cuda:N, got {dev!r}")

    d = cfg.data
    _check_choice(d.kind, DATA_KINDS, source, "data.kind")
    _check(0 < d.labeled_fraction <= 1, source, "data.labeled_fraction",
           f"must be in (0, 1], got {d.labeled_fraction}")
    _check(len(d.crop_size) == 2 and all(s >= 32 for s in d.crop_size), source, "data.crop_size",
           f"must be [height, width] with both >= 32, got {d.crop_size}")
    _check(d.test_size >= 32, source, "data.test_size", f"must be >= 32, got {d.test_size}")
    for key in ("batch_size", "unlabeled_batch_size", "eval_batch_size"):
        _check(getattr(d, key) >= 1, source, f"data.{key}", f"must be >= 1, got {getattr(d, key)}")
    _check(d.num_workers >= 0, source, "data.num_workers", f"must be >= 0, got {d.num_workers}")
    _check(d.max_val_images is None or d.max_val_images >= 1, source, "data.max_val_images",
           f"must be >= 1 or null, got {d.max_val_images}")
    _check(d.demo.image_size >= 32, source, "data.demo.image_size", f"must be >= 32, got {d.demo.image_size}")
    for key in ("num_source_train", "num_target_train", "num_target_val", "max_objects"):
        v = getattr(d.demo, key)
        _check(v >= 1, source, f"data.demo.{key}", f"must be >= 1, got {v}")
    _check(d.demo.seed >= 0, source, "data.demo.seed", f"must be >= 0, got {d.demo.seed}")

    t = cfg.teacher
    _check_choice(t.kind, TEACHER_KINDS, source, "teacher.kind")
    for key, problem in t.problems():
        _check(False, source, f"teacher.{key}", problem)
    _validate_train(t.pretrain.train, source, "teacher.pretrain.train")

    if t.kind == "standin":
        _validate_preset(t.preset, t.preset_overrides, source, "teacher")
    _validate_preset(cfg.student.preset, cfg.student.preset_overrides, source, "student")

    for stage in STAGES:
        _validate_train(cfg.stage(stage), source, f"training.{stage}")

    lo = cfg.losses
    _check(lo.lambda_semi >= 0, source, "losses.lambda_semi", f"must be >= 0, got {lo.lambda_semi}")
    _check(lo.lambda_pxl >= 0, source, "losses.lambda_pxl", f"must be >= 0, got {lo.lambda_pxl}")
    _check_choice(lo.sampler, SAMPLERS, source, "losses.sampler")
    _check(lo.temperature_end > 0, source, "losses.temperature_end", f"must be > 0, got {lo.temperature_end}")
    _check(lo.temperature_start >= lo.temperature_end, source, "losses.temperature_start",
           f"must be >= temperature_end ({lo.temperature_end}), got {lo.temperature_start}")
    _check(lo.embedding_stride in (4, 8, 16, 32), source, "losses.embedding_stride",
           f"must be one of 4, 8, 16, 32 (a feature level of the model), got {lo.embedding_stride}")
    # Negatives are drawn from the other pixels of the smallest batch the loss sees.
    h, w = d.crop_size
    pixels = min(d.batch_size, d.unlabeled_batch_size) * (h // lo.embedding_stride) * (w // lo.embedding_stride)
    _check(1 <= lo.num_negatives < pixels, source, "losses.num_negatives",
           f"R={lo.num_negatives} must be >= 1 and smaller than the {pixels} embedding pixels of a batch "
           f"(batch {min(d.batch_size, d.unlabeled_batch_size)} x {h}x{w} at stride {lo.embedding_stride})")

    p = cfg.pseudo_labels
    _check(0 <= p.score_threshold <= 1, source, "pseudo_labels.score_threshold",
           f"must be in [0, 1], got {p.score_threshold}")
    _check(p.min_area >= 0, source, "pseudo_labels.min_area", f"must be >= 0, got {p.min_area}")
    _check(p.max_instances >= 1, source, "pseudo_labels.max_instances", f"must be >= 1, got {p.max_instances}")
    _check(p.min_kept_fraction is None or 0 <= p.min_kept_fraction <= 1, source, "pseudo_labels.min_kept_fraction",
           f"must be in [0, 1], got {p.min_kept_fraction}")

    a = cfg.ablations
    _check(len(a.label_fractions) > 0 and all(0 < f <= 1 for f in a.label_fractions), source,
           "ablations.label_fractions", f"every fraction must be in (0, 1], got {a.label_fractions}")
    for i, s in enumerate(a.samplers):
        _check_choice(s, SAMPLERS, source, f"ablations.samplers[{i}]")
    _check(len(a.pxl_weights) > 0 and all(w >= 0 for w in a.pxl_weights), source, "ablations.pxl_weights",
           f"every weight must be >= 0, got {a.pxl_weights}")

    if check_paths:
        _validate_paths(cfg, source)


def _validate_paths(cfg: CastConfig, source: str) -> None:
    d = cfg.data
    if d.kind != "demo":  # the demo data set is generated when missing
        _check_dir(d.root, source, "data.root")
    if d.split_file is not None:
        _check(Path(d.split_file).is_file(), source, "data.split_file", f"file {d.split_file} does not exist")
    t = cfg.teacher
    for key in FOUNDATION_TEACHERS.get(t.kind, ()):
        _check(getattr(t, key) is not None, source, f"teacher.{key}", f"required for teacher.kind={t.kind}")
        _check_dir(getattr(t, key), source, f"teacher.{key}")
    _check_dir(cfg.student.pretrained_encoder_dir, source, "student.pretrained_encoder_dir")
