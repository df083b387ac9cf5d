"""Vector quantizer: nearest-code lookup, straight-through gradients, codebook learning.

Losses use the mean over all elements (``F.mse_loss``), the convention of the seed lecture and
of the VQ-VAE reference code: a term equals the per-vector sum of squares divided by the
embedding width D. For the lecture's toy example (D = 2) the per-vector sums of squares are
0.17, so ``codebook_loss`` and ``commitment_loss`` are each 0.085.

Three options change where and how the search runs, all off by default (the lecture's
quantizer, unchanged): ``codebook_dim`` (codes of a lower width d, reached through learned
1x1 in/out projections: the search, the losses, EMA, k-means and restarts all work in d),
``l2_normalize`` (unit vectors and unit codes, so the squared-L2 argmin is the largest cosine)
and ``rotation_trick`` (the gradient estimator of ``rotation.py`` instead of straight-through).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import distributed as dist
from ..heap import MMAP_THRESHOLD
from .output import QuantizerOutput
from .rotation import rotate_onto

DEFAULT_CHUNK_BYTES = 256 * 2**20
#: On CPU a distance block of about this size stays in cache between the GEMM and the argmin.
CPU_BLOCK_BYTES = 4 * 2**20
#: ...but never fewer rows than this, or re-packing the codebook for each GEMM dominates.
CPU_MIN_BLOCK_ROWS = 64


def _block_shape(n: int, k: int, chunk_bytes: int, device: torch.device) -> tuple[int, int]:
    """(rows, codes) per distance block: never over ``chunk_bytes``; on CPU also cache-sized.

    A CPU block that stays in cache is written by the GEMM and read by the argmin without a
    trip to memory, which roughly halves the search time against one big block; on a GPU
    big blocks mean few kernel launches, so the whole budget is used.
    """
    code_chunk = max(1, min(k, chunk_bytes // 4))
    row_chunk = max(1, chunk_bytes // (4 * code_chunk))
    if device.type == "cpu":
        cached = max(CPU_MIN_BLOCK_ROWS, CPU_BLOCK_BYTES // (4 * code_chunk))
        row_chunk = min(row_chunk, cached)
    return min(row_chunk, max(n, 1)), code_chunk


def nearest_code(
    vectors: torch.Tensor, codebook: torch.Tensor, chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> torch.Tensor:
    """Index of the nearest code (squared L2) for each row of ``vectors`` (N, D).

    ||z||^2 is the same for every code of a row, so the ranking needs only
    ||e||^2 - 2 z.e, one GEMM per block. Blocking over rows (and over codes when one row of
    distances would not fit) keeps the extra memory at most ``chunk_bytes`` whatever N and K.
    Distances are computed in float32 even under autocast: half precision ties codes.
    """
    with torch.autocast(device_type=vectors.device.type, enabled=False):
        z = vectors.detach().float()
        codes = codebook.detach().float()
        n, k = z.shape[0], codes.shape[0]
        code_sq = (codes * codes).sum(dim=1)
        row_chunk, code_chunk = _block_shape(n, k, chunk_bytes, z.device)
        indices = torch.empty(n, dtype=torch.long, device=z.device)
        block = torch.empty(row_chunk, code_chunk, dtype=z.dtype, device=z.device)  # one for all
        for r0 in range(0, n, row_chunk):
            rows = z[r0 : r0 + row_chunk]
            if code_chunk == k:
                dist = torch.addmm(code_sq, rows, codes.t(), beta=1.0, alpha=-2.0,
                                   out=block[: rows.shape[0]])
                torch.argmin(dist, dim=1, out=indices[r0 : r0 + row_chunk])
                continue
            best = torch.full((rows.shape[0],), float("inf"), device=z.device)
            best_idx = torch.zeros(rows.shape[0], dtype=torch.long, device=z.device)
            for c0 in range(0, k, code_chunk):
                part = codes[c0 : c0 + code_chunk]
                dist = torch.addmm(code_sq[c0 : c0 + code_chunk], rows, part.t(), alpha=-2.0,
                                   out=block[: rows.shape[0], : part.shape[0]])
                val, idx = dist.min(dim=1)
                better = val < best  # strict: ties keep the lower index, as argmin does
                best = torch.where(better, val, best)
                best_idx = torch.where(better, idx + c0, best_idx)
            indices[r0 : r0 + row_chunk] = best_idx
    return indices


#: glibc maps a request above its largest mmap threshold afresh and unmaps it when freed
#: (also under ``heap.keep_freed_memory``, which fixes the threshold at that value).
_ALWAYS_MAPPED_BYTES = MMAP_THRESHOLD + 2**20


def scratch(shape: tuple[int, ...], like: torch.Tensor, mapped: bool) -> torch.Tensor:
    """An uninitialised temporary shaped ``shape``, of ``like``'s dtype and device.

    ``mapped`` (CPU): cut from a mapping of at least 33 MiB, which glibc makes afresh and
    unmaps on free, so the pages go back the moment the temporary dies (only the pages
    written count in RSS). Allocated the ordinary way, a z-sized temporary comes from glibc's
    heap once its mmap threshold has risen past that size, and a freed heap block is not
    reused by the next request of the same size (torch asks for 64-byte aligned blocks, a few
    bytes more): residual VQ's stages, each freeing and asking for the same sizes, piled up
    dead heap. Mapping costs a page fault per page written, ~8 % of a plain vq step at
    K = 512, so only residual VQ asks for it.
    """
    numel = math.prod(shape)
    if not mapped or like.device.type != "cpu" or numel * like.element_size() < 2**20:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    room = max(numel, _ALWAYS_MAPPED_BYTES // like.element_size())
    return torch.empty(room, dtype=like.dtype)[:numel].view(shape)


def _layout(z: torch.Tensor) -> torch.memory_format:
    """channels_last when ``z`` is stored that way (the GPU path), else the default layout."""
    if not z.is_contiguous() and z.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _gather_like(codebook: torch.Tensor, indices: torch.Tensor, z: torch.Tensor,
                 mapped: bool = False) -> torch.Tensor:
    """``codebook[indices]`` as a (B, D, H, W) tensor stored like ``z``, in one gather.

    For channels_last ``z`` the rows of an embedding gather are already in place. For the
    default layout, gathering columns of the transposed codebook gives (D, B, H*W), and
    reordering whole H*W runs is far cheaper than transposing (N, D) element by element.
    """
    b, d, h, w = z.shape
    if _layout(z) == torch.channels_last:
        return codebook.index_select(0, indices).view(b, h, w, d).permute(0, 3, 1, 2)
    by_column = scratch((d, codebook.shape[0]), codebook, mapped).copy_(codebook.t())
    columns = scratch((d, indices.numel()), codebook, mapped)
    torch.index_select(by_column, 1, indices, out=columns)  # (D, N)
    return columns.view(d, b, h * w).transpose(0, 1).contiguous().view(b, d, h, w)


class _StraightThrough(torch.autograd.Function):
    """Codes for ``indices``, straight through to ``z``, and the squared-error losses, fused.

    Returns ``q = codebook[indices]`` laid out like ``z`` (the value of the straight-through
    estimator ``z + sg(q - z)``; its gradient goes to ``z`` unchanged) and ``mean((q - z)^2)``
    twice: as the commitment loss, whose gradient goes to ``z`` only, and as the codebook
    loss, whose gradient goes to the codebook rows ``indices`` only, as through an embedding
    gather. The maths of ``F.mse_loss`` and ``F.embedding`` under autograd, with one
    difference tensor for both terms, no element-wise transposes, and the losses in float32
    at least. ``flat`` is ``z`` as (N, D) rows, already made for the nearest-code search.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, z: torch.Tensor, flat: torch.Tensor, codebook: torch.Tensor,
        indices: torch.Tensor, mapped: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with torch.autocast(device_type=z.device.type, enabled=False):
            codes = codebook.detach()
            out = _gather_like(codes, indices, z, mapped).to(z.dtype)
            wide = out.element_size() < 4  # fp16/bf16: the losses in fp32
            diff = out.float() - z.detach().float() if wide else out - z.detach()
            per_element = diff.permute(0, 2, 3, 1) if _layout(z) == torch.channels_last else diff
            per_element = per_element.reshape(-1)
            loss = torch.dot(per_element, per_element) / per_element.numel()
            code_sums = None
            if ctx.needs_input_grad[2]:
                # sum over the vectors assigned to each code of (q - z), for the codebook grad
                rows = codes.index_select(0, indices).to(diff.dtype)
                code_sums = torch.zeros(codes.shape, dtype=diff.dtype, device=diff.device)
                code_sums.index_add_(0, indices, rows.sub_(flat.to(diff.dtype)))
        ctx.save_for_backward(diff, code_sums)
        ctx.z_dtype = z.dtype
        return out, loss, loss.clone()

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_out: torch.Tensor, grad_commitment: torch.Tensor,
        grad_codebook: torch.Tensor,
    ) -> tuple[torch.Tensor | None, None, torch.Tensor | None, None, None]:
        diff, code_sums = ctx.saved_tensors
        grad_z = grad_rows = None
        if ctx.needs_input_grad[0]:
            # d/dz mean((z - q)^2) = 2 (z - q) / n = -2 diff / n
            scale = grad_commitment.to(diff.dtype) * (-2.0 / diff.numel())
            grad_z = torch.addcmul(grad_out.to(diff.dtype), diff, scale).to(ctx.z_dtype)
        if ctx.needs_input_grad[2]:
            # d/de_k mean((q - z)^2) = 2 sum_{i -> k} (e_k - z_i) / n
            grad_rows = code_sums * (grad_codebook.to(diff.dtype) * (2.0 / diff.numel()))
        return grad_z, None, grad_rows, None, None


