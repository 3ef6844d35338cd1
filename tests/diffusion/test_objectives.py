"""diffusion_loss and min-SNR-γ weights against float64 hand computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from unetkit.diffusion.objectives import diffusion_loss, min_snr_weights
from unetkit.diffusion.schedules import NoiseSchedule
from unetkit.errors import ConfigError


class Recorder(nn.Module):
    """out = w · x_t (+ 0.01 · label); remembers its inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.5))
        self.calls: list[tuple] = []

    def forward(self, x, t, context=None, class_labels=None):
        self.calls.append((x.detach().clone(), t.clone(), context, class_labels))
        out = self.w * x
        if class_labels is not None:
            out = out + 0.01 * class_labels.view(-1, *([1] * (x.ndim - 1))).to(x)
        return out


def _alphas_cumprod_linear(start: float, end: float, n: int = 1000) -> np.ndarray:
    return np.cumprod(1.0 - np.linspace(start, end, n))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("gamma", [None, 5.0])
def test_loss_matches_float64_hand_computation(prediction_type, gamma):
    s = NoiseSchedule(
        beta_schedule="linear", beta_start=1e-4, beta_end=0.02, prediction_type=prediction_type
    )
    ab = _alphas_cumprod_linear(1e-4, 0.02)
    x0 = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    eps = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    t = torch.tensor([0, 50, 400, 999])
    model = Recorder().double()
    loss = diffusion_loss(model, x0, None, s, timesteps=t, noise=eps, min_snr_gamma=gamma)

    a = ab[t.numpy()].reshape(-1, 1, 1, 1)
    x0n, en = x0.numpy(), eps.numpy()
    xt = np.sqrt(a) * x0n + np.sqrt(1 - a) * en
    target = {"epsilon": en, "v_prediction": np.sqrt(a) * en - np.sqrt(1 - a) * x0n, "sample": x0n}[
        prediction_type
    ]
    per_sample = ((0.5 * xt - target) ** 2).reshape(4, -1).mean(axis=1)
    snr = ab[t.numpy()] / (1 - ab[t.numpy()])
    if gamma is None:
        w = np.ones(4)
    else:
        w = (
            np.minimum(snr, gamma)
            / {"epsilon": snr, "v_prediction": snr + 1, "sample": np.ones(4)}[prediction_type]
        )
    assert loss.item() == pytest.approx(float((w * per_sample).mean()), rel=1e-6)
    np.testing.assert_allclose(model.calls[0][0].numpy(), xt, rtol=1e-12, atol=1e-12)
    assert model.calls[0][1].tolist() == t.tolist()
    loss.backward()
    assert model.w.grad is not None and model.w.grad.abs() > 0


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_min_snr_weights_against_float64(prediction_type):
    gamma = 5.0
    s = NoiseSchedule(prediction_type=prediction_type)  # scaled_linear
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    ab = np.cumprod(1 - betas)
    t = torch.arange(0, 1000, 37)
    snr = ab[t.numpy()] / (1 - ab[t.numpy()])
    clipped = np.minimum(snr, gamma)
    want = {"epsilon": clipped / snr, "v_prediction": clipped / (snr + 1), "sample": clipped}
    got = min_snr_weights(s, t, gamma)
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), want[prediction_type], rtol=1e-11)
    if prediction_type == "epsilon":  # weight 1 wherever SNR <= γ (the noisy half)
        assert bool((got[torch.from_numpy(snr <= gamma)] == 1).all())
        assert bool((got < 1).any())


def test_random_draws_follow_the_generator():
    s = NoiseSchedule()
    x0 = torch.randn(3, 1, 4, 4)
    model = Recorder()
    a = diffusion_loss(model, x0, None, s, generator=torch.Generator().manual_seed(3))
    b = diffusion_loss(model, x0, None, s, generator=torch.Generator().manual_seed(3))
    c = diffusion_loss(model, x0, None, s, generator=torch.Generator().manual_seed(4))
    assert a.item() == b.item() != c.item()
    # documented draw order: t first, then ε
    g = torch.Generator().manual_seed(3)
    t = torch.randint(0, 1000, (3,), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    torch.testing.assert_close(model.calls[0][1], t)
    torch.testing.assert_close(model.calls[0][0], s.add_noise(x0, eps, t))


def test_context_and_class_labels_reach_the_model():
    s = NoiseSchedule()
    model = Recorder()
    ctx = torch.randn(2, 5, 8)
    labels = torch.tensor([1, 7])
    diffusion_loss(model, torch.randn(2, 1, 4, 4), ctx, s, class_labels=labels)
    assert model.calls[0][2] is ctx and model.calls[0][3] is labels

    def three_args(x, t, c):  # models without class_labels are called with 3 arguments
        return torch.zeros_like(x)

    assert diffusion_loss(three_args, torch.randn(2, 1, 4, 4), ctx, s).item() > 0


def test_zero_model_has_unit_loss_for_epsilon_target():
    s = NoiseSchedule()
    loss = diffusion_loss(
        lambda x, t, c: torch.zeros_like(x),
        torch.randn(64, 1, 16, 16),
        None,
        s,
        generator=torch.Generator().manual_seed(0),
    )
    assert loss.item() == pytest.approx(1.0, abs=0.02)  # E[ε²] = 1


def test_errors():
    s = NoiseSchedule()
    x0 = torch.randn(2, 1, 4, 4)
    with pytest.raises(ConfigError, match="out_channels"):
        diffusion_loss(lambda x, t, c: x[:, :0], x0, None, s)
    with pytest.raises(ConfigError, match="min_snr_gamma"):
        diffusion_loss(lambda x, t, c: x, x0, None, s, min_snr_gamma=0.0)
    with pytest.raises(ConfigError, match="timesteps has 3"):
        diffusion_loss(lambda x, t, c: x, x0, None, s, timesteps=torch.tensor([1, 2, 3]))
    with pytest.raises(ConfigError, match="noise shape"):
        diffusion_loss(lambda x, t, c: x, x0, None, s, noise=torch.zeros(2, 1, 4, 5))
