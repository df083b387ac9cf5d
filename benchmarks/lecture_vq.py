"""The seed lecture's quantizer, re-implemented as the baseline benchmarks compare against.

Full (N, K) distance matrix, one-hot scatter, one-hot matmul for the lookup, codebook
initialised uniform(-1/K, 1/K), loss = q_latent + 0.25 * e_latent with mean reductions.
The one change: argmin over distances (the lecture's sample code has argmax, a bug).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from vqtok.tokenizer.quantizers.vq import QuantizerOutput


class LectureQuantizer(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int, beta: float = 0.25) -> None:
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.beta = beta
        self.embedding = nn.Embedding(num_embeddings, embedding_dim)
        self.embedding.weight.data.uniform_(-1 / num_embeddings, 1 / num_embeddings)

    @property
    def codebook(self) -> torch.Tensor:
        return self.embedding.weight

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        b, d, h, w = z.shape
        inputs = z.permute(0, 2, 3, 1).contiguous()
        flat = inputs.view(-1, d)
        distances = (
            torch.sum(flat**2, dim=1, keepdim=True)
            + torch.sum(self.embedding.weight**2, dim=1)
            - 2 * torch.matmul(flat, self.embedding.weight.t())
        )
        indices = torch.argmin(distances, dim=1).unsqueeze(1)
        one_hot = torch.zeros(indices.shape[0], self.num_embeddings, device=z.device)
        one_hot.scatter_(1, indices, 1)
        quantized = torch.matmul(one_hot, self.embedding.weight).view(inputs.shape)
        e_latent = F.mse_loss(quantized.detach(), inputs)
        q_latent = F.mse_loss(quantized, inputs.detach())
        quantized = inputs + (quantized - inputs).detach()
        return QuantizerOutput(
            quantized=quantized.permute(0, 3, 1, 2).contiguous(),
            indices=indices.view(b, h, w),
            loss=q_latent + self.beta * e_latent,
            codebook_loss=q_latent,
            commitment_loss=e_latent,
        )
