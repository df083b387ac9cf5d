"""The token prior: an autoregressive transformer over a store's code grids (``model``), its
config (``config``), training (``train``) and checkpoints (``checkpoint``).

Import from the modules; this package imports nothing itself, so reading a prior's
description (``checkpoint.read_prior_meta``) does not import torch.
"""
