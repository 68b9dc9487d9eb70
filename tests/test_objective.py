"""The preference objective against paper eq. 5 computed from Gaussian log-likelihoods."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal

from img_lightning.objective import preference_objective


def _log_lik(x: torch.Tensor, mean: torch.Tensor, sigma: float) -> torch.Tensor:
    """log N(x; mean, sigma^2 I), summed over each sample's elements."""
    return Normal(mean, sigma).log_prob(x).flatten(1).sum(1)


def eq5_from_likelihoods(pred, ref, win, lose, sigma: float, eta: float = 1.0, mu: float = 1.0):
    """Paper eq. 5: DPO on (c_w, c_l) plus SPIN with f_ref(c) as the self-generated sample,
    both as log-likelihood ratios of f_theta against f_ref, under -log sigmoid."""

    def r(x):  # log p_theta(x|c) - log p_ref(x|c)
        return _log_lik(x, pred, sigma) - _log_lik(x, ref, sigma)

    dpo = r(win) - r(lose)
    spin = r(win) - r(ref)
    return -F.logsigmoid(eta * dpo + mu * spin).mean()


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    shape = (5, 4, 6)
    win, lose = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    pred = lose + 0.3 * torch.randn(shape, generator=g)
    ref = lose + 0.3 * torch.randn(shape, generator=g)
    return pred, ref, win, lose


@pytest.mark.parametrize("sigma", [0.7, 1.0, 3.0])
def test_sum_reduction_equals_eq5_gaussian_likelihoods(batch, sigma):
    pred, ref, win, lose = batch
    beta = 1.0 / (2 * sigma**2)
    out = preference_objective(pred, ref, win, lose, beta=beta, reduction="sum")
    expected = eq5_from_likelihoods(pred, ref, win, lose, sigma)
    torch.testing.assert_close(out["pref"], expected, rtol=1e-5, atol=1e-6)


def test_mean_reduction_is_sum_with_beta_over_numel(batch):
    pred, ref, win, lose = batch
    numel = pred[0].numel()
    sigma = 0.2
    out = preference_objective(pred, ref, win, lose, beta=numel / (2 * sigma**2), reduction="mean")
    torch.testing.assert_close(out["pref"], eq5_from_likelihoods(pred, ref, win, lose, sigma), rtol=1e-5, atol=1e-6)


def test_base_loss_total_and_diagnostics(batch):
    pred, ref, win, lose = batch
    out = preference_objective(pred, ref, win, lose, lambda_pref=0.5, beta=2.0, reduction="mean")
    base = ((win - pred) ** 2).mean(dim=(1, 2)).mean()
    torch.testing.assert_close(out["base"], base)
    torch.testing.assert_close(out["loss"], base + 0.5 * out["pref"])
    closer = ((win - pred) ** 2).sum(dim=(1, 2)) < ((lose - pred) ** 2).sum(dim=(1, 2))
    assert out["closer_to_winner"].item() == pytest.approx(closer.float().mean().item())
    # Diffusion-DPO's implicit accuracy: the policy's log-likelihood ratio over the reference is
    # larger for the winner than for the loser
    def sq(a, b):
        return ((a - b) ** 2).mean(dim=(1, 2))

    favoured = (sq(win, ref) - sq(win, pred)) > (sq(lose, ref) - sq(lose, pred))
    assert out["implicit_acc"].item() == pytest.approx(favoured.float().mean().item())
    assert 0 < out["implicit_acc"].item() < 1 and out["implicit_acc"].item() != out["closer_to_winner"].item()


def test_identical_policies_give_log2_and_gradient_only_through_pred(batch):
    _, _, win, lose = batch
    pred = lose.clone().requires_grad_(True)
    ref = lose.clone().requires_grad_(True)
    out = preference_objective(pred, ref, win, lose, reduction="sum")
    assert out["pref"].item() == pytest.approx(math.log(2.0))
    out["loss"].backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0
    assert ref.grad is None


def test_pref_loss_falls_when_pred_moves_towards_winner(batch):
    _, ref, win, lose = batch
    worse = preference_objective(lose.clone(), ref, win, lose)["pref"]
    better = preference_objective(0.5 * (lose + win), ref, win, lose)["pref"]
    assert better < worse


def test_bad_reduction_is_rejected(batch):
    with pytest.raises(ValueError, match="reduction"):
        preference_objective(*batch, reduction="median")
