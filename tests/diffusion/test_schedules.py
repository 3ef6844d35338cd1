"""NoiseSchedule: β/ᾱ tables against diffusers and float64 hand computations, the ε/v/x₀
conversions, and the JSON / diffusers-config round trips."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from unetkit.diffusion.schedules import NoiseSchedule
from unetkit.errors import ConfigError

SCHEDULES = {
    "linear": NoiseSchedule(beta_schedule="linear", beta_start=1e-4, beta_end=0.02),
    "scaled_linear": NoiseSchedule(),  # SD 1.x: 0.00085 .. 0.012
    "cosine": NoiseSchedule(beta_schedule="cosine"),
}


def _numpy_alphas_cumprod(s: NoiseSchedule) -> np.ndarray:
    """Independent float64 reference of ᾱ for the (scaled) linear tables."""
    if s.beta_schedule == "linear":
        betas = np.linspace(s.beta_start, s.beta_end, s.num_train_timesteps)
    else:
        betas = np.linspace(s.beta_start**0.5, s.beta_end**0.5, s.num_train_timesteps) ** 2
    return np.cumprod(1.0 - betas)


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_betas_and_alphas_cumprod_match_diffusers(name):
    diffusers = pytest.importorskip("diffusers")
    s = SCHEDULES[name]
    ref = diffusers.DDPMScheduler(**s.to_diffusers_config())
    assert s.betas.dtype == s.alphas_cumprod.dtype == torch.float64
    # diffusers builds the table in float32: agree to float32 precision
    torch.testing.assert_close(s.betas.float(), ref.betas, rtol=2e-6, atol=1e-9)
    torch.testing.assert_close(s.alphas_cumprod.float(), ref.alphas_cumprod, rtol=2e-5, atol=0)


@pytest.mark.parametrize("name", ["linear", "scaled_linear"])
def test_linear_tables_match_a_float64_reference(name):
    s = SCHEDULES[name]
    np.testing.assert_allclose(s.alphas_cumprod.numpy(), _numpy_alphas_cumprod(s), rtol=1e-13)


def test_cosine_schedule_matches_the_closed_form_of_nichol_and_dhariwal():
    big_t, off = 1000, 0.008
    s = NoiseSchedule(num_train_timesteps=big_t, beta_schedule="cosine")

    def f(u):
        return np.cos((u + off) / (1 + off) * np.pi / 2) ** 2

    u = np.arange(big_t + 1) / big_t
    betas = np.minimum(1 - f(u[1:]) / f(u[:-1]), 0.999)
    np.testing.assert_allclose(s.betas.numpy(), betas, rtol=1e-12, atol=0)
    # the product telescopes: ᾱ_t = f((t+1)/T) / f(0) wherever β was not capped
    capped = betas >= 0.999
    assert capped.sum() == 1 and capped[-1]  # only the very last step hits the cap
    expected = f(u[1:]) / f(0)
    np.testing.assert_allclose(s.alphas_cumprod.numpy()[:-1], expected[:-1], rtol=1e-10)
    assert s.alphas_cumprod[-1].item() == pytest.approx(expected[-2] * 0.001, rel=1e-10)
    assert s.betas[0].item() == pytest.approx(1 - f(1 / big_t) / f(0), rel=1e-12)


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_add_noise_and_velocity_match_diffusers(name):
    diffusers = pytest.importorskip("diffusers")
    s = SCHEDULES[name]
    ref = diffusers.DDPMScheduler(**s.to_diffusers_config())
    x0, eps = torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5)
    t = torch.tensor([0, 17, 500, 999])
    torch.testing.assert_close(
        s.add_noise(x0, eps, t), ref.add_noise(x0, eps, t), rtol=2e-5, atol=2e-6
    )
    torch.testing.assert_close(
        s.velocity(x0, eps, t), ref.get_velocity(x0, eps, t), rtol=2e-5, atol=2e-6
    )


def test_add_noise_float64_hand_computation_and_scalar_timestep():
    s = SCHEDULES["linear"]
    ab = _numpy_alphas_cumprod(s)
    x0, eps = torch.randn(2, 1, 3, 3, dtype=torch.float64), torch.randn(2, 1, 3, 3).double()
    t = torch.tensor([3, 700])
    out = s.add_noise(x0, eps, t)
    for i, ti in enumerate(t.tolist()):
        want = math.sqrt(ab[ti]) * x0[i] + math.sqrt(1 - ab[ti]) * eps[i]
        torch.testing.assert_close(out[i], want, rtol=1e-12, atol=1e-14)
    # a python int broadcasts over the batch
    torch.testing.assert_close(s.add_noise(x0, eps, 700)[1], out[1], rtol=0, atol=0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_predict_x0_and_eps_invert_the_target(prediction_type):
    s = NoiseSchedule(beta_schedule="cosine", prediction_type=prediction_type)
    x0 = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    eps = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    t = torch.tensor([1, 400, 990])
    xt = s.add_noise(x0, eps, t)
    out = s.target(x0, eps, t)  # what a perfect model outputs
    torch.testing.assert_close(s.predict_x0(out, xt, t), x0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(s.predict_eps(out, xt, t), eps, rtol=1e-9, atol=1e-9)


def test_velocity_definition():
    s = SCHEDULES["scaled_linear"]
    x0, eps = torch.randn(2, 1, 2, 2).double(), torch.randn(2, 1, 2, 2).double()
    ab = float(s.alphas_cumprod[250])
    v = s.velocity(x0, eps, 250)
    torch.testing.assert_close(v, math.sqrt(ab) * eps - math.sqrt(1 - ab) * x0)
    # v-prediction's target is v, ε-prediction's is ε
    v_sched = NoiseSchedule(prediction_type="v_prediction")
    torch.testing.assert_close(v_sched.target(x0, eps, 250), v)
    torch.testing.assert_close(s.target(x0, eps, 250), eps)


def test_snr_hand_computation():
    s = SCHEDULES["linear"]
    ab = _numpy_alphas_cumprod(s)
    t = torch.tensor([0, 10, 999])
    np.testing.assert_allclose(
        s.snr(t).numpy(), ab[[0, 10, 999]] / (1 - ab[[0, 10, 999]]), rtol=1e-12
    )
    assert s.snr(t).dtype == torch.float64
    assert bool((s.snr(torch.arange(1000)).diff() < 0).all())  # strictly decreasing


def test_dtype_and_device_follow_the_data():
    s = SCHEDULES["scaled_linear"]
    x = torch.randn(2, 1, 3, 3, dtype=torch.float16)
    assert s.add_noise(x, x, torch.tensor([1, 2])).dtype == torch.float16
    assert s.add_noise(x.double(), x.double(), 5).dtype == torch.float64


def test_json_round_trip_and_equality():
    for s in SCHEDULES.values():
        back = NoiseSchedule.from_dict(json.loads(json.dumps(s.to_dict())))
        assert back == s and hash(back) == hash(s)
        torch.testing.assert_close(back.alphas_cumprod, s.alphas_cumprod, rtol=0, atol=0)
    with pytest.raises(ConfigError, match="did you mean 'beta_schedule'"):
        NoiseSchedule.from_dict({"beta_schedul": "linear"})


def test_from_diffusers_config_reads_sd_scheduler_config():
    sd15 = {  # Stable Diffusion 1.5 scheduler/scheduler_config.json
        "_class_name": "PNDMScheduler",
        "_diffusers_version": "0.6.0",
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "num_train_timesteps": 1000,
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
        "trained_betas": None,
        "clip_sample": False,
    }
    assert NoiseSchedule.from_diffusers_config(sd15) == NoiseSchedule()
    cos = NoiseSchedule.from_diffusers_config(
        {"beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction"}
    )
    assert cos.beta_schedule == "cosine" and cos.prediction_type == "v_prediction"
    assert cos.to_diffusers_config()["beta_schedule"] == "squaredcos_cap_v2"
    with pytest.raises(ConfigError, match="trained_betas"):
        NoiseSchedule.from_diffusers_config({"trained_betas": [0.1, 0.2]})
    with pytest.raises(ConfigError, match="did you mean 'scaled_linear'"):
        NoiseSchedule.from_diffusers_config({"beta_schedule": "scaled_linaer"})


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"beta_schedule": "cosin"}, "did you mean 'cosine'"),
        ({"prediction_type": "v"}, "prediction_type"),
        ({"num_train_timesteps": 1}, "num_train_timesteps"),
        ({"beta_start": 0.02, "beta_end": 0.01}, "beta_start"),
    ],
)
def test_invalid_configs_are_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        NoiseSchedule(**kwargs)


def test_out_of_range_timesteps_are_rejected():
    s = NoiseSchedule(num_train_timesteps=10, beta_schedule="linear")
    x = torch.zeros(2, 1, 2, 2)
    with pytest.raises(ConfigError, match="outside"):
        s.add_noise(x, x, torch.tensor([0, 10]))
    with pytest.raises(ConfigError, match="entries"):
        s.add_noise(x, x, torch.tensor([0, 1, 2]))
