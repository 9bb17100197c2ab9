"""CAST losses: the set-prediction loss (`set_prediction`), the instance-aware pixel contrastive
loss (`contrastive`) and its debiased negative sampler (`sampling`)."""

# The negative samplers of the contrastive loss, in the order of the paper's Table 4.
SAMPLERS = ("uniform", "mask", "class", "fusion")
