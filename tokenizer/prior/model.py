"""An autoregressive prior over token grids: a small decoder-only transformer, in one file.

The h*w codes of a grid are read in raster order. The sequence fed to the model is the label
token followed by the first T-1 codes; the output at position t is the distribution of code t
given the label and the codes before it:

    input   [label]  x_0   x_1  ...  x_{T-2}
    predict   x_0    x_1   x_2  ...  x_{T-1}

So the label token doubles as the start token. Labels 0..C-1 are classes; label C (``no_label``)
means "unconditional" and is what grids without a label, or with their label dropped during
training, see. Causal self-attention keeps position t from seeing anything after x_{t-1}.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import PriorModelConfig, PriorShape


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.dropout = dropout
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)
        # (B, T, D) -> (B, heads, T, D / heads)
        q, k, v = (z.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2)
                   for z in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        y = y.transpose(1, 2).contiguous().view(b, t, d)
        return self.resid_drop(self.proj(y))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads, dropout)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, 4 * d_model),
            nn.GELU(),
            nn.Linear(4 * d_model, d_model),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TokenPrior(nn.Module):
    """``forward(codes (B, T), labels (B,)) -> logits (B, T, K)`` over the next code."""

    def __init__(self, shape: PriorShape, config: PriorModelConfig) -> None:
        super().__init__()
        if config.d_model % config.n_heads:
            raise ValueError(
                f"d_model {config.d_model} is not divisible by n_heads {config.n_heads}"
            )
        self.shape = shape
        self.config = config
        # Codes with depth are one sequence in raster order, the levels of a position in turn
        # (the stores' (h, w, depth) order): each level of each position has its own position
        # embedding, and a level is predicted from the coarser levels of its position.
        self.seq_len = shape.grid_h * shape.grid_w * shape.depth
        self.no_label = shape.num_classes  # the extra label-embedding row
        d = config.d_model
        self.code_emb = nn.Embedding(shape.vocab_size, d)
        self.label_emb = nn.Embedding(shape.num_classes + 1, d)
        self.pos_emb = nn.Parameter(torch.zeros(1, self.seq_len, d))
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(
            Block(d, config.n_heads, config.dropout) for _ in range(config.n_layers)
        )
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, shape.vocab_size, bias=False)
        self.apply(self._init_weights)
        # GPT-2: scale the residual projections down with depth so the stream stays O(1).
        for name, p in self.named_parameters():
            if name.endswith("attn.proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layers))
        nn.init.normal_(self.pos_emb, mean=0.0, std=0.02)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def label_index(self, labels: torch.Tensor | None, batch: int,
                       device: torch.device) -> torch.Tensor:
        """Label indices for the embedding: -1 (no label) and ``None`` map to ``no_label``."""
        if labels is None:
            return torch.full((batch,), self.no_label, dtype=torch.long, device=device)
        labels = labels.to(device=device, dtype=torch.long)
        if bool(((labels < -1) | (labels > self.no_label)).any()):
            bad = labels[(labels < -1) | (labels > self.no_label)][0].item()
            raise ValueError(
                f"label {bad} is outside 0..{self.no_label - 1} (or -1 for none); the prior "
                f"was trained on {self.shape.num_classes} classes"
            )
        return torch.where(labels < 0, torch.full_like(labels, self.no_label), labels)

    def forward(self, codes: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, K); ``codes`` may be shorter than the grid (only the prefix is read).

        ``codes[:, t]`` only influences logits at positions > t.
        """
        b, t = codes.shape
        if t > self.seq_len:
            raise ValueError(f"sequence of {t} codes is longer than the grid ({self.seq_len})")
        start = self.label_emb(self.label_index(labels, b, codes.device))[:, None]
        x = torch.cat([start, self.code_emb(codes[:, : t - 1])], dim=1) if t > 1 else start
        x = self.drop(x + self.pos_emb[:, :t])
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))

    def loss(self, codes: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Mean cross-entropy in nats per code over grids flattened to (B, h*w*depth)."""
        codes = codes.reshape(codes.shape[0], -1)
        logits = self(codes, labels)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), codes.reshape(-1))

    @torch.no_grad()
    def sample(
        self,
        n: int,
        labels: torch.Tensor | None = None,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """``n`` grids (n, h, w) int64 ((n, h, w, depth) with depth), drawn code by code.

        ``temperature`` 0 is greedy (argmax); ``top_k`` keeps the k most likely codes at
        each step. The same generator state gives the same grids.
        """
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        was_training = self.training
        self.eval()
        device = self.pos_emb.device
        labels = self.label_index(labels, n, device)
        if labels.shape != (n,):
            raise ValueError(f"expected {n} labels, got shape {tuple(labels.shape)}")
        codes = torch.zeros((n, 0), dtype=torch.long, device=device)
        for _ in range(self.seq_len):
            # Only the code being drawn needs the last position; the dummy 0 is never read.
            padded = torch.cat([codes, codes.new_zeros((n, 1))], dim=1)
            logits = self(padded, labels)[:, -1].float()
            codes = torch.cat([codes, _draw(logits, temperature, top_k, generator)], dim=1)
        self.train(was_training)
        return codes.view(n, *self.shape.grid)


def _draw(logits: torch.Tensor, temperature: float, top_k: int | None,
          generator: torch.Generator | None) -> torch.Tensor:
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).to(logits.device)
