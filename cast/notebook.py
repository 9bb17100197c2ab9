"""What the stage notebooks call: parameters -> config, data statistics, sample figures, the
interactive instance browser and report display. Notebooks hold no logic of their own."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from cast.config import CastConfig, load_config
from cast.runs import RunFolder


def notebook_config(config: str | Path, run_name: str | None = None, overrides: Sequence[str] = (),
                    **params: Any) -> CastConfig:
    """The run configuration from a notebook's parameters cell.

    `params` are dotted config keys written with "__" for "." (e.g. losses__lambda_pxl=0.1);
    None means "as the config file says", so a notebook's defaults reproduce the config file.
    """
    sets = [f"{key.replace('__', '.')}={json.dumps(value)}" for key, value in params.items() if value is not None]
    if run_name:
        sets.append(f"name={run_name}")
    return load_config(config, list(overrides) + sets)


def dataset_statistics(dataset: Any) -> dict[str, Any]:
    """Images, instances, instances per image and per class, and mask areas of a labeled data set."""
    per_class: Counter[str] = Counter()
    counts, areas = [], []
    for i in range(len(dataset)):
        target = dataset.target(i)
        counts.append(len(target.labels))
        per_class.update(dataset.classes[int(label)] for label in target.labels)
        areas.extend(int(m.sum()) for m in target.masks)
    counts_arr = np.asarray(counts or [0])
    return {"images": len(dataset), "instances": int(counts_arr.sum()),
            "instances_per_image": {"min": int(counts_arr.min()), "mean": round(float(counts_arr.mean()), 2),
                                    "max": int(counts_arr.max())},
            "per_class": {name: per_class.get(name, 0) for name in dataset.classes},
            "median_mask_area_px": float(np.median(areas)) if areas else 0.0}


def show_samples(dataset: Any, count: int = 6, columns: int = 3, seed: int = 0):
    """A matplotlib figure of `count` random samples with their instance masks drawn."""
    import matplotlib.pyplot as plt

    from cast.inspection import ImageInstances, draw_instances

    rng = np.random.default_rng(seed)
    indices = rng.choice(len(dataset), size=min(count, len(dataset)), replace=False)
    rows = -(-len(indices) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, index in zip(axes.flat, indices):
        sample = dataset[int(index)]
        drawn = draw_instances(sample.image, ImageInstances(sample.masks, sample.labels), dataset.classes)
        ax.imshow(drawn)
        ax.set_title(f"image {sample.image_id}: {len(sample.labels)} instances", fontsize=9)
    fig.tight_layout()
    return fig


def browse(run_dir: str | Path):
    """An ipywidgets browser over a run's images: switch between ground truth, each stage's
    pseudo-labels and each model's predictions, and move the score threshold (of the first seed's
    folder, for a run over seeds).

    The drawing is an Image widget whose bytes are replaced, not an Output widget that is cleared
    and redrawn into: papermill (nbclient) hung for good on that Output widget, on a cell the
    kernel had finished, in a `make demo`."""
    import io

    import ipywidgets as widgets
    from PIL import Image

    from cast.inspection import RunInspector

    report = RunFolder(run_dir).report_json
    seeds = json.loads(report.read_text()).get("seeds") if report.is_file() else None
    if seeds:  # a run over seeds: its first seed's folder holds images, labels and predictions
        run_dir = Path(run_dir) / f"seed_{seeds[0]}"
    inspector = RunInspector(run_dir)
    image = widgets.Dropdown(options=inspector.data.keys, description="image")
    source = widgets.Dropdown(options=inspector.data.sources(), description="labels")
    threshold = widgets.FloatSlider(value=0.5, min=0.0, max=1.0, step=0.05, description="score ≥")
    picture = widgets.Image(format="png")
    message = widgets.Label()

    def redraw(_: Any = None) -> None:
        try:
            drawn = inspector.overlay(image.value, source.value, threshold.value)
        except ValueError as e:  # e.g. an image that cannot be read any more
            message.value = str(e)
            return
        message.value = ""
        png = io.BytesIO()
        Image.fromarray(drawn).resize((drawn.shape[1] * 3, drawn.shape[0] * 3), Image.NEAREST).save(png, "PNG")
        picture.value = png.getvalue()

    for w in (image, source, threshold):
        w.observe(redraw, names="value")
    redraw()
    return widgets.VBox([widgets.HBox([image, source, threshold]), message, picture])


def show_report(run_dir: str | Path) -> None:
    """report.md of a run, rendered, and its AP figure."""
    from IPython.display import Image as IPImage
    from IPython.display import Markdown, display

    folder = RunFolder(run_dir)
    display(Markdown(folder.report_md.read_text()))
    figure = folder.plots / "ap.png"
    if figure.is_file():
        display(IPImage(filename=str(figure)))


def show_stage_plots(run_dir: str | Path, stage: str) -> None:
    """The loss / AP curves the trainer wrote for `stage`."""
    from IPython.display import Image as IPImage
    from IPython.display import display

    for png in sorted((RunFolder(run_dir).stage(stage) / "plots").glob("*.png")):
        display(IPImage(filename=str(png)))
