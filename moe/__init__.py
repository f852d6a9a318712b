"""Mixture-of-Experts training system: configs, the decoder model, the MoE layer, training and the CLI."""

__version__ = "0.1.0"