def squared_distances(vectors: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Full (N, K) matrix of squared L2 distances; for inspection and tests, not the hot path."""
    z, e = vectors.float(), codebook.float()
    return (z * z).sum(1, keepdim=True) + (e * e).sum(1) - 2 * z @ e.t()


def _kmeans_plus_plus(vectors: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: each new centre drawn with probability ~ squared distance to the
    nearest chosen one, so seeds spread over the data instead of piling into one cluster."""
    n = vectors.shape[0]
    first = int(torch.randint(0, n, (1,), generator=generator))
    chosen = [first]
    nearest_sq = ((vectors - vectors[first]) ** 2).sum(dim=1)
    for _ in range(k - 1):
        weights = nearest_sq.clamp_min(0).double().cpu()
        if float(weights.sum()) <= 0:  # fewer distinct points than codes
            weights = torch.ones(n, dtype=torch.float64)
        pick = int(torch.multinomial(weights, 1, generator=generator))
        chosen.append(pick)
        nearest_sq = torch.minimum(nearest_sq, ((vectors - vectors[pick]) ** 2).sum(dim=1))
    return vectors[torch.tensor(chosen, device=vectors.device)].clone()


def kmeans(vectors: torch.Tensor, k: int, iters: int, generator: torch.Generator) -> torch.Tensor:
    """Lloyd's k-means from k-means++ seeds; a centre left empty keeps its seed."""
    centres = _kmeans_plus_plus(vectors, k, generator)
    for _ in range(iters):
        assign = nearest_code(vectors, centres)
        sums = torch.zeros_like(centres).index_add_(0, assign, vectors)
        counts = torch.bincount(assign, minlength=k).to(vectors.dtype)
        filled = counts > 0
        centres[filled] = sums[filled] / counts[filled, None]
    return centres


class VectorQuantizer(nn.Module):
    """Maps each D-vector of a (B, D, H, W) map to its nearest of K learned codes.

    ``ema=True`` learns the codebook by exponential moving averages of the assigned encoder
    outputs (VQ-VAE paper, appendix A.1) instead of the codebook loss. ``kmeans_init`` fits
    the codebook to the first training batch, and ``restart_after`` re-seeds codes unused for
    that many training steps from the encoder outputs it serves worst (``_restart_dead_codes``):
    both keep the whole codebook in use.

    ``embedding_dim`` is the width of the vectors it takes and gives; ``code_dim`` that of
    the codebook (``codebook_dim``, or ``embedding_dim`` when there are no projections).
    """

    depth = 1  # one index per vector (see ResidualVectorQuantizer for more)
    #: temporaries the size of z from their own mappings (``scratch``); residual VQ sets it
    mapped_temporaries = False

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        beta: float = 0.25,
        ema: bool = True,
        decay: float = 0.99,
        eps: float = 1e-5,
        kmeans_init: bool = True,
        kmeans_iters: int = 10,
        restart_after: int = 100,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        seed: int = 0,
        codebook_dim: int | None = None,
        l2_normalize: bool = False,
        rotation_trick: bool = False,
    ) -> None:
        super().__init__()
        if num_embeddings < 1 or embedding_dim < 1 or (codebook_dim is not None
                                                       and codebook_dim < 1):
            raise ValueError("num_embeddings, embedding_dim and codebook_dim must be positive")
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.code_dim = codebook_dim or embedding_dim
        self.l2_normalize = l2_normalize
        self.rotation_trick = rotation_trick
        # Factorized codes: 1x1 convs to and from the codebook width (absent by default, so
        # the default model's parameters and state_dict keys stay those of the lecture's).
        self.in_project: nn.Conv2d | None = None
        self.out_project: nn.Conv2d | None = None
        if codebook_dim is not None:
            self.in_project = nn.Conv2d(embedding_dim, codebook_dim, 1)
            self.out_project = nn.Conv2d(codebook_dim, embedding_dim, 1)
        self.beta = beta
        self.ema = ema
        self.decay = decay
        self.eps = eps
        self.kmeans_iters = kmeans_iters
        self.restart_after = restart_after
        self.chunk_bytes = chunk_bytes
        self.generator = torch.Generator().manual_seed(seed)

        init = torch.empty(num_embeddings, self.code_dim).uniform_(
            -1 / num_embeddings, 1 / num_embeddings, generator=self.generator
        )
        if l2_normalize:
            init = F.normalize(init, dim=1)
        if ema:
            # The codebook is state, not a parameter: no optimizer may move it.
            self.register_buffer("embedding", init)
            # Count 1 and sum = code make the EMA state agree with the initial codebook.
            self.register_buffer("ema_count", torch.ones(num_embeddings))
            self.register_buffer("ema_sum", init.clone())
        else:
            self.embedding = nn.Parameter(init)
        self.register_buffer("initialized", torch.tensor(not kmeans_init))
        self.register_buffer("steps_unused", torch.zeros(num_embeddings, dtype=torch.long))
        self.register_buffer("usage_counts", torch.zeros(num_embeddings, dtype=torch.long))

    @property
    def codebook(self) -> torch.Tensor:
        """The stored codes (K, code_dim): a buffer with EMA, else the parameter."""
        return self.embedding

    @property
    def codebook_size(self) -> int:
        return self.num_embeddings

    def generators(self) -> list[torch.Generator]:
        """The random streams a resumed run must restore (k-means seeds, restart picks)."""
        return [self.generator]

    def codes(self) -> torch.Tensor:
        """The codes the search uses: the codebook, made unit length with ``l2_normalize``
        (a parameter codebook is normalised on use, so its gradient sees the normalisation)."""
        return F.normalize(self.embedding, dim=1) if self.l2_normalize else self.embedding

    def to_code_space(self, z: torch.Tensor) -> torch.Tensor:
        """(B, D, H, W) -> (B, code_dim, H, W): the in-projection, then unit length if asked;
        ``z`` itself by default."""
        if self.in_project is not None:
            z = self.in_project(z)
        if self.l2_normalize:
            z = F.normalize(z, dim=1)
        return z

    def from_code_space(self, q: torch.Tensor) -> torch.Tensor:
        """(B, code_dim, H, W) -> (B, D, H, W): the out-projection; ``q`` itself by default."""
        return q if self.out_project is None else self.out_project(q)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Codes for an index grid (B, H, W) -> (B, D, H, W), via a gather (embedding lookup)."""
        return self.from_code_space(
            F.embedding(indices, self.codes()).permute(0, 3, 1, 2).contiguous())

    def _check_width(self, z: torch.Tensor) -> None:
        if z.shape[1] != self.embedding_dim:
            raise ValueError(f"expected {self.embedding_dim} channels, got {z.shape[1]}")

    @torch.no_grad()
    def encode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, D, H, W) -> (B, H, W) int64 nearest-code indices; no state changes."""
        self._check_width(z)
        b, _, h, w = z.shape
        z = self.to_code_space(z)
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        return nearest_code(flat, self.codes(), self.chunk_bytes).view(b, h, w)

    def passthrough(self, z: torch.Tensor) -> QuantizerOutput:
        """The training warm-up: ``z`` (through the projections, if any) without quantizing
        or learning and with zero losses; the indices are still the nearest codes."""
        self._check_width(z)
        b, _, h, w = z.shape
        zero = torch.zeros((), device=z.device)
        low = self.to_code_space(z)
        flat = low.detach().permute(0, 2, 3, 1).reshape(-1, low.shape[1])
        indices = nearest_code(flat, self.codes(), self.chunk_bytes)
        return QuantizerOutput(self.from_code_space(low), indices.view(b, h, w), zero, zero,
                               zero)

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        self._check_width(z)
        b, _, h, w = z.shape
        z = self.to_code_space(z)
        if self.mapped_temporaries and _layout(z) == torch.contiguous_format:
            flat = scratch((b * h * w, z.shape[1]), z, mapped=True)
            flat.view(b, h, w, z.shape[1]).copy_(z.detach().permute(0, 2, 3, 1))
        else:
            flat = z.detach().permute(0, 2, 3, 1).reshape(-1, z.shape[1])  # a view if chan.-last
        learning = self.training and torch.is_grad_enabled()
        if learning and not bool(self.initialized):
            self._kmeans_init(flat.float())
        indices = nearest_code(flat, self.codes(), self.chunk_bytes)
        if learning:
            self._learn(flat.float(), indices)

        out, commitment, codebook_loss = _StraightThrough.apply(z, flat, self.codes(), indices,
                                                                self.mapped_temporaries)
        if self.rotation_trick:  # the same value, the gradient through the rotation instead
            out = rotate_onto(z, out.detach())
        if self.ema:  # the codebook follows the EMA, not a loss
            codebook_loss = torch.zeros((), device=z.device, dtype=commitment.dtype)
        return QuantizerOutput(
            quantized=self.from_code_space(out),
            indices=indices.view(b, h, w),
            loss=codebook_loss + self.beta * commitment,
            codebook_loss=codebook_loss,
            commitment_loss=commitment,
        )

    @torch.no_grad()
    def _learn(self, flat: torch.Tensor, indices: torch.Tensor) -> None:
        """Usage counts, EMA and restarts from this step's assignments, summed over all ranks
        under DDP so every rank's codebook stays identical."""
        counts = torch.bincount(indices, minlength=self.num_embeddings)
        dist.all_reduce_sum_(counts)
        self.usage_counts += counts
        if self.ema:
            sums = scratch(tuple(self.ema_sum.shape), self.ema_sum,
                           self.mapped_temporaries).zero_()
            sums.index_add_(0, indices, flat)
            self._ema_update(dist.all_reduce_sum_(sums), counts)
        self._restart_dead_codes(flat, indices, counts)

    @torch.no_grad()
    def _kmeans_init(self, flat: torch.Tensor) -> None:
        """k-means on this batch; under DDP rank 0's centres go to every rank."""
        centres = kmeans(flat, self.num_embeddings, self.kmeans_iters, self.generator)
        if self.l2_normalize:
            centres = F.normalize(centres, dim=1)
        dist.broadcast_(centres)
        self.embedding.data.copy_(centres)
        if self.ema:
            self.ema_sum.copy_(centres)
            self.ema_count.fill_(1.0)
        self.initialized.fill_(True)

    @torch.no_grad()
    def _ema_update(self, sums: torch.Tensor, counts: torch.Tensor) -> None:
        """N <- g N + (1-g) n;  m <- g m + (1-g) sum z;  e = m / N~ (Laplace-smoothed N)."""
        self.ema_count.mul_(self.decay).add_(counts.float(), alpha=1 - self.decay)
        self.ema_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        total = self.ema_count.sum()
        smoothed = (self.ema_count + self.eps) / (total + self.num_embeddings * self.eps) * total
        torch.div(self.ema_sum, smoothed[:, None], out=self.embedding)  # no K x D temporary
        if self.l2_normalize:
            self.embedding.copy_(F.normalize(self.embedding, dim=1))

    @torch.no_grad()
    def _restart_dead_codes(self, flat: torch.Tensor, indices: torch.Tensor,
                            counts: torch.Tensor) -> None:
        """Re-seed codes unused for ``restart_after`` steps with this step's encoder outputs,
        drawn without replacement with probability ~ their squared distance to their code
        (k-means++'s rule; under DDP: rank 0's picks, broadcast).

        So a restart lands where the codebook serves the data worst, never twice on one
        vector, and never on a vector its code sits on exactly. Uniform picks do both: on MNIST the
        background gives thousands of identical vectors, a code restarted onto one of them
        never wins and dies again, and with K = 16,384 most restarts were wasted that way
        (usage 91 % against 99 % with this, benchmarks/quantizers.py). At most one code per
        such vector a step, the longest unused first; the rest wait for the next steps.
        """
        self.steps_unused.add_(1).masked_fill_(counts > 0, 0)
        if self.restart_after <= 0:
            return
        dead = (self.steps_unused >= self.restart_after).nonzero().flatten()
        if dead.numel() == 0:
            return
        error = None
        if dist.rank() == 0:
            error = (flat - self.codes()[indices].float()).pow_(2).sum(1).double().cpu()
            count = torch.tensor([min(dead.numel(), int((error > 0).sum()))])
        else:
            count = torch.zeros(1, dtype=torch.long)
        count = int(dist.broadcast_(count.to(flat.device))[0])
        if count == 0:
            return
        # the longest unused first, then by index
        longest = torch.sort(self.steps_unused[dead], descending=True, stable=True).indices
        dead = dead[longest[:count]]
        if error is not None:
            pick = torch.multinomial(error, count, replacement=False, generator=self.generator)
            fresh = flat[pick.to(flat.device)].to(self.embedding.dtype).contiguous()
        else:
            fresh = torch.empty(count, flat.shape[1], dtype=self.embedding.dtype,
                                device=flat.device)
        fresh = dist.broadcast_(fresh)
        self.embedding.data[dead] = fresh
        if self.ema:
            self.ema_sum[dead] = fresh
            self.ema_count[dead] = 1.0
        self.steps_unused[dead] = 0

    def reset_usage(self) -> None:
        self.usage_counts.zero_()
