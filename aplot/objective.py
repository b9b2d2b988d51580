"""The APLOT objective: cost matrix, Sinkhorn transport plan, per-pair margins and the loss.

For a batch of B triplets (x_i, y_i+, y_i-) with rewards r+_i, r-_j and the hidden states h+_i,
h-_j that the score head reads (Li et al., EMNLP 2025, arXiv 2510.10963):

    S[i,j] = cos(h+_i, h-_j)                   semantic cost (similar = hard)
    R[i,j] = 1 - sigmoid(|r+_i - r-_j|)        reward cost   (close   = hard)
    C      = gamma * S + (1 - gamma) * R
    P      = argmin_{P in U(1/B, 1/B)} <P, C> - epsilon * H(P)     (log-domain Sinkhorn)
    m_i    = scale * B * sum_j P[i,j] C[i,j]   row-wise transport cost
    loss   = -mean_i log sigmoid(r+_i - r-_i - stopgrad(m_i))

Every baseline of the paper shares `preference_loss`; only the margin differs (`LOSS_TYPES`).
"""

from __future__ import annotations

import numpy as np
import ot
import torch
import torch.nn.functional as F

LOSS_TYPES = ("bt", "margin", "label_smoothing", "point", "aplot")


def cost_matrix(chosen_rewards, rejected_rewards, chosen_hidden, rejected_hidden, gamma=0.1):
    """C[i,j] = gamma * cos(h+_i, h-_j) + (1 - gamma) * (1 - sigmoid(|r+_i - r-_j|))."""
    semantic = F.normalize(chosen_hidden, dim=-1) @ F.normalize(rejected_hidden, dim=-1).T
    reward = 1 - torch.sigmoid((chosen_rewards[:, None] - rejected_rewards[None, :]).abs())
    return gamma * semantic + (1 - gamma) * reward


def transport_plan(cost, epsilon=0.1, n_iters=50):
    """Entropic OT plan with uniform marginals, on the cost's device: n_iters Sinkhorn iterations,
    a plain exp-domain loop on CPU where that is exact, POT's log-domain solver otherwise."""
    b = cost.shape[0]
    if cost.device.type == "cpu":
        c = cost.numpy()
        if (c.max() - c.min()) / epsilon < 50:
            # Exp-domain iterations equal the log-domain ones while exp(-C/epsilon) stays far from
            # under/overflow in float64. Written out rather than POT's `method="sinkhorn"`: on a batch
            # of 16 POT's per-iteration checks cost several times the arithmetic (0.9 ms against
            # 0.14 ms, the `sinkhorn_solve_ms` rows of benchmarks/RESULTS.md), a few % of a step.
            kernel = np.exp(-c / epsilon)
            marginal = np.full(b, 1.0 / b)
            u, v = np.ones(b), np.ones(b)
            for _ in range(n_iters):
                u = marginal / (kernel @ v)
                v = marginal / (kernel.T @ u)
            return torch.from_numpy(u[:, None] * kernel * v[None, :])
    marginal = torch.full((b,), 1.0 / b, dtype=cost.dtype, device=cost.device)
    # stopThr=0 runs exactly n_iters iterations, as the method specifies; the "did not converge"
    # warning that follows is expected, hence warn=False.
    return ot.sinkhorn(marginal, marginal, cost, epsilon, method="sinkhorn_log", numItermax=n_iters,
                       stopThr=0, warn=False)


@torch.no_grad()
def ot_margin(chosen_rewards, rejected_rewards, chosen_hidden, rejected_hidden, *,
              gamma=0.1, epsilon=0.1, n_iters=50, scale=1.0):
    """APLOT's adaptive margin m_i = scale * B * sum_j P[i,j] C[i,j]; no gradient flows through it.

    Solved in float64 (cheap at batch sizes, and keeps the plan finite down to epsilon = 1e-3 with
    rewards of +-1e4); returned in the rewards' dtype on their device.
    """
    cost = cost_matrix(chosen_rewards.double(), rejected_rewards.double(),
                       chosen_hidden.double(), rejected_hidden.double(), gamma)
    plan = transport_plan(cost, epsilon, n_iters)
    return (scale * cost.shape[0] * (plan * cost).sum(dim=1)).to(chosen_rewards.dtype)


@torch.no_grad()
def point_margin(chosen_rewards, rejected_rewards, chosen_hidden, rejected_hidden, *,
                 gamma=0.1, scale=1.0):
    """The "PointMargin" baseline: each pair's own cost C[i,i], no transport."""
    cost = cost_matrix(chosen_rewards.double(), rejected_rewards.double(),
                       chosen_hidden.double(), rejected_hidden.double(), gamma)
    return (scale * cost.diagonal()).to(chosen_rewards.dtype)


def preference_loss(chosen_rewards, rejected_rewards, margin=None, label_smoothing=0.0):
    """-(1 - a) log s(d) - a log s(-d) with d = r+ - r- - margin (a = 0: Bradley-Terry)."""
    d = chosen_rewards - rejected_rewards
    if margin is not None:
        d = d - margin
    loss = -F.logsigmoid(d)
    if label_smoothing:
        loss = (1 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-d)
    return loss.mean()
