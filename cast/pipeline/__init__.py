"""The CAST pipeline: pseudo-labels, stages, reports, ablations and the run entry point."""
