"""Gradio app to inspect a CAST run: overlays, the contrastive sampler at a clicked pixel, uploads.

    python apps/inspect.py --run runs/demo [--host 127.0.0.1] [--port 7860] [--data-root data/demo]

All logic lives in `cast.inspection`; this file lays out the page and wires the events. The app
serves on localhost only unless told otherwise, never makes a share link, returns images as
pixels (so gradio needs no access to the run or data folders: both are blocked for its file
route), and caps uploads.
"""
from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, Python puts this folder first on sys.path, where this file would shadow the
# standard library's `inspect` module for every import below.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import argparse  # noqa: E402
import functools  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from typing import Any  # noqa: E402

import gradio as gr  # noqa: E402

from cast.inspection import GROUND_TRUTH, MAX_UPLOAD_BYTES, RunInspector, UnsafePathError  # noqa: E402
from cast.losses import SAMPLERS  # noqa: E402

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860


def _user_errors(fn: Callable) -> Callable:
    """Show bad requests (unknown image, refused path, not an image...) as a message in the page."""
    @functools.wraps(fn)
    def wrapper(*args: Any) -> Any:
        try:
            return fn(*args)
        except (ValueError, FileNotFoundError, PermissionError, UnsafePathError) as e:
            raise gr.Error(str(e)) from None
    return wrapper


def build_app(inspector: RunInspector) -> gr.Blocks:
    """The page for one run."""
    data = inspector.data
    keys = data.keys
    if not keys:
        raise ValueError(f"{data.run.root}: the run's data set has no images")
    models = data.models()
    sources = data.sources()
    choices = [(f"{data.images[k].split}: {k}", k) for k in keys]

    @_user_errors
    def overlay(key: str, source: str, threshold: float) -> Any:
        return inspector.overlay(key, source, float(threshold))

    @_user_errors
    def explain(key: str, stage: str | None, strategy: str, num_negatives: float, x: float | None,
                y: float | None) -> tuple[Any, Any, dict]:
        if not stage:
            raise ValueError(f"run {data.run.name} has no saved model to explain with")
        if x is None or y is None:
            raise ValueError("click a pixel of the overlay first")
        return inspector.explain(key, stage, strategy, int(x), int(y), int(num_negatives))

    @_user_errors
    def predict_upload(path: str | None, stage: str | None, threshold: float) -> Any:
        if not path:
            raise ValueError("upload an image first")
        if not stage:
            raise ValueError(f"run {data.run.name} has no saved model to predict with")
        return inspector.predict_upload(path, stage, float(threshold))

    @_user_errors
    def clicked(key: str, evt: gr.SelectData) -> tuple[int, int]:
        return inspector.image_coordinates(key, int(evt.index[0]), int(evt.index[1]))

    with gr.Blocks(title=f"CAST inspection: {data.run.name}", analytics_enabled=False) as app:
        gr.Markdown(f"## CAST run `{data.run.name}`\nGround truth, pseudo-labels and predictions. Click a pixel "
                    "of the overlay to see how the contrastive loss would draw its negatives.")
        with gr.Row():
            image_key = gr.Dropdown(choices=choices, value=keys[0], label="Image", scale=3)
            number = gr.Slider(0, len(keys) - 1, value=0, step=1, label="Image number", scale=2)
        with gr.Row():
            source = gr.Radio(sources, value=GROUND_TRUTH, label="Show")
            threshold = gr.Slider(0.0, 1.0, value=0.5, step=0.01, label="Score threshold")
        with gr.Row():
            shown = gr.Image(value=inspector.overlay(keys[0], GROUND_TRUTH, 0.5), label="Overlay (click a pixel)",
                             format="png", interactive=False, height=384, elem_id="overlay")
            heat = gr.Image(label="s_deb of the clicked pixel (relative to its max); dots: the R negatives drawn",
                            format="png", interactive=False, height=384)
            positive = gr.Image(label="Positive: the same pixel in the strong view", format="png",
                                interactive=False, height=384)
        with gr.Row():
            model = gr.Dropdown(models, value=models[0] if models else None, label="Model")
            strategy = gr.Radio(list(SAMPLERS), value=data.config.losses.sampler, label="Negative sampler")
            num_negatives = gr.Slider(1, 256, value=data.config.losses.num_negatives, step=1,
                                      label="R (negatives)")
            x = gr.Number(label="x (image pixels)", precision=0)
            y = gr.Number(label="y (image pixels)", precision=0)
            explain_button = gr.Button("Explain pixel")
        details = gr.JSON(label="Sampler details")
        with gr.Row():
            upload = gr.File(label="Upload an image", file_types=["image"], type="filepath")
            prediction = gr.Image(label="Prediction on the upload", format="png", interactive=False, height=384)

        view_inputs = [image_key, source, threshold]
        explain_inputs = [image_key, model, strategy, num_negatives, x, y]
        for control in (image_key, source):
            control.change(overlay, view_inputs, shown, api_name=False)
        threshold.release(overlay, view_inputs, shown, api_name="overlay")
        number.release(lambda i: keys[int(i)], number, image_key, api_name=False)
        shown.select(clicked, image_key, [x, y], api_name=False).then(
            explain, explain_inputs, [heat, positive, details], api_name=False)
        explain_button.click(explain, explain_inputs, [heat, positive, details], api_name="explain")
        upload.upload(predict_upload, [upload, model, threshold], prediction, api_name="predict_upload")
    return app


def launch(inspector: RunInspector, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
           prevent_thread_lock: bool = False) -> gr.Blocks:
    """Serve the app for `inspector`'s run (no share link; the run and data folders are not served)."""
    app = build_app(inspector)
    app.queue(default_concurrency_limit=2)
    app.launch(server_name=host, server_port=port, share=False, prevent_thread_lock=prevent_thread_lock,
               allowed_paths=[], blocked_paths=[str(root) for root in inspector.data.roots],
               max_file_size=MAX_UPLOAD_BYTES, ssr_mode=False, show_error=False, quiet=prevent_thread_lock)
    return app


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Inspect a CAST run in the browser.")
    parser.add_argument("--run", required=True, help="run folder, e.g. runs/demo")
    parser.add_argument("--data-root", default=None, help="data folder (default: the one the run's config names)")
    parser.add_argument("--host", default=DEFAULT_HOST, help=f"address to serve on (default {DEFAULT_HOST})")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    args = parser.parse_args(argv)
    launch(RunInspector(args.run, args.data_root), args.host, args.port)


if __name__ == "__main__":
    main()
