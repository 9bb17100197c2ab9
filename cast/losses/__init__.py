"""CAST losses: the set-prediction loss (cast.losses.set_prediction) and the instance-aware pixel
contrastive loss (cast.losses.contrastive). Import them from their modules."""
