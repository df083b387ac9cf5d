"""Quantizers: turn encoder vectors into code indices and back.

- ``vq``: the lecture's nearest-code vector quantizer (squared L2 argmin, straight-through,
  codebook loss or EMA updates, k-means start and dead-code restarts), with a memory-bounded
  search at any K, and optional factorized codes (``codebook_dim``), cosine search
  (``l2_normalize``) and the rotation trick (``rotation``);
- ``fsq``: finite scalar quantization, a fixed grid and no codebook to learn;
- ``rvq``: residual vector quantization, ``depth`` vq stages, ``depth`` indices per vector.

Every quantizer returns a ``QuantizerOutput`` and has ``encode(z)`` (indices, no state
change), ``lookup(indices)`` (codes for decoding), ``passthrough(z)`` (the training warm-up),
``generators()`` (random state to save), ``codebook_size`` (codes per level) and ``depth``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from .fsq import FiniteScalarQuantizer
from .output import QuantizerOutput
from .rotation import rotate_onto
from .rvq import ResidualVectorQuantizer
from .vq import VectorQuantizer, kmeans, nearest_code, squared_distances

if TYPE_CHECKING:
    from ..config import ModelConfig, QuantizerConfig


def build_quantizer(cfg: QuantizerConfig, model_cfg: ModelConfig, seed: int = 0) -> nn.Module:
    """The quantizer ``cfg.kind`` names, sized by the model config: vectors of
    ``model_cfg.embedding_dim``, ``model_cfg.num_embeddings`` codes (per stage for rvq)."""
    if cfg.kind == "fsq":
        quantizer = FiniteScalarQuantizer(cfg.levels or ())
        if (model_cfg.embedding_dim, model_cfg.num_embeddings) != (
                quantizer.embedding_dim, quantizer.codebook_size):
            raise ValueError(
                f"fsq levels {list(quantizer.levels)} need model.embedding_dim "
                f"{quantizer.embedding_dim} and model.num_embeddings {quantizer.codebook_size}, "
                f"got {model_cfg.embedding_dim} and {model_cfg.num_embeddings}")
        return quantizer
    options = dict(
        beta=cfg.beta, ema=cfg.ema, decay=cfg.decay, eps=cfg.eps, kmeans_init=cfg.kmeans_init,
        kmeans_iters=cfg.kmeans_iters, restart_after=cfg.restart_after,
        chunk_bytes=cfg.chunk_mib * 2**20, codebook_dim=cfg.codebook_dim,
        l2_normalize=cfg.l2_normalize, rotation_trick=cfg.rotation_trick,
    )
    if cfg.kind == "rvq":
        return ResidualVectorQuantizer(model_cfg.num_embeddings, model_cfg.embedding_dim,
                                       depth=cfg.depth, seed=seed, **options)
    return VectorQuantizer(model_cfg.num_embeddings, model_cfg.embedding_dim, seed=seed,
                           **options)


__all__ = [
    "FiniteScalarQuantizer",
    "QuantizerOutput",
    "ResidualVectorQuantizer",
    "VectorQuantizer",
    "build_quantizer",
    "kmeans",
    "nearest_code",
    "rotate_onto",
    "squared_distances",
]
