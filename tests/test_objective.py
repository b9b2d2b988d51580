"""The APLOT objective against an independent Sinkhorn, and its numerics at the edges."""

import math

import pytest
import torch
import torch.nn.functional as F

import aplot
from aplot.objective import cost_matrix, point_margin, preference_loss

pytestmark = pytest.mark.core


def reference_margin(rc, rr, hc, hr, gamma, epsilon, n_iters, scale):
    """The method as written in APLOT_METHOD.md, with a plain log-domain Sinkhorn in float64."""
    rc, rr, hc, hr = (t.double() for t in (rc, rr, hc, hr))
    b = rc.shape[0]
    cos = torch.stack([torch.stack([F.cosine_similarity(hc[i], hr[j], dim=0) for j in range(b)])
                       for i in range(b)])
    c = gamma * cos + (1 - gamma) * (1 - torch.sigmoid((rc[:, None] - rr[None, :]).abs()))
    log_a = torch.full((b,), -math.log(b), dtype=torch.float64)
    f, g = torch.zeros(b, dtype=torch.float64), torch.zeros(b, dtype=torch.float64)
    for _ in range(n_iters):
        f = epsilon * (log_a - torch.logsumexp((g[None, :] - c) / epsilon, dim=1))
        g = epsilon * (log_a - torch.logsumexp((f[:, None] - c) / epsilon, dim=0))
    plan = torch.exp((f[:, None] + g[None, :] - c) / epsilon)
    return scale * b * (plan * c).sum(1)


def batch(b, d=32, seed=0, spread=1.0):
    gen = torch.Generator().manual_seed(seed)
    return (spread * torch.randn(b, generator=gen), spread * torch.randn(b, generator=gen),
            torch.randn(b, d, generator=gen), torch.randn(b, d, generator=gen))


@pytest.mark.parametrize("b,gamma,epsilon,n_iters,scale", [
    (16, 0.1, 0.1, 50, 1.0), (8, 0.5, 0.05, 20, 2.0), (32, 0.9, 0.5, 100, 1.0), (5, 0.0, 0.1, 50, 1.0),
    (7, 1.0, 0.2, 10, 0.5), (12, 0.1, 0.01, 50, 1.0),  # the last one takes the log-domain path
])
def test_ot_margin_matches_independent_sinkhorn(b, gamma, epsilon, n_iters, scale):
    rc, rr, hc, hr = batch(b, seed=b)
    got = aplot.ot_margin(rc, rr, hc, hr, gamma=gamma, epsilon=epsilon, n_iters=n_iters, scale=scale)
    want = reference_margin(rc, rr, hc, hr, gamma, epsilon, n_iters, scale)
    assert got.shape == (b,)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)


def test_margin_is_a_weighted_average_of_its_cost_row():
    rc, rr, hc, hr = batch(12, seed=3)
    c = cost_matrix(rc.double(), rr.double(), hc.double(), hr.double(), 0.1)
    m = aplot.ot_margin(rc, rr, hc, hr).double()
    assert (m >= c.min(1).values - 1e-6).all() and (m <= c.max(1).values + 1e-6).all()


@pytest.mark.parametrize("case", ["huge_rewards", "tiny_epsilon", "batch_of_one", "identical_hidden",
                                  "zero_hidden", "all_equal"])
def test_ot_margin_is_finite_at_the_edges(case):
    rc, rr, hc, hr = batch(16, seed=1)
    kwargs = {}
    if case == "huge_rewards":
        rc, rr = rc.sign() * 1e4, -rr.sign() * 1e4
    elif case == "tiny_epsilon":
        kwargs["epsilon"] = 1e-3
    elif case == "batch_of_one":
        rc, rr, hc, hr = rc[:1], rr[:1], hc[:1], hr[:1]
    elif case == "identical_hidden":
        hr = hc.clone()
    elif case == "zero_hidden":
        hc, hr = torch.zeros_like(hc), torch.zeros_like(hr)
    elif case == "all_equal":
        rc, rr, hc, hr = torch.ones(16), torch.ones(16), torch.ones(16, 32), torch.ones(16, 32)
    for epsilon in (kwargs.get("epsilon", 0.1),):
        m = aplot.ot_margin(rc, rr, hc, hr, epsilon=epsilon)
        assert torch.isfinite(m).all(), case
        assert m.shape == rc.shape


def test_huge_reward_gaps_leave_only_the_semantic_cost():
    rc, rr, hc, hr = batch(8, seed=2)
    m = aplot.ot_margin(torch.full((8,), 1e4), torch.full((8,), -1e4), hc, hr, gamma=0.0, epsilon=1e-3)
    torch.testing.assert_close(m, torch.zeros(8), atol=1e-6, rtol=0)


def test_batch_of_one_is_the_pair_cost():
    rc, rr, hc, hr = batch(1, seed=4)
    expected = 0.3 * F.cosine_similarity(hc, hr) + 0.7 * (1 - torch.sigmoid((rc - rr).abs()))
    torch.testing.assert_close(aplot.ot_margin(rc, rr, hc, hr, gamma=0.3), expected, atol=1e-6, rtol=0)


def test_no_gradient_flows_through_the_margin_and_dtype_is_kept():
    rc, rr, hc, hr = (t.requires_grad_() for t in batch(6, seed=5))
    m = aplot.ot_margin(rc, rr, hc, hr)
    assert not m.requires_grad and m.dtype == torch.float32 and m.device == rc.device
    m16 = aplot.ot_margin(rc.detach().bfloat16(), rr.detach().bfloat16(), hc.detach(), hr.detach())
    assert m16.dtype == torch.bfloat16 and torch.isfinite(m16.float()).all()


def test_closer_rewards_get_larger_margins():
    hc = hr = torch.zeros(1, 4)  # no semantic signal: only the reward cost
    close = aplot.ot_margin(torch.tensor([0.1]), torch.tensor([0.0]), hc, hr, gamma=0.0)
    far = aplot.ot_margin(torch.tensor([3.0]), torch.tensor([0.0]), hc, hr, gamma=0.0)
    assert close.item() > far.item()
    torch.testing.assert_close(close, 1 - torch.sigmoid(torch.tensor([0.1])), atol=1e-6, rtol=0)


def test_point_margin_is_the_scaled_diagonal_of_the_cost():
    rc, rr, hc, hr = batch(10, seed=6)
    c = cost_matrix(rc, rr, hc, hr, 0.4)
    torch.testing.assert_close(point_margin(rc, rr, hc, hr, gamma=0.4, scale=2.0), 2.0 * c.diagonal(),
                               atol=1e-6, rtol=0)


def test_preference_loss_formulas():
    rc, rr = torch.tensor([1.0, 0.2, -0.5]), torch.tensor([0.0, 0.4, -1.0])
    d = rc - rr
    torch.testing.assert_close(preference_loss(rc, rr), -F.logsigmoid(d).mean())
    m = torch.tensor([0.3, 0.1, 0.2])
    torch.testing.assert_close(preference_loss(rc, rr, m), -F.logsigmoid(d - m).mean())
    a = 0.2
    torch.testing.assert_close(preference_loss(rc, rr, label_smoothing=a),
                               (-(1 - a) * F.logsigmoid(d) - a * F.logsigmoid(-d)).mean())


def test_margin_raises_the_loss_on_every_pair():
    rc, rr = torch.randn(20), torch.randn(20)
    assert preference_loss(rc, rr, torch.full((20,), 0.5)) > preference_loss(rc, rr)
