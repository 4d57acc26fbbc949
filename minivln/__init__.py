"""MiniVLN: small, fast vision-and-language navigation agents (DUET distilled in two stages).

The package folders follow the pipeline:
data -> env -> features -> model -> training -> distill -> evaluation -> deploy.
"""

__version__ = "0.1.0"
