"""Document 000's 6-token PPO walkthrough ("Manual Numerical Walkthrough", steps 0-7), recomputed by hand here.

The expected numbers are computed in this file with plain Python loops over the document's inputs, then compared
with the printed ones where the document is right. Where it is not: step 4 claims no ratio leaves [0.8, 1.2], but
ρ_3 = e^0.2 = 1.2214 > 1.2 with A_3 > 0, so the clipped surrogate differs from −mean(ρA): −0.4821, not −0.484.
"""

import math

import torch

from gae import compute_gae
from ppo import clipped_surrogate_loss, policy_diagnostics, ppo_loss, value_loss

REWARDS = [0.0, 0.0, 0.0, 0.0, 0.0, 1.2]
OLD_LOGP = [-1.20, -0.80, -1.10, -0.90, -1.30, -1.00]
NEW_LOGP = [-1.05, -0.95, -1.15, -0.70, -1.35, -0.85]
VALUES = [0.62, 0.71, 0.55, 0.68, 0.74, 0.80]
GAMMA, LAM, EPS = 1.0, 0.95, 0.2


def hand_computation():
    """The walkthrough with Python floats: independent of the code under test."""
    v_next = VALUES[1:] + [0.0]
    deltas = [r + GAMMA * vn - v for r, vn, v in zip(REWARDS, v_next, VALUES)]
    adv, running = [0.0] * 6, 0.0
    for t in range(5, -1, -1):
        running = deltas[t] + GAMMA * LAM * running
        adv[t] = running
    returns = [a + v for a, v in zip(adv, VALUES)]
    ratio = [math.exp(n - o) for n, o in zip(NEW_LOGP, OLD_LOGP)]
    clipped_obj = [min(r * a, min(max(r, 1 - EPS), 1 + EPS) * a) for r, a in zip(ratio, adv)]
    policy_loss = -sum(clipped_obj) / 6
    v_loss = sum((v - R) ** 2 for v, R in zip(VALUES, returns)) / 6
    return deltas, adv, returns, ratio, policy_loss, v_loss


def t(x):
    return torch.tensor([x], dtype=torch.float64)  # (1, 6)


def test_document_printed_numbers_where_they_hold():
    deltas, adv, returns, ratio, _, v_loss = hand_computation()
    # Step 2, 3, 4, 6 as printed in document 000 (3 decimals)
    assert [round(d, 2) for d in deltas] == [0.09, -0.16, 0.13, 0.06, 0.06, 0.40]
    assert [round(a, 3) for a in adv] == [0.465, 0.395, 0.584, 0.478, 0.440, 0.400]
    assert [round(r, 3) for r in returns] == [1.085, 1.105, 1.134, 1.158, 1.180, 1.200]
    assert [round(r, 3) for r in ratio] == [1.162, 0.861, 0.951, 1.221, 0.951, 1.162]
    assert round(v_loss, 3) == 0.216
    # ... and the erratum: the unclipped mean the document prints (−0.484) is not the clipped loss
    assert round(-sum(r * a for r, a in zip(ratio, adv)) / 6, 3) == -0.484
    assert ratio[3] > 1 + EPS and adv[3] > 0


def test_gae_matches_walkthrough():
    deltas, adv, returns, *_ = hand_computation()
    A, R = compute_gae(t(REWARDS), t(VALUES), gamma=GAMMA, lam=LAM)
    torch.testing.assert_close(A, t(adv))
    torch.testing.assert_close(R, t(returns))


def test_losses_match_walkthrough_with_clip_active():
    _, adv, returns, _, policy_loss, v_loss = hand_computation()
    pg = clipped_surrogate_loss(t(NEW_LOGP), t(OLD_LOGP), t(adv), eps=EPS).mean()
    assert abs(pg.item() - policy_loss) < 1e-12
    assert round(pg.item(), 4) == -0.4821  # the math; document 000 step 5 prints −0.484
    vl = value_loss(t(VALUES), t(returns)).mean()
    assert abs(vl.item() - v_loss) < 1e-12
    loss = ppo_loss(pg, vl, torch.tensor(0.0, dtype=torch.float64), vf_coef=0.5, ent_coef=0.0)  # c_v = 0.5, no H
    assert abs(loss.item() - (policy_loss + 0.5 * v_loss)) < 1e-12
    assert round(loss.item(), 4) == -0.3742  # document 000 step 7 prints −0.376 (unclipped)
    diagnostics = policy_diagnostics(t(NEW_LOGP), t(OLD_LOGP), t(adv), torch.ones(1, 6), (EPS, EPS))
    assert abs(diagnostics["clipfrac"].item() - 1 / 6) < 1e-12  # exactly token 3 is clipped
