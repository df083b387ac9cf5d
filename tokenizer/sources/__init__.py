"""Image sources by name: the bundled MNIST sample, MNIST and Fashion-MNIST (IDX files),
CIFAR-10, folders of image files, .npz arrays, WebDataset tar shards and Hugging Face-style
Parquet files; one module per format.

``open_source(cfg.data)`` is the one entry point; ``ImageSource`` (``base``) is what every
format gives, ``batches`` how training and encoding read it. Formats that keep images as
encoded files share ``decoding`` (bytes to tensors) and ``labels`` (class ids checked);
those stored as many files (``webdataset``, ``parquet_images``) share ``shards`` (patterns,
fingerprints, splits by file name) and ``handles`` (files opened per process, never pickled).
``identity``: what each format's key, stamp and content hash of an image are built from, for
token stores that re-encode only the images that changed.
"""

from __future__ import annotations

from pathlib import Path

from ..config import DataConfig
from ..errors import ConfigError, DataError
from ..splits import holdout_splits
from .base import DEFAULT_DATA_ROOT, ArraySource, ImageSource
from .batches import iterate_batches, iterate_id_batches, prefetched, split_batches
from .cifar import cifar10
from .idx import bundled_mnist_sample, idx_source, read_idx
from .imagefolder import ImageFolderSource
from .npz import npz_source
from .parquet_images import ParquetImageSource
from .shards import expand_braces
from .webdataset import WebDatasetSource

__all__ = [
    "DATASET_NAMES",
    "ArraySource",
    "DataError",
    "ImageFolderSource",
    "ImageSource",
    "ParquetImageSource",
    "WebDatasetSource",
    "expand_braces",
    "holdout_splits",
    "iterate_batches",
    "iterate_id_batches",
    "open_source",
    "prefetched",
    "read_idx",
    "split_batches",
]


DATASET_NAMES = (
    "mnist-sample", "mnist", "fashion-mnist", "cifar10", "imagefolder:PATH", "npz:PATH",
    "webdataset:PATTERN", "parquet:PATH",
)
FILE_SPLIT_KINDS = ("webdataset:", "parquet:")  # the datasets data.split_by: file applies to


def open_source(cfg: DataConfig) -> ImageSource:
    """The image source a config names (see ``DATASET_NAMES``)."""
    name = cfg.dataset
    if cfg.split_by == "file" and not name.startswith(FILE_SPLIT_KINDS):
        raise ConfigError("data.split_by: file works only with webdataset: and parquet: "
                          f"datasets, not {name}; set data.split_by: rule")
    root = Path(cfg.data_root).expanduser() if cfg.data_root else DEFAULT_DATA_ROOT
    if name == "mnist-sample":
        return bundled_mnist_sample(cfg)
    if name == "mnist":
        return idx_source("mnist", "MNIST", root, cfg)
    if name == "fashion-mnist":
        return idx_source("fashion-mnist", "FashionMNIST", root, cfg)
    if name == "cifar10":
        return cifar10(root, cfg)
    if name.startswith("imagefolder:"):
        return ImageFolderSource(Path(name.split(":", 1)[1]).expanduser(), cfg)
    if name.startswith("npz:"):
        return npz_source(Path(name.split(":", 1)[1]).expanduser(), cfg)
    if name.startswith("webdataset:"):
        return WebDatasetSource(name.split(":", 1)[1], cfg)
    if name.startswith("parquet:"):
        return ParquetImageSource(name.split(":", 1)[1], cfg)
    raise DataError(f"unknown dataset '{name}'; use one of {', '.join(DATASET_NAMES)}")
