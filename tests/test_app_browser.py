"""The inspection app as a browser shows it: headless Chromium (Debian's `chromium` package, which
`make browser` installs) loads the page and the screenshot must show the ground-truth overlay.

The overlay outlines instance i in `colour_of(i)`, a saturated colour that neither the gradio page
nor the demo photos contain; the first instance's colour must appear in the screenshot.
"""
from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image
from test_app import free_port, load_app_module, make_synthetic_run

from cast.inspection import GROUND_TRUTH, RunInspector, colour_of

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--hide-scrollbars", "--window-size=1400,1200")


def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("BROWSER TEST NOT RUN: no `chromium` executable on PATH. Install Debian's chromium "
                "(`apt-get install -y chromium`, or `make browser`); CI must have it.")


def _near(pixels: np.ndarray, colour: np.ndarray, tolerance: int = 40) -> np.ndarray:
    return (np.abs(pixels.astype(np.int16) - colour.astype(np.int16)) <= tolerance).all(axis=-1)


def test_page_shows_the_overlay(tmp_path):
    chromium = _chromium()
    inspector = RunInspector(make_synthetic_run(tmp_path, image_size=96))
    key = inspector.data.keys[0]
    assert len(inspector.data.instances(key, GROUND_TRUTH)) > 0
    raw = inspector.data.pixels(key)
    assert _near(raw, colour_of(0)).sum() == 0  # the colour can only come from the overlay

    port = free_port()
    app = load_app_module().launch(inspector, port=port, prevent_thread_lock=True)
    shot = tmp_path / "page.png"
    try:
        # The virtual-time budget lets the page fetch its config and the overlay before the shot.
        command = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}",
                   "--virtual-time-budget=15000", f"--screenshot={shot}", f"http://127.0.0.1:{port}/"]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    finally:
        app.close()
    page = np.asarray(Image.open(shot).convert("RGB"))
    assert page.shape[:2] == (1200, 1400)
    found = _near(page, colour_of(0)).sum()
    assert found >= 20, f"the overlay's outline colour {colour_of(0).tolist()} is not on the page ({found} pixels)"
