"""Data sets: readers (COCO json, Cityscapes, ADE20K, image folders), splits, the demo set, views and loaders.

Only light names are imported here; import readers from their modules (``cast.data.coco``, ...).
"""
from cast.data.errors import DataError, DataWarning, LoadReport, MissingFileError

__all__ = ["DataError", "DataWarning", "LoadReport", "MissingFileError"]
