"""Sigmoid vs softmax attention for single-cell foundation models."""

__version__ = "0.1.0"
