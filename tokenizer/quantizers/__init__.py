"""Quantizers: turn encoder vectors into code indices and back. ``vq`` is the lecture's
nearest-code vector quantizer (squared L2 argmin, straight-through, codebook loss or EMA
updates, k-means start and dead-code restarts), with a memory-bounded search at any K."""

from .vq import QuantizerOutput, VectorQuantizer, kmeans, nearest_code, squared_distances

__all__ = ["QuantizerOutput", "VectorQuantizer", "kmeans", "nearest_code", "squared_distances"]
