"""CAST: semi-supervised distillation of vision foundation models into compact
instance-segmentation experts (Contrastive Adaptation and distillation, Taghavi et al.).

    model = cast.load_model("runs/demo/stages/student_refinement/model")   # or an exported .onnx
    instances = model.predict_images(["a.jpg", "b.jpg"], score_threshold=0.5)
    cast.save_coco(instances, ["a.jpg", "b.jpg"], "predictions.json", classes=model.classes)
"""

__version__ = "0.1.1"


def __getattr__(name: str):
    # The public API, imported on first use so that `import cast` (the CLI's config check) stays light.
    if name == "load_model":
        from cast.models.auto import load_model

        return load_model
    if name == "save_coco":
        from cast.inference.coco_output import save_coco

        return save_coco
    raise AttributeError(f"module 'cast' has no attribute {name!r}")
