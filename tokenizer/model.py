"""The VQ-VAE: conv encoder, vector quantizer, transposed-conv decoder with a sigmoid.

Shapes for the defaults (28x28 MNIST, two downsamplings): image (B, 1, 28, 28) ->
encoder (B, 64, 7, 7) -> codes (B, 7, 7) in [0, 512) -> decoder (B, 1, 28, 28) in [0, 1].
The quantizer is the one ``quantizer.kind`` names (``quantizers.build_quantizer``); a
residual one of depth > 1 gives codes (B, 7, 7, depth). Around it, ``pre_quant`` maps the
encoder's output to the code width and ``post_quant`` the codes to the decoder's input
(identity but for fsq with ``quantizer.fsq_mlp``).

The model also keeps the mean image of its training data (a buffer, saved with the
weights): the trivial baseline its reconstructions are judged against (``tokenizer.health``)
and where a fresh run starts the decoder's output (``init_output_bias``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig, QuantizerConfig, fsq_model_sizes
from .quantizers import build_quantizer

#: Negative slope of ``activation: leaky_relu``: in short runs plain ReLUs that die take
#: part of the small encoder and decoder with them (0.6 dB on CIFAR-10 in 220 steps).
LEAKY_SLOPE = 0.2


def _activation(cfg: ModelConfig) -> nn.Module:
    return nn.LeakyReLU(LEAKY_SLOPE) if cfg.activation == "leaky_relu" else nn.ReLU()


class ResidualBlock(nn.Module):
    def __init__(self, channels: int, hidden: int, cfg: ModelConfig) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _activation(cfg),
            nn.Conv2d(channels, hidden, 3, padding=1),
            _activation(cfg),
            nn.Conv2d(hidden, channels, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def _encoder(in_channels: int, cfg: ModelConfig) -> nn.Sequential:
    """Stride-2 4x4 convs (each halves the size), then a 3x3 to the latent width."""
    layers: list[nn.Module] = []
    width = in_channels
    for _ in range(cfg.num_downsamples):
        layers += [nn.Conv2d(width, cfg.hidden_channels, 4, stride=2, padding=1),
                   _activation(cfg)]
        width = cfg.hidden_channels
    layers += [ResidualBlock(width, cfg.residual_channels, cfg)
               for _ in range(cfg.num_residual_blocks)]
    if cfg.num_residual_blocks:
        layers.append(_activation(cfg))
    layers.append(nn.Conv2d(width, cfg.latent_channels, 3, padding=1))
    return nn.Sequential(*layers)


def _decoder(out_channels: int, cfg: ModelConfig, in_channels: int) -> nn.Sequential:
    """Mirror of the encoder: a 3x3, then stride-2 4x4 transposed convs, then a sigmoid."""
    layers: list[nn.Module] = [
        nn.ConvTranspose2d(in_channels, cfg.hidden_channels, 3, padding=1)
    ]
    layers += [
        ResidualBlock(cfg.hidden_channels, cfg.residual_channels, cfg)
        for _ in range(cfg.num_residual_blocks)
    ]
    for i in range(cfg.num_downsamples):
        last = i == cfg.num_downsamples - 1
        out = out_channels if last else cfg.hidden_channels
        layers += [_activation(cfg),
                   nn.ConvTranspose2d(cfg.hidden_channels, out, 4, stride=2, padding=1)]
    layers.append(nn.Sigmoid())
    return nn.Sequential(*layers)


@dataclass
class VQVAEOutput:
    reconstruction: torch.Tensor
    indices: torch.Tensor
    loss: torch.Tensor  # reconstruction MSE + quantizer loss
    reconstruction_loss: torch.Tensor
    codebook_loss: torch.Tensor
    commitment_loss: torch.Tensor


class VQVAE(nn.Module):
    """Image tokenizer: ``encode`` gives integer code grids, ``decode`` turns them back."""

    def __init__(
        self,
        in_channels: int = 1,
        model: ModelConfig | None = None,
        quantizer: QuantizerConfig | None = None,
        seed: int = 0,
        image_size: int = 28,
    ) -> None:
        super().__init__()
        model = model or ModelConfig()
        quantizer = quantizer or QuantizerConfig()
        if quantizer.kind == "fsq":  # code width and codebook size follow from the levels
            model = fsq_model_sizes(model, quantizer)
        self.in_channels = in_channels
        self.center_input = model.center_input
        self.downsample_factor = 2**model.num_downsamples
        self.encoder = _encoder(in_channels, model)
        self.pre_quant: nn.Module = (
            nn.Conv2d(model.latent_channels, model.embedding_dim, 1)
            if model.latent_channels != model.embedding_dim
            else nn.Identity()
        )
        self.quantizer = build_quantizer(quantizer, model, seed=seed)
        # fsq's grid is a few fixed numbers per position: with fsq_mlp the decoder reads
        # a learned, nonlinear embedding of them (vq's decoder reads a learned code vector).
        self.post_quant: nn.Module = nn.Identity()
        decoder_in = model.embedding_dim
        if quantizer.fsq_mlp:
            self.pre_quant = nn.Sequential(
                _activation(model), nn.Conv2d(model.latent_channels, model.embedding_dim, 1))
            self.post_quant = nn.Sequential(
                nn.Conv2d(model.embedding_dim, model.hidden_channels, 1), _activation(model))
            decoder_in = model.hidden_channels
        self.decoder = _decoder(in_channels, model, decoder_in)
        # How many training images ``mean_image`` averages; 0: not known (checkpoints from
        # before it existed load with 0, see ``_fill_missing_mean_image``).
        self.register_buffer("mean_image", torch.zeros(in_channels, image_size, image_size))
        self.register_buffer("mean_image_count", torch.zeros((), dtype=torch.long))
        self._register_load_state_dict_pre_hook(_fill_missing_mean_image, with_module=True)

    @property
    def num_embeddings(self) -> int:
        """Codes per level: the range of every index."""
        return self.quantizer.num_embeddings

    @property
    def depth(self) -> int:
        """Indices per grid position: codes are (B, h, w) at 1, (B, h, w, depth) above."""
        return self.quantizer.depth

    @property
    def output_layer(self) -> nn.ConvTranspose2d:
        """The decoder's last transposed conv, the one the sigmoid reads."""
        return [m for m in self.decoder if isinstance(m, nn.ConvTranspose2d)][-1]

    @torch.no_grad()
    def set_mean_image(self, mean: torch.Tensor, count: int) -> None:
        """Record the training data's mean image (C, H, W) over ``count`` images."""
        self.mean_image.copy_(mean.detach())
        self.mean_image_count.fill_(count)

    @torch.no_grad()
    def init_output_bias(self) -> None:
        """Start the output at the data's mean: bias = logit(per-channel mean of mean_image).

        At init the sigmoid gives ~0.5 everywhere; when the data's mean is far from it (0.13
        on MNIST) Adam's first steps move every weight the same way, overshoot the mean and
        saturate the sigmoid, whose gradient then vanishes: a decoder that outputs black.
        Starting at the mean leaves nothing to overshoot.
        """
        if int(self.mean_image_count) == 0:
            raise ValueError("set_mean_image first: the output bias starts at the data's mean")
        mean = self.mean_image.mean(dim=(1, 2)).clamp(1e-3, 1 - 1e-3)
        self.output_layer.bias.copy_(torch.log(mean / (1 - mean)))

    def latent(self, x: torch.Tensor) -> torch.Tensor:
        if self.center_input:
            x = x * 2 - 1
        return self.pre_quant(self.encoder(x))

    def grid_shape(self, height: int, width: int) -> tuple[int, int]:
        return height // self.downsample_factor, width // self.downsample_factor

    def forward(self, x: torch.Tensor, quantize: bool = True) -> VQVAEOutput:
        """``quantize=False`` (the training warm-up) passes the encoder's output straight to
        the decoder: a plain autoencoder, no codebook loss and no codebook learning; the
        indices are still the nearest codes."""
        z = self.latent(x)
        q = self.quantizer(z) if quantize else self.quantizer.passthrough(z)
        reconstruction = self.decoder(self.post_quant(q.quantized))
        recon_loss = F.mse_loss(reconstruction.float(), x.float())
        return VQVAEOutput(
            reconstruction=reconstruction,
            indices=q.indices,
            loss=recon_loss + q.loss,
            reconstruction_loss=recon_loss,
            codebook_loss=q.codebook_loss,
            commitment_loss=q.commitment_loss,
        )

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) floats in [0, 1] -> (B, h, w) int64 code indices; (B, h, w, depth)
        for a residual quantizer of depth > 1."""
        return self.quantizer.encode(self.latent(x).float())

    @torch.no_grad()
    def decode(self, codes: torch.Tensor | np.ndarray) -> torch.Tensor:
        """(B, h, w) code indices of any integer dtype -> (B, C, H, W) images in [0, 1];
        (B, h, w, depth) for depth > 1.

        Token stores keep codes as uint16 (K <= 65,536): their arrays (read-only numpy, as
        ``load_grid`` gives them) and ``torch.from_numpy`` of them are accepted as they are.
        """
        if isinstance(codes, np.ndarray):
            if codes.dtype.kind not in "iu":
                raise TypeError(f"codes must be an integer array, got {codes.dtype}")
            codes = torch.from_numpy(codes.astype(np.int64))  # a copy: read-only arrays too
        if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
            raise TypeError(f"codes must be an integer tensor, got {codes.dtype}")
        depth = self.depth
        if depth == 1 and codes.dim() != 3:
            raise ValueError(f"codes must be (B, h, w); got shape {tuple(codes.shape)}")
        if depth > 1 and (codes.dim() != 4 or codes.shape[-1] != depth):
            raise ValueError(f"codes must be (B, h, w, {depth}) for a depth-{depth} quantizer; "
                             f"got shape {tuple(codes.shape)}")
        codes = codes.long()  # also what the lookup indexes with; uint16 has few kernels
        k = self.num_embeddings
        levels = [codes] if depth == 1 else list(codes.unbind(-1))
        for i, level in enumerate(levels):
            if level.numel() and (int(level.min()) < 0 or int(level.max()) >= k):
                where = "" if depth == 1 else f"of level {i} "
                raise ValueError(f"codes {where}must lie in [0, {k}); got "
                                 f"[{int(level.min())}, {int(level.max())}]")
        return self.decoder(self.post_quant(self.quantizer.lookup(codes))).float()



def _fill_missing_mean_image(
    module: nn.Module, state: dict[str, torch.Tensor], prefix: str, *_: object
) -> None:
    """Checkpoints written before the mean image was kept load with it unknown (count 0)."""
    if prefix + "mean_image" not in state and prefix + "mean_image_count" not in state:
        state[prefix + "mean_image"] = module.mean_image.detach().clone()
        state[prefix + "mean_image_count"] = torch.zeros((), dtype=torch.long)
