"""Mask AP evaluation: COCO-style through pycocotools, Cityscapes' official metric through
cityscapesscripts."""
from cast.evaluation.coco_eval import evaluate_instances, instances_to_coco, load_results, save_results

__all__ = ["evaluate_instances", "instances_to_coco", "load_results", "save_results"]
