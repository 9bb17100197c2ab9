"""Evaluation in one place: a model's predictions on a data set as COCO results (`predict`),
COCO mask AP by pycocotools (`coco`), the official Cityscapes metric (`cityscapes`) and the
run's cached evaluator (`evaluator`)."""
