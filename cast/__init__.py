"""CAST: semi-supervised distillation of vision foundation models into compact
instance-segmentation experts (Contrastive Adaptation and distillation, Taghavi et al.)."""

__version__ = "0.1.1"
