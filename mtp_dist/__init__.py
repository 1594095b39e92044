"""mtp_dist: distributed training of multi-token-prediction language models."""

__version__ = "0.1.0"
