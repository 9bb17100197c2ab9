"""The training engine: one trainer for every CAST stage (the unified objective in `objective`),
with resumable checkpoints, DDP, metrics and plots."""
