"""The rotation trick (Fifty et al. 2024, "Restructuring Vector Quantization with the
Rotation Trick"): a gradient estimator for vector quantization instead of straight-through.

Straight-through hands the decoder's gradient to the encoder output ``e`` unchanged, whatever
the angle between ``e`` and its code ``q``. The rotation trick writes ``q`` as ``e`` rotated
and rescaled onto it, ``q = s R e`` with ``s = ||q|| / ||e||`` and

    R = I - 2 r r^T + 2 q_hat e_hat^T,   r = (e_hat + q_hat) / ||e_hat + q_hat||,

and treats ``s`` and ``R`` as constants, so the gradient reaching ``e`` is ``s R^T g``:
vectors inside one code's region get gradients rotated by their angle to the code.
"""

from __future__ import annotations

from typing import Any

import torch

#: Norms below this count as zero: such a vector falls back to straight-through (R = I,
#: s = 1) instead of a rescale by 1/||e|| that would blow its gradient up.
TINY_NORM = 1e-6


def _dot(a: torch.Tensor, b: torch.Tensor, dim: int) -> torch.Tensor:
    return (a * b).sum(dim, keepdim=True)


class _Rotate(torch.autograd.Function):
    """Value ``q``; backward ``s R^T g``, in float32 at least, without forming R.

    With the Householder form, ``R^T g = g - 2 r (r.g) + 2 e_hat (q_hat.g)``, and writing
    ``r = (e/|e| + q/|q|) / |e_hat + q_hat|`` this is ``g + a e + b q`` with per-vector
    scalars a and b, so only per-vector numbers are kept between forward and backward
    (|e|, |q|, |e_hat + q_hat| from ``e.q``), not three more tensors the size of ``e``.
    """

    @staticmethod
    def forward(ctx: Any, e: torch.Tensor, q: torch.Tensor,  # type: ignore[override]
                dim: int) -> torch.Tensor:
        work = torch.promote_types(e.dtype, torch.float32)  # fp32 at least
        ef, qf = e.detach().to(work), q.detach().to(work)
        e_norm = _dot(ef, ef, dim).sqrt_()
        q_norm = _dot(qf, qf, dim).sqrt_().clamp_min_(TINY_NORM)
        live = e_norm > TINY_NORM
        e_norm.clamp_min_(TINY_NORM)
        cosine = _dot(ef, qf, dim) / (e_norm * q_norm)
        r_norm = (2 + 2 * cosine).clamp_min_(0).sqrt_().clamp_min_(TINY_NORM)
        ctx.save_for_backward(ef, qf, e_norm, q_norm, r_norm, live)
        ctx.dim, ctx.e_dtype = dim, e.dtype
        return q.view_as(q)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor  # type: ignore[override]
                 ) -> tuple[torch.Tensor, None, None]:
        ef, qf, e_norm, q_norm, r_norm, live = ctx.saved_tensors
        g = grad.to(ef.dtype)
        eg, qg = _dot(ef, g, ctx.dim), _dot(qf, g, ctx.dim)
        rg = (eg / e_norm + qg / q_norm) / r_norm  # r.g
        # R^T g = g - 2 (r.g) (e/|e| + q/|q|) / |r~| + 2 (q.g / |q|) e / |e|
        a = (2 * qg / q_norm - 2 * rg / r_norm) / e_norm
        b = -2 * rg / (r_norm * q_norm)
        scale = q_norm / e_norm
        a, b, scale = (torch.where(live, x, fill) for x, fill in ((a, 0.0), (b, 0.0),
                                                                   (scale, 1.0)))
        out = torch.addcmul(torch.addcmul(g, ef, a), qf, b).mul_(scale)
        return out.to(ctx.e_dtype), None, None


def rotate_onto(e: torch.Tensor, q: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """``q`` as a value (exactly); the gradient to ``e`` goes through ``s R e`` with s and R
    held constant. ``e`` and ``q`` have the same shape, vectors along ``dim``; ``q`` gets no
    gradient (a code is moved by its EMA or its codebook loss, not through here)."""
    return _Rotate.apply(e, q.detach(), dim)
