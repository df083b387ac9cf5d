"""VQ-VAE image tokenizer: tensors in, tensors out (no orchestration, no file formats)."""

from .checkpoint import CheckpointError, load_tokenizer, save_checkpoint
from .config import Config, ConfigError, load_config
from .data import DataError, open_source
from .model import VQVAE
from .quantizer import QuantizerOutput, VectorQuantizer, nearest_code
from .train import TrainingError, TrainResult, train

__version__ = "0.1.0"

__all__ = [
    "VQVAE",
    "CheckpointError",
    "Config",
    "ConfigError",
    "DataError",
    "QuantizerOutput",
    "TrainResult",
    "TrainingError",
    "VectorQuantizer",
    "load_config",
    "load_tokenizer",
    "nearest_code",
    "open_source",
    "save_checkpoint",
    "train",
]
