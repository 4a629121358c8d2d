"""The objective: Min-SNR weights follow the paper, the prior loss uses the class half of the batch."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from dreambooth_trainer.objective import dreambooth_loss, min_snr_weights, snr, step_generator, target_for

pytestmark = pytest.mark.unit


def _scheduler(kind: str) -> DDPMScheduler:
    return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=kind)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_min_snr_weights_match_the_paper(kind: str) -> None:
    sched = _scheduler(kind)
    t = torch.tensor([0, 10, 100, 500, 999])
    alpha_bar = sched.alphas_cumprod[t].double()
    ratio = alpha_bar / (1 - alpha_bar)
    gamma = 5.0
    # Hang et al. 2023: w = min(SNR, gamma) / SNR for epsilon, min(SNR, gamma) / (SNR + 1) for v.
    expected = [min(float(s), gamma) / (float(s) + (1.0 if kind == "v_prediction" else 0.0)) for s in ratio]
    got = min_snr_weights(snr(sched, t), gamma, kind)
    assert torch.allclose(got.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5)
    assert got[0] < 1.0 and got[-1] <= 1.0 + 1e-6  # high-SNR (early) steps are down-weighted


def test_prior_loss_uses_the_class_half_and_its_weight() -> None:
    sched = _scheduler("epsilon")
    pred = torch.zeros(4, 4, 2, 2)
    target = torch.cat([torch.full((2, 4, 2, 2), 1.0), torch.full((2, 4, 2, 2), 3.0)])  # instance 1s, class 3s
    t = torch.tensor([1, 2, 3, 4])
    parts = dreambooth_loss(pred, target, t, sched, with_prior_preservation=True, prior_loss_weight=0.5, snr_gamma=None)
    assert parts.instance_loss.item() == pytest.approx(1.0)
    assert parts.prior_loss.item() == pytest.approx(9.0)
    assert parts.loss.item() == pytest.approx(1.0 + 0.5 * 9.0)


def test_v_prediction_target_is_the_velocity() -> None:
    sched = _scheduler("v_prediction")
    latents, noise, t = torch.randn(2, 4, 2, 2), torch.randn(2, 4, 2, 2), torch.tensor([10, 900])
    a = sched.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
    s = (1 - sched.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
    assert torch.allclose(target_for(sched, latents, noise, t), a * noise - s * latents, atol=1e-6)
    assert torch.equal(target_for(_scheduler("epsilon"), latents, noise, t), noise)


def test_step_randomness_depends_only_on_position() -> None:
    a = torch.randn(3, generator=step_generator(1, 2, 3, 0))
    torch.manual_seed(123)  # global RNG state must not matter
    assert torch.equal(a, torch.randn(3, generator=step_generator(1, 2, 3, 0)))
    assert not torch.equal(a, torch.randn(3, generator=step_generator(1, 2, 4, 0)))
    assert not torch.equal(a, torch.randn(3, generator=step_generator(1, 2, 3, 1)))
