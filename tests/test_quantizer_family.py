"""The quantizer family: fsq rounding and indices, rvq stages, the rotation trick, cosine
search, factorized codes, each kind inside the VQVAE, its checkpoints and its config errors."""

import json
import math

import numpy as np
import pytest
import torch
from vqtok.tokenizer import load_tokenizer, save_checkpoint, train
from vqtok.tokenizer.checkpoint import build_model
from vqtok.tokenizer.config import ConfigError, parse_config
from vqtok.tokenizer.quantizers import (
    FiniteScalarQuantizer,
    ResidualVectorQuantizer,
    VectorQuantizer,
    build_quantizer,
    nearest_code,
    squared_distances,
)
from vqtok.tokenizer.quantizers.vq import scratch
from vqtok.tokenizer.stats import level_histograms
from vqtok.tokenizer.usage import usage_report

from tests.conftest import TINY

# --- fsq -----------------------------------------------------------------------------------

# levels [3, 4]: index = d0 + 3 d1, code0 = d0 - 1 (in {-1, 0, 1}), code1 = (d1 - 2) / 2
# (in {-1, -0.5, 0, 0.5}); dimension 0 is the least significant digit.
FSQ_3_4 = [(-1, -1), (0, -1), (1, -1),
           (-1, -0.5), (0, -0.5), (1, -0.5),
           (-1, 0), (0, 0), (1, 0),
           (-1, 0.5), (0, 0.5), (1, 0.5)]


def test_fsq_codes_and_indices_of_levels_3_4_by_hand():
    fsq = FiniteScalarQuantizer([3, 4])
    table = torch.tensor(FSQ_3_4)
    assert fsq.codebook_size == 12 and fsq.embedding_dim == 2 and fsq.depth == 1
    assert torch.equal(fsq.indices_to_codes(torch.arange(12)), table)
    assert torch.equal(fsq.codes_to_indices(table), torch.arange(12))
    assert torch.equal(fsq.codebook, table)
    grid = torch.tensor([[[3, 11], [0, 7]]])  # (1, 2, 2) -> (1, 2, 2, 2) codes
    assert torch.equal(fsq.lookup(grid).permute(0, 2, 3, 1), table[grid])


def test_fsq_bounds_with_tanh_and_rounds_to_each_dimensions_levels():
    """Odd L = 3: half_l = 3 * 0.999 / 2 = 1.4985, z_b = tanh(z) * 1.4985. Even L = 4:
    half_l = 1.998, offset 0.5, shift = atanh(0.5 / 1.998), z_b = tanh(z + shift) * 1.998
    - 0.5 (z = 0 -> 0)."""
    fsq = FiniteScalarQuantizer([3, 4])
    shift = math.atanh(0.5 / 1.998)
    z = torch.tensor([[0.5, 0.0], [1.0, 1.0], [-2.0, -3.0], [9.0, 9.0]])
    expected = [[math.tanh(a) * 1.4985, math.tanh(b + shift) * 1.998 - 0.5] for a, b in z.tolist()]
    bounded = fsq.bound(z[:, :, None, None])[:, :, 0, 0]
    assert torch.allclose(bounded, torch.tensor(expected), atol=1e-6)
    assert bounded[0, 1].abs() < 1e-6  # the shift puts 0 on 0 for even L
    # z_b (.692, 0) (1.141, 1.198) (-1.445, -2.481) (1.4985, 1.498), rounded (1, 0) (1, 1)
    # (-1, -2) (1, 1) -> codes (1, 0) (1, .5) (-1, -1) (1, .5); digits + (1, 2), 3 per digit 1
    out = fsq(z[:, :, None, None])
    assert torch.equal(out.quantized[:, :, 0, 0],
                       torch.tensor([[1, 0], [1, 0.5], [-1, -1], [1, 0.5]]))
    assert out.indices.flatten().tolist() == [8, 11, 0, 11]
    assert float(out.loss) == 0 and float(out.commitment_loss) == 0


