"""The layout of a run folder, in one place: the pipeline writes it, the notebooks, the Gradio
app and the FiftyOne export read it.

runs/<name>/
  config.yaml                      resolved configuration
  split.json                       labeled / unlabeled image ids (cast.data.splits)
  stages/<stage>/checkpoints/      resumable training state
  stages/<stage>/model/            final weights (save_pretrained layout)
  stages/<stage>/metrics.jsonl     one json object per step
  stages/<stage>/plots/            loss curves
  pseudo_labels/<stage>.json       COCO results (RLE masks + scores) on the unlabeled images
  pseudo_labels/<stage>.manifest.json   what produced them
  predictions/<model>_val.json     COCO results of each evaluated model on the val set
  report.json, report.md           Table-1-style summary
  plots/                           run-level figures
  ablations/                       ablation tables
  notebooks/                       papermill-executed notebooks
"""
from __future__ import annotations

from pathlib import Path

# Stage names, in pipeline order.
STAGES = ("teacher_adaptation", "teacher_self_training", "knowledge_transfer",
          "student_refinement", "student_supervised")


class RunFolder:
    """The paths of one run folder (nothing is created here)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.name = self.root.name
        self.config = self.root / "config.yaml"
        self.split = self.root / "split.json"
        self.report_json, self.report_md = self.root / "report.json", self.root / "report.md"
        self.plots, self.ablations, self.notebooks = self.root / "plots", self.root / "ablations", self.root / "notebooks"

    def stage(self, stage: str) -> Path:
        return self.root / "stages" / stage

    def checkpoints(self, stage: str) -> Path:
        return self.stage(stage) / "checkpoints"

    def model(self, stage: str) -> Path:
        return self.stage(stage) / "model"

    def metrics(self, stage: str) -> Path:
        return self.stage(stage) / "metrics.jsonl"

    def pseudo_labels(self, stage: str) -> Path:
        return self.root / "pseudo_labels" / f"{stage}.json"

    def pseudo_label_manifest(self, stage: str) -> Path:
        return self.root / "pseudo_labels" / f"{stage}.manifest.json"

    def predictions(self, model_name: str) -> Path:
        return self.root / "predictions" / f"{model_name}_val.json"

    def available_pseudo_labels(self) -> list[str]:
        folder = self.root / "pseudo_labels"
        return sorted(p.stem for p in folder.glob("*.json") if not p.name.endswith(".manifest.json"))

    def available_predictions(self) -> list[str]:
        return sorted(p.name[: -len("_val.json")] for p in (self.root / "predictions").glob("*_val.json"))

    def available_models(self) -> list[str]:
        return [s for s in STAGES if (self.model(s) / "config.json").exists()]


def run_config_of(model_dir: str | Path) -> Path | None:
    """The config.yaml of the run folder that holds the model folder `model_dir` (a stage's model,
    runs/<name>/stages/<stage>/model, or an ablation variant's, below runs/<name>/ablations/), or None."""
    model_dir = Path(model_dir).absolute()
    if model_dir.parent.parent.name != "stages":
        return None
    for folder in model_dir.parents[2:6]:
        if (folder / "config.yaml").is_file() and (folder / "stages").is_dir():
            return folder / "config.yaml"
    return None
