"""PyTorch utilities: distributed launch, statistics, per-sample random numbers, misc helpers."""