def test_fsq_with_two_levels_splits_at_zero():
    """L = 2: half_l = 0.999, offset 0.5 and no shift: z_b = tanh(z) * 0.999 - 0.5, so
    z < 0 rounds to -1 (code -1) and z > 0 to 0 (code 0)."""
    fsq = FiniteScalarQuantizer([2])
    out = fsq(torch.tensor([-3.0, -0.1, 0.1, 3.0]).view(1, 1, 1, 4))
    assert out.quantized.flatten().tolist() == [-1, -1, 0, 0]
    assert out.indices.flatten().tolist() == [0, 0, 1, 1]


@pytest.mark.parametrize("levels", [5, 8])
def test_every_fsq_level_rounds_from_an_equal_share_of_tanhs_range(levels):
    """tanh(z + shift) spread evenly over (-1, 1) lands on each of the L levels 1/L of the
    time (the outer two 0.1 % less, for eps), where the paper's half_l = (L - 1) / 2 would
    give the outer levels 1 / (2 (L - 1)) each: 1/8 instead of 1/5 for L = 5."""
    fsq = FiniteScalarQuantizer([levels])
    n = 100_000
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n * 2 - 1  # midpoints of (-1, 1)
    z = torch.atanh(u) - fsq._shift.double()
    counts = torch.bincount(fsq.encode(z.float().view(1, 1, 1, n)).flatten(), minlength=levels)
    share = counts.double() / n
    assert torch.allclose(share, torch.full((levels,), 1 / levels, dtype=torch.float64),
                          atol=0.001)


