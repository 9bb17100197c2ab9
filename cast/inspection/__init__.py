"""The inspection tools: a run's images, ground truth, pseudo-labels, predictions and models
(`run`), overlays and heat maps (`draw`), what requests may ask for (`safety`), the contrastive
loss's view of one pixel (`explain`) and the app's actions (`inspector`). The Gradio UI is
apps/inspect.py."""
from cast.inspection.draw import ImageInstances, colour_of, draw_instances, enlarge
from cast.inspection.explain import PixelGrid, explain_pixel, instance_id_map
from cast.inspection.inspector import RunInspector
from cast.inspection.run import GROUND_TRUTH, RunContents
from cast.inspection.safety import MAX_UPLOAD_BYTES, UnsafePathError, read_upload, resolve_inside

__all__ = ["GROUND_TRUTH", "MAX_UPLOAD_BYTES", "ImageInstances", "PixelGrid", "RunContents", "RunInspector",
           "UnsafePathError", "colour_of", "draw_instances", "enlarge", "explain_pixel", "instance_id_map",
           "read_upload", "resolve_inside"]