@pytest.mark.parametrize("levels", [[3, 4], [8, 5, 5, 5], [2, 7, 6]])
def test_every_fsq_index_maps_back_to_itself(levels):
    fsq = FiniteScalarQuantizer(levels)
    k = math.prod(levels)
    every = torch.arange(k)
    assert torch.equal(fsq.codes_to_indices(fsq.indices_to_codes(every)), every)
    # and through the quantizer: an input bounded near each code's integer encodes to it
    lv = torch.tensor(levels, dtype=torch.float64)
    half_l, offset = lv * (1 - 1e-3) / 2, torch.where(lv % 2 == 0, 0.5, 0.0)
    rounded = fsq.indices_to_codes(every).double() * (lv // 2)
    # inside the open bounded range (-half_l - offset, half_l - offset), rounding the same
    target = torch.maximum(torch.minimum(rounded, half_l - offset - 0.1), -half_l - offset + 0.1)
    shift = torch.where(lv > 2, torch.atanh(offset / half_l), 0.0)  # L = 2: no shift
    z = torch.atanh((target + offset) / half_l) - shift
    z = z.float().t().reshape(1, len(levels), 1, k)
    assert torch.equal(fsq.encode(z).flatten(), every)
    out = fsq(z)
    assert torch.equal(out.indices.flatten(), every)
    assert torch.equal(out.quantized, fsq.lookup(out.indices))


def test_fsq_rounds_straight_through():
    fsq = FiniteScalarQuantizer([5])
    z = torch.tensor([0.3, -1.2]).view(1, 1, 1, 2).requires_grad_(True)
    fsq(z).quantized.sum().backward()
    # d/dz tanh(z) * half_l / half_width, half_l = 5 * 0.999 / 2, half_width 2
    expected = (1 - torch.tanh(z.detach()) ** 2) * (5 * 0.999 / 2) / 2
    assert torch.allclose(z.grad, expected, atol=1e-6)


# --- rvq -----------------------------------------------------------------------------------


def _toy_rvq() -> ResidualVectorQuantizer:
    rvq = ResidualVectorQuantizer(5, 2, depth=2, ema=False, kmeans_init=False).eval()
    with torch.no_grad():
        rvq.stages[0].embedding.copy_(torch.tensor([[0, 0], [4, 0], [0, 4], [-4, 0], [0, -4.]]))
        rvq.stages[1].embedding.copy_(torch.tensor([[0, 0], [1, 0], [0, 1], [-1, 0], [0, -1.]]))
    return rvq


def test_rvq_stages_code_the_residuals_and_sum_to_the_output():
    rvq = _toy_rvq()
    # (3.7, .6): stage 0 -> (4, 0), residual (-.3, .6) -> (0, 1): 0.25 beats (0, 0)'s 0.45
    # (.2, 3.1): stage 0 -> (0, 4), residual (.2, -.9) -> (0, -1): 0.05
    # (-1.4, -.2): stage 0 -> (0, 0) (2.0 vs 6.8), residual itself -> (-1, 0): 0.2
    z = torch.tensor([[3.7, 0.6], [0.2, 3.1], [-1.4, -0.2]]).t().reshape(1, 2, 1, 3)
    out = rvq(z)
    assert out.indices.shape == (1, 1, 3, 2)
    assert out.indices[0, 0].tolist() == [[1, 2], [2, 4], [0, 3]]
    assert torch.equal(out.quantized[0, :, 0].t(), torch.tensor([[4, 1], [0, 3], [-1, 0.]]))
    first = rvq.stages[0](z)
    second = rvq.stages[1](z - first.quantized)
    assert torch.equal(out.quantized, first.quantized + second.quantized)
    # every stage's codebook loss, and one commitment: z against the whole stack's codes
    assert torch.allclose(out.commitment_loss, ((z - out.quantized) ** 2).mean())
    assert torch.allclose(out.loss, first.codebook_loss + second.codebook_loss
                          + 0.25 * out.commitment_loss)
    for stage, residual, level in ((0, z, 0), (1, z - first.quantized, 1)):
        flat = residual[0, :, 0].t()
        argmin = squared_distances(flat, rvq.stages[stage].embedding).argmin(1)
        assert torch.equal(out.indices[0, 0, :, level], argmin)
    assert torch.equal(rvq.encode(z), out.indices)
    assert torch.equal(rvq.lookup(out.indices), out.quantized)


def test_rvq_commits_the_encoder_to_the_sum_of_the_stages():
    """d loss / d z is beta * 2 (z - total) / n: the pull towards the whole stack's code, not
    towards each stage's partial sum."""
    rvq = _toy_rvq()
    z = torch.tensor([[3.7, 0.6], [0.2, 3.1], [-1.4, -0.2]]).t().reshape(1, 2, 1, 3)
    z.requires_grad_()
    out = rvq(z)
    (grad,) = torch.autograd.grad(out.loss, z)
    total = torch.tensor([[4, 1], [0, 3], [-1, 0.]]).t().reshape(1, 2, 1, 3)
    assert torch.allclose(grad, 0.25 * 2 * (z.detach() - total) / z.numel())


def test_rvq_stages_learn_on_their_own_residuals():
    torch.manual_seed(0)
    rvq = ResidualVectorQuantizer(8, 3, depth=2, kmeans_iters=2).train()
    z = torch.randn(4, 3, 4, 4)
    rvq(z)
    first = rvq.stages[0]
    assert bool(first.initialized) and bool(rvq.stages[1].initialized)
    residual = z - first.lookup(first.encode(z))
    # stage 1's k-means centres came from the residuals: much smaller than z itself
    assert rvq.stages[1].embedding.norm(dim=1).mean() < first.embedding.norm(dim=1).mean()
    assert float(residual.norm(dim=1).mean()) < float(z.norm(dim=1).mean())
    assert len(rvq.generators()) == 2


@pytest.mark.parametrize("options", [{}, {"ema": False, "codebook_dim": 8}])
def test_rvq_temporaries_from_their_own_mappings_change_no_value(options):
    """Residual VQ's stages take z-sized temporaries from mappings of their own (so glibc
    gives the pages back on free): forward values, indices, gradients and the learned state
    equal the ordinary allocations' bit for bit. z here is 1 MiB, big enough to be mapped."""
    runs = []
    for mapped in (True, False):
        torch.manual_seed(0)
        rvq = ResidualVectorQuantizer(64, 64, depth=3, **options).train()
        assert all(stage.mapped_temporaries for stage in rvq.stages)
        for stage in rvq.stages:
            stage.mapped_temporaries = mapped
        outputs = []
        for step in range(2):
            z = torch.randn(64, 64, 8, 8, generator=torch.Generator().manual_seed(step))
            z.requires_grad_()
            out = rvq(z)
            (out.quantized.square().mean() + out.loss).backward()
            outputs += [out.quantized.detach(), out.indices, z.grad]
        runs.append((outputs, rvq.state_dict()))
    (mapped_out, mapped_state), (plain_out, plain_state) = runs
    assert all(torch.equal(a, b) for a, b in zip(mapped_out, plain_out, strict=True))
    assert all(torch.equal(mapped_state[k], plain_state[k]) for k in plain_state)
    assert VectorQuantizer(8, 2).mapped_temporaries is False  # plain vq: ordinary allocations
    big = scratch((512, 1024), torch.zeros(1), mapped=True)
    assert big.shape == (512, 1024) and big.is_contiguous()
    assert big.untyped_storage().nbytes() >= 33 * 2**20  # over glibc's largest threshold


# --- vq options ----------------------------------------------------------------------------


def _two_codes(codes, **options) -> VectorQuantizer:
    q = VectorQuantizer(len(codes), len(codes[0]), ema=False, kmeans_init=False, **options)
    with torch.no_grad():
        q.embedding.copy_(torch.tensor(codes, dtype=torch.float32))
    return q


def test_rotation_trick_keeps_the_value_and_rotates_the_gradient():
    """e = (1.2, 1.6), |e| = 2, nearest code q = (1, 0) (2.6 against 7.2): the gradient is
    s R^T g with s = |q| / |e| = 1/2 and R = I - 2 r r^T + 2 q_hat e_hat^T."""
    q = _two_codes([[1.0, 0.0], [0.0, 4.0]], rotation_trick=True, beta=0.0)
    e = torch.tensor([1.2, 1.6]).view(1, 2, 1, 1).requires_grad_(True)
    out = q(e)
    assert out.indices.item() == 0
    assert torch.equal(out.quantized.flatten(), torch.tensor([1.0, 0.0]))
    g = torch.tensor([0.3, -0.7])
    (out.quantized.flatten() * g).sum().backward()

    e_vec, q_vec = torch.tensor([1.2, 1.6], dtype=torch.float64), torch.tensor([1.0, 0.0],
                                                                              dtype=torch.float64)
    e_hat, q_hat = e_vec / e_vec.norm(), q_vec / q_vec.norm()
    r = (e_hat + q_hat) / (e_hat + q_hat).norm()
    rot = torch.eye(2, dtype=torch.float64) - 2 * torch.outer(r, r) + 2 * torch.outer(q_hat, e_hat)
    assert torch.allclose(0.5 * rot @ e_vec, q_vec)  # s R e = q
    expected = 0.5 * rot.t() @ g.double()
    assert torch.allclose(e.grad.flatten().double(), expected, atol=1e-6)
    assert not torch.allclose(e.grad.flatten(), g)  # not straight-through


def test_rotation_trick_gradient_equals_autograd_through_the_explicit_rotation():
    """In 7-D, on a (B, D, H, W) layout: the hand-written backward (no R formed) against
    autograd through s R e with s and R built as matrices and held constant."""
    from vqtok.tokenizer.quantizers.rotation import rotate_onto

    gen = torch.Generator().manual_seed(0)
    e = torch.randn(2, 7, 3, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    q = torch.randn(2, 7, 3, 2, generator=gen, dtype=torch.float64)
    g = torch.randn(2, 7, 3, 2, generator=gen, dtype=torch.float64)
    out = rotate_onto(e, q, dim=1)
    assert torch.equal(out, q)
    (out * g).sum().backward()

    flat_e = e.detach().permute(0, 2, 3, 1).reshape(-1, 7).requires_grad_(True)
    flat_q = q.permute(0, 2, 3, 1).reshape(-1, 7)
    e_hat = (flat_e / flat_e.norm(dim=1, keepdim=True)).detach()
    q_hat = flat_q / flat_q.norm(dim=1, keepdim=True)
    r = (e_hat + q_hat) / (e_hat + q_hat).norm(dim=1, keepdim=True)
    rot = (torch.eye(7, dtype=torch.float64) - 2 * r[:, :, None] * r[:, None, :]
           + 2 * q_hat[:, :, None] * e_hat[:, None, :])
    scale = (flat_q.norm(dim=1) / flat_e.norm(dim=1)).detach()
    explicit = scale[:, None] * torch.einsum("nij,nj->ni", rot, flat_e)
    assert torch.allclose(explicit, flat_q)  # s R e = q
    (explicit * g.permute(0, 2, 3, 1).reshape(-1, 7)).sum().backward()
    expected = flat_e.grad.view(2, 3, 2, 7).permute(0, 3, 1, 2)
    assert torch.allclose(e.grad, expected, atol=1e-12)


def test_rotation_trick_off_is_straight_through():
    q = _two_codes([[1.0, 0.0], [0.0, 4.0]], beta=0.0)
    e = torch.tensor([1.2, 1.6]).view(1, 2, 1, 1).requires_grad_(True)
    g = torch.tensor([0.3, -0.7])
    (q(e).quantized.flatten() * g).sum().backward()
    assert torch.equal(e.grad.flatten(), g)


def test_cosine_search_picks_by_angle():
    """(0.5, 1): squared L2 1.25 to (1, 0) but 4.25 to (0, 3); its angle to (0, 3) is 27
    degrees, to (1, 0) 63."""
    v = torch.tensor([0.5, 1.0]).view(1, 2, 1, 1)
    codes = [[1.0, 0.0], [0.0, 3.0]]
    assert _two_codes(codes).eval()(v).indices.item() == 0
    cosine = _two_codes(codes, l2_normalize=True).eval()
    out = cosine(v)
    assert out.indices.item() == 1
    assert torch.allclose(out.quantized.flatten(), torch.tensor([0.0, 1.0]))  # a unit code


def test_cosine_ema_keeps_codes_unit_length():
    torch.manual_seed(0)
    q = VectorQuantizer(8, 3, l2_normalize=True, kmeans_iters=2, restart_after=1).train()
    for _ in range(3):
        q(torch.randn(2, 3, 4, 4) * 5)
    assert torch.allclose(q.embedding.norm(dim=1), torch.ones(8), atol=1e-5)


def test_codebook_dim_searches_codes_in_the_low_width():
    torch.manual_seed(0)
    q = VectorQuantizer(16, 8, codebook_dim=3, kmeans_iters=2).train()
    assert q.embedding.shape == (16, 3) and q.ema_sum.shape == (16, 3) and q.code_dim == 3
    assert (q.in_project.in_channels, q.in_project.out_channels) == (8, 3)
    assert (q.out_project.in_channels, q.out_project.out_channels) == (3, 8)
    z = torch.randn(2, 8, 4, 4, requires_grad=True)
    out = q(z)  # k-means, EMA and restarts, all in 3-D
    assert out.quantized.shape == z.shape
    out.loss.backward()
    assert q.in_project.weight.grad is not None
    q.eval()
    codes = q.encode(z)
    low = q.in_project(z.detach()).permute(0, 2, 3, 1).reshape(-1, 3)
    assert torch.equal(codes.flatten(), nearest_code(low, q.embedding))
    again = q(z)
    assert torch.equal(again.indices, codes)
    assert torch.allclose(q.lookup(codes), again.quantized, atol=1e-6)


def test_default_vq_has_no_projections_and_the_lectures_state():
    q = VectorQuantizer(16, 4)
    assert q.in_project is None and q.out_project is None
    assert sorted(q.state_dict()) == ["ema_count", "ema_sum", "embedding", "initialized",
                                      "steps_unused", "usage_counts"]


# --- every kind in the model ---------------------------------------------------------------

KINDS = {
    "vq": {},
    "vq-options": {"codebook_dim": 2, "l2_normalize": True, "rotation_trick": True},
    "fsq": {"kind": "fsq", "levels": [3, 4]},
    "fsq-linear": {"kind": "fsq", "levels": [3, 4], "fsq_mlp": False},
    "rvq": {"kind": "rvq", "depth": 3},
    "rvq-options": {"kind": "rvq", "depth": 2, "codebook_dim": 3, "rotation_trick": True,
                    "ema": False},
}


def _config(dataset: str = "npz:unused", **quantizer):
    raw = json.loads(json.dumps(TINY))
    raw["data"]["dataset"] = dataset
    raw["quantizer"].update(quantizer)
    if quantizer.get("kind") == "fsq":  # TINY's sizes are a vq's; fsq's follow its levels
        del raw["model"]["embedding_dim"], raw["model"]["num_embeddings"]
    return parse_config(raw)


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_trains_encodes_decodes_and_round_trips_a_checkpoint(kind, tmp_path):
    config = _config(**KINDS[kind])
    torch.manual_seed(0)
    model = build_model(config).train()
    x = torch.rand(6, 1, 8, 8)
    out = model(x)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.encoder.parameters())
    depth = config.quantizer.depth
    shape = (6, 2, 2) if depth == 1 else (6, 2, 2, depth)
    assert out.indices.shape == shape and model.depth == depth

    model.eval()
    codes = model.encode(x)
    assert codes.shape == shape and codes.dtype == torch.int64
    assert int(codes.min()) >= 0 and int(codes.max()) < model.num_embeddings
    forward = model(x)
    assert torch.equal(forward.indices, codes)
    assert torch.allclose(model.decode(codes), forward.reconstruction, atol=1e-6)
    assert torch.equal(model.decode(codes.to(torch.uint16)), model.decode(codes))

    save_checkpoint(tmp_path / "ck", model, config)
    loaded = load_tokenizer(tmp_path / "ck")
    assert type(loaded.quantizer) is type(model.quantizer)
    assert torch.equal(loaded.encode(x), codes)
    assert torch.equal(loaded.decode(codes), model.decode(codes))


def test_fsq_model_maps_the_encoder_to_len_levels_and_counts_prod_levels():
    """fsq_mlp (the default): an activation and a 1x1 conv into the grid, a 1x1 conv to the
    hidden width and an activation out of it; without: one 1x1 conv in, the decoder reads
    the codes."""
    model = build_model(_config(kind="fsq", levels=[3, 4]))
    pre, post = model.pre_quant, model.post_quant
    assert [type(m) for m in pre] == [torch.nn.LeakyReLU, torch.nn.Conv2d]
    assert (pre[1].in_channels, pre[1].out_channels, pre[1].kernel_size) == (4, 2, (1, 1))
    assert [type(m) for m in post] == [torch.nn.Conv2d, torch.nn.LeakyReLU]
    assert (post[0].in_channels, post[0].out_channels, post[0].kernel_size) == (2, 8, (1, 1))
    assert model.decoder[0].in_channels == 8  # TINY's hidden_channels
    assert model.num_embeddings == 12 and model.depth == 1
    assert not any(k.startswith("quantizer.") for k in model.state_dict())

    linear = build_model(_config(kind="fsq", levels=[3, 4], fsq_mlp=False))
    assert isinstance(linear.pre_quant, torch.nn.Conv2d)
    assert (linear.pre_quant.in_channels, linear.pre_quant.out_channels) == (4, 2)
    assert isinstance(linear.post_quant, torch.nn.Identity)
    assert linear.decoder[0].in_channels == 2


def test_decode_checks_shape_and_range_per_level():
    model = build_model(_config(kind="rvq", depth=2)).eval()
    with pytest.raises(ValueError, match=r"^codes must be \(B, h, w, 2\) for a depth-2 "
                                         r"quantizer; got shape \(1, 2, 2\)$"):
        model.decode(torch.zeros(1, 2, 2, dtype=torch.long))
    bad = torch.zeros(1, 2, 2, 2, dtype=torch.long)
    bad[0, 0, 0, 1] = 16
    with pytest.raises(ValueError, match=r"^codes of level 1 must lie in \[0, 16\); got "
                                         r"\[0, 16\]$"):
        model.decode(bad)
    flat = build_model(_config()).eval()
    with pytest.raises(ValueError, match=r"^codes must be \(B, h, w\); got shape"):
        flat.decode(torch.zeros(1, 2, 2, 2, dtype=torch.long))


@pytest.mark.parametrize("kind", ["fsq", "rvq"])
def test_training_loop_runs_and_resumes_for_each_kind(kind, tmp_path, tiny_npz):
    config = _config(f"npz:{tiny_npz}", **KINDS[kind])
    logs: list[str] = []
    two = config.with_overrides(**{"train.epochs": 2})
    straight = train(two, tmp_path / "a", progress=False, log=logs.append)
    train(config, tmp_path / "b", progress=False, log=lambda _: None)
    resumed = train(two, tmp_path / "b", progress=False, log=lambda _: None)
    assert resumed.weights_sha256 == straight.weights_sha256
    val = straight.validation
    assert 0 < val["usage"] <= 1 and val["perplexity"] >= 1
    if kind == "rvq":
        assert len(val["levels"]) == 3 and val["usage"] == val["levels"][0]["usage"]
        assert "(per level: usage " in logs[-1]
    else:
        assert "levels" not in val and "per level" not in logs[-1]


def test_usage_is_counted_per_level():
    codes = np.array([[[[0, 1], [0, 2]], [[3, 1], [0, 1]]]])  # (1, 2, 2, 2)
    counts = level_histograms(torch.from_numpy(codes), 4, depth=2)
    assert counts.tolist() == [[3, 0, 0, 1], [0, 3, 1, 0]]
    assert level_histograms(codes[..., 0], 4).tolist() == [[3, 0, 0, 1]]
    report = usage_report(codes, 4)
    assert report["depth"] == 2 and report["codes_used"] == 2 and report["images"] == 1
    assert [level["counts"] for level in report["levels"]] == counts.tolist()


# --- config --------------------------------------------------------------------------------


def test_fsq_sizes_follow_from_the_levels():
    config = parse_config({"quantizer": {"kind": "fsq"}})
    assert config.quantizer.levels == (8, 5, 5, 5)
    assert (config.model.embedding_dim, config.model.num_embeddings) == (4, 1000)
    again = config.with_overrides(**{"quantizer.levels": [3, 4]})
    assert (again.model.embedding_dim, again.model.num_embeddings) == (2, 12)
    assert config.quantizer.fsq_mlp and again.quantizer.fsq_mlp
    back = config.with_overrides(**{"quantizer.kind": "vq",
                                    "model.embedding_dim": 64, "model.num_embeddings": 512})
    assert back.quantizer.levels is None and back.quantizer.fsq_mlp is False
    assert parse_config({}).quantizer.fsq_mlp is False
    assert parse_config(config.model_dump()) == config  # what config.json stores reloads


@pytest.mark.parametrize("raw,message", [
    ({"quantizer": {"kind": "fsq"}, "model": {"embedding_dim": 64}},
     "config: model.embedding_dim 64 does not fit quantizer.levels [8, 5, 5, 5] (fsq: "
     "len(levels) = 4); leave model.embedding_dim out or set it to 4"),
    ({"quantizer": {"kind": "fsq", "levels": [3, 4]}, "model": {"num_embeddings": 16}},
     "config: model.num_embeddings 16 does not fit quantizer.levels [3, 4] (fsq: "
     "prod(levels) = 12); leave model.num_embeddings out or set it to 12"),
    ({"quantizer": {"levels": [3, 4]}},
     "config: section 'quantizer': levels apply to kind fsq only (kind is vq); remove them "
     "or set kind: fsq"),
    ({"quantizer": {"kind": "fsq", "depth": 2}},
     "config: section 'quantizer': depth 2 needs kind rvq (kind is fsq); remove depth or set "
     "kind: rvq"),
    ({"quantizer": {"depth": 3}},
     "config: section 'quantizer': depth 3 needs kind rvq (kind is vq); remove depth or set "
     "kind: rvq"),
    ({"quantizer": {"kind": "fsq", "codebook_dim": 2}},
     "config: section 'quantizer': codebook_dim applies to kinds vq and rvq, not fsq; remove it"),
    ({"quantizer": {"kind": "fsq", "l2_normalize": True}},
     "config: section 'quantizer': l2_normalize applies to kinds vq and rvq, not fsq; remove "
     "it"),
    ({"quantizer": {"kind": "fsq", "rotation_trick": True}},
     "config: section 'quantizer': rotation_trick applies to kinds vq and rvq, not fsq; "
     "remove it"),
    ({"quantizer": {"fsq_mlp": True}},
     "config: section 'quantizer': fsq_mlp applies to kind fsq only (kind is vq); remove it"),
    ({"quantizer": {"kind": "lfq"}},
     "config: key 'quantizer.kind': Input should be 'vq', 'fsq' or 'rvq' (got 'lfq')"),
])
def test_config_errors_are_one_line(raw, message):
    with pytest.raises(ConfigError) as caught:
        parse_config(raw)
    assert str(caught.value) == message


def test_build_quantizer_makes_each_kind():
    model = _config().model
    assert type(build_quantizer(_config().quantizer, model)) is VectorQuantizer
    rvq = build_quantizer(_config(kind="rvq", depth=2).quantizer, model)
    assert isinstance(rvq, ResidualVectorQuantizer) and rvq.depth == 2
    fsq_config = _config(kind="fsq", levels=[3, 4])
    fsq = build_quantizer(fsq_config.quantizer, fsq_config.model)
    assert isinstance(fsq, FiniteScalarQuantizer) and fsq.codebook_size == 12
    with pytest.raises(ValueError, match="fsq levels"):
        build_quantizer(fsq_config.quantizer, model)


def _saved_without(tmp_path, config, keys):
    """A trained-a-little model saved with ``keys`` left out of its stored quantizer
    config, as a vqtok from before those keys wrote it."""
    torch.manual_seed(0)
    model = build_model(config)
    model.train()(torch.rand(8, 1, 8, 8))
    save_checkpoint(tmp_path / "ck", model, config)
    meta_path = tmp_path / "ck" / "config.json"
    meta = json.loads(meta_path.read_text())
    for key in keys:
        del meta["config"]["quantizer"][key]
    meta_path.write_text(json.dumps(meta))
    return model.eval(), load_tokenizer(tmp_path / "ck")


def test_a_config_json_from_before_the_family_loads(tmp_path):
    model, loaded = _saved_without(tmp_path, _config(), (
        "kind", "codebook_dim", "l2_normalize", "rotation_trick", "levels", "depth", "fsq_mlp"))
    assert type(loaded.quantizer) is VectorQuantizer
    x = torch.rand(3, 1, 8, 8)
    assert torch.equal(loaded.encode(x), model.encode(x))


def test_an_fsq_checkpoint_from_before_fsq_mlp_loads_with_linear_projections(tmp_path):
    config = _config(kind="fsq", levels=[3, 4], fsq_mlp=False)
    model, loaded = _saved_without(tmp_path, config, ("fsq_mlp",))
    assert isinstance(loaded.post_quant, torch.nn.Identity)
    x = torch.rand(3, 1, 8, 8)
    codes = model.encode(x)
    assert torch.equal(loaded.encode(x), codes)
    assert torch.equal(loaded.decode(codes), model.decode(codes))
