"""Samplers compared step by step with diffusers' schedulers (same config, same fake model).

Two comparisons per sampler: float64, with the reference's ᾱ table replaced by our float64
one (tests the step formulas to ~1e-7 or better), and float32 with diffusers untouched
(tests the whole thing at float32 precision).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from unetkit.diffusion import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    NoiseSchedule,
    build_scheduler,
)
from unetkit.errors import ConfigError

diffusers = pytest.importorskip("diffusers")
# diffusers' np.array(tensor) calls warn under numpy 2; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:diffusers.*")

BETAS = {
    "linear": {"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02},
    "scaled_linear": {"beta_schedule": "scaled_linear"},
    "cosine": {"beta_schedule": "cosine"},
}

# case -> (our sampler name, its options, diffusers class, the diffusers options that mean
# the same)
CASES = {
    "ddpm": ("ddpm", {}, "DDPMScheduler", {"clip_sample": False}),
    "ddim": (
        "ddim",
        {},
        "DDIMScheduler",
        {"clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1},
    ),
    "ddim-eta-trailing": (
        "ddim",
        {"eta": 0.7, "timestep_spacing": "trailing", "set_alpha_to_one": True},
        "DDIMScheduler",
        {"clip_sample": False, "set_alpha_to_one": True, "timestep_spacing": "trailing"},
    ),
    "dpmpp-2m": ("dpmpp-2m", {}, "DPMSolverMultistepScheduler", {}),
    "dpmpp-2m-leading": (
        "dpmpp-2m",
        {"timestep_spacing": "leading", "steps_offset": 1},
        "DPMSolverMultistepScheduler",
        {"timestep_spacing": "leading", "steps_offset": 1},
    ),
    "euler": (
        "euler",
        {},
        "EulerDiscreteScheduler",
        {"timestep_spacing": "leading", "steps_offset": 1},
    ),
    "euler-linspace": (
        "euler",
        {"timestep_spacing": "linspace"},
        "EulerDiscreteScheduler",
        {"timestep_spacing": "linspace"},
    ),
}


def make_pair(case: str, schedule: NoiseSchedule):
    name, options, ref_class, ref_options = CASES[case]
    ours = build_scheduler(name, schedule, **options)
    ref = getattr(diffusers, ref_class)(**schedule.to_diffusers_config(), **ref_options)
    return ours, ref, options.get("eta", 0.0)


def fake_model(x: torch.Tensor, t) -> torch.Tensor:
    """A smooth deterministic stand-in for a network: depends on x and t."""
    tt = float(t) / 1000.0
    return 0.6 * torch.tanh(x) + 0.2 * torch.sin(3.0 * x + tt) - 0.1 * tt * x


def ref_float64(ref, schedule: NoiseSchedule) -> None:
    """Give the diffusers scheduler our float64 ᾱ table (before set_timesteps)."""
    ab = schedule.alphas_cumprod.clone()
    ref.betas, ref.alphas, ref.alphas_cumprod = schedule.betas, 1 - schedule.betas, ab
    if hasattr(ref, "final_alpha_cumprod") and not ref.config.set_alpha_to_one:
        ref.final_alpha_cumprod = ab[0]


def ref_float64_sigmas(ref, schedule: NoiseSchedule) -> None:
    """After set_timesteps: the σ table of the sigma-based samplers in float64."""
    if not hasattr(ref, "sigmas"):
        return
    ab = schedule.alphas_cumprod.numpy()
    table = np.sqrt((1 - ab) / ab)
    sig = np.interp(ref.timesteps.double().numpy(), np.arange(len(ab)), table)
    ref.sigmas = torch.from_numpy(np.append(sig, 0.0))


def run_both(case, beta, prediction_type, steps, dtype):
    schedule = NoiseSchedule(prediction_type=prediction_type, **BETAS[beta])
    ours, ref, eta = make_pair(case, schedule)
    if dtype == torch.float64:
        ref_float64(ref, schedule)
    ours.set_timesteps(steps)
    ref.set_timesteps(steps)
    if dtype == torch.float64:
        ref_float64_sigmas(ref, schedule)
    assert ours.timesteps.tolist() == ref.timesteps.tolist()
    rel = 1e-9 if dtype == torch.float64 else 2e-5  # diffusers' ᾱ is float32
    assert float(ours.init_noise_sigma) == pytest.approx(float(ref.init_noise_sigma), rel=rel)
    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1), dtype=dtype)
    x_ours = noise * ours.init_noise_sigma
    x_ref = noise * ref.init_noise_sigma
    g_ours, g_ref = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    extra = {"eta": eta} if isinstance(ours, DDIMScheduler) else {}
    per_step = []
    for t_ours, t_ref in zip(ours.timesteps, ref.timesteps, strict=True):
        in_ours = ours.scale_model_input(x_ours, t_ours)
        in_ref = ref.scale_model_input(x_ref, t_ref)
        per_step.append((in_ours, in_ref))
        x_ours = ours.step(fake_model(in_ours, t_ours), t_ours, x_ours, generator=g_ours)
        out = ref.step(fake_model(in_ref, t_ref), t_ref, x_ref, generator=g_ref, **extra)
        x_ref = out.prev_sample
        per_step.append((x_ours, x_ref))
    return per_step


# float64: DDPM/DDIM agree to rounding; diffusers' DPM-Solver and Euler cast the sample to
# float32 inside step(), which limits those to float32 precision
TOL64 = {"rtol": 1e-10, "atol": 1e-10}
TOL64_SIGMA = {"rtol": 1e-5, "atol": 1e-5}  # Euler: σ_max ≈ 157 for "linear"


def tol64(case: str) -> dict[str, float]:
    return TOL64 if CASES[case][0] in ("ddpm", "ddim") else TOL64_SIGMA


TOL32 = {"rtol": 1e-5, "atol": 1e-5}


@pytest.mark.parametrize("beta", list(BETAS))
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("case", list(CASES))
def test_sampling_loop_matches_diffusers_float64(case, prediction_type, beta):
    for ours, ref in run_both(case, beta, prediction_type, 12, torch.float64):
        assert ours.dtype == torch.float64
        torch.testing.assert_close(ours, ref.to(torch.float64), **tol64(case))


@pytest.mark.parametrize("beta", list(BETAS))
@pytest.mark.parametrize("case", list(CASES))
def test_sampling_loop_matches_unmodified_diffusers_float32(case, beta):
    # diffusers' float32 cumprod of the cosine table is off by 1.3e-5 (relative) at t = 999,
    # where ᾱ = 2.4e-9 and x̂₀ = x / sqrt(ᾱ) is ~1e4: that much shows in the result
    tol = TOL32 if beta != "cosine" else {"rtol": 5e-5, "atol": 1e-5}
    for ours, ref in run_both(case, beta, "epsilon", 10, torch.float32):
        assert ours.dtype == torch.float32
        torch.testing.assert_close(ours, ref, **tol)


def test_sample_prediction_matches_diffusers():
    for case in ("ddpm", "ddim", "dpmpp-2m", "euler"):
        for ours, ref in run_both(case, "linear", "sample", 8, torch.float64):
            torch.testing.assert_close(ours, ref.double(), **tol64(case))


SPACING_CASES = [
    ("ddpm", "DDPMScheduler", "leading", 0),
    ("ddpm", "DDPMScheduler", "trailing", 0),
    ("ddim", "DDIMScheduler", "leading", 1),
    ("ddim", "DDIMScheduler", "trailing", 0),
    ("ddim", "DDIMScheduler", "linspace", 0),
    ("dpmpp-2m", "DPMSolverMultistepScheduler", "linspace", 0),
    ("dpmpp-2m", "DPMSolverMultistepScheduler", "leading", 1),
    ("dpmpp-2m", "DPMSolverMultistepScheduler", "trailing", 0),
    ("euler", "EulerDiscreteScheduler", "leading", 1),
    ("euler", "EulerDiscreteScheduler", "trailing", 0),
    ("euler", "EulerDiscreteScheduler", "linspace", 0),
]


@pytest.mark.parametrize("name, ref_class, spacing, offset", SPACING_CASES)
def test_timesteps_match_diffusers(name, ref_class, spacing, offset):
    schedule = NoiseSchedule()
    ours = build_scheduler(name, schedule, timestep_spacing=spacing, steps_offset=offset)
    ref = getattr(diffusers, ref_class)(
        **schedule.to_diffusers_config(), timestep_spacing=spacing, steps_offset=offset
    )
    for n in (1, 3, 7, 25, 50, 333, 999):
        ref.set_timesteps(n)
        if int(ref.timesteps.max()) > 999:  # diffusers lets "leading" + offset overflow
            with pytest.raises(ConfigError, match="outside"):
                ours.set_timesteps(n)
            continue
        ours.set_timesteps(n)
        assert ours.timesteps.tolist() == ref.timesteps.tolist(), n
        assert bool((ours.timesteps.diff() < 0).all())
        if not (name == "euler" and spacing == "linspace"):
            assert ours.timesteps.dtype == torch.long


def test_ddpm_full_chain_without_set_timesteps_and_its_variance():
    schedule = NoiseSchedule(**BETAS["linear"])
    sched = DDPMScheduler(schedule)
    assert sched.timesteps.tolist() == list(range(999, -1, -1))
    x = torch.randn(20000, dtype=torch.float64).reshape(20000, 1, 1, 1)
    eps = torch.zeros_like(x)
    t = 500
    g = torch.Generator().manual_seed(0)
    mean_part = DDPMScheduler(schedule).step(eps, t, x, generator=g)
    # posterior variance β̃_t = (1-ᾱ_{t-1})/(1-ᾱ_t) β_t, by hand in float64
    ab = schedule.alphas_cumprod.numpy()
    beta = schedule.betas.numpy()[t]
    var = (1 - ab[t - 1]) / (1 - ab[t]) * beta
    x0_hat = x.numpy() / np.sqrt(ab[t])  # ε̂ = 0
    mean = (
        np.sqrt(ab[t - 1]) * beta / (1 - ab[t]) * x0_hat
        + np.sqrt(1 - beta) * (1 - ab[t - 1]) / (1 - ab[t]) * x.numpy()
    )
    resid = (mean_part.numpy() - mean) / np.sqrt(var)  # should be exactly N(0, 1) draws
    g2 = torch.Generator().manual_seed(0)
    expected = torch.randn(x.shape, generator=g2, dtype=torch.float64).numpy()
    np.testing.assert_allclose(resid, expected, rtol=1e-9, atol=1e-9)
    # the final step (t = 0) adds no noise
    out0 = sched.step(eps, 0, x, generator=g)
    np.testing.assert_allclose(out0.numpy(), x.numpy() / np.sqrt(1 - schedule.betas[0].item()))


def test_ddim_and_dpm_first_order_agree():
    # DPM-Solver++ of order 1 is DDIM (eta = 0) on the same timesteps with ᾱ_final = 1
    schedule = NoiseSchedule(**BETAS["scaled_linear"])
    ddim = DDIMScheduler(schedule, timestep_spacing="trailing", set_alpha_to_one=True)
    dpm1 = DPMSolverMultistepScheduler(schedule, order=1, timestep_spacing="trailing")
    ddim.set_timesteps(10)
    dpm1.set_timesteps(10)
    x = torch.randn(1, 2, 3, 3, dtype=torch.float64)
    y = x.clone()
    for t in ddim.timesteps:
        x = ddim.step(fake_model(x, t), t, x)
        y = dpm1.step(fake_model(y, t), t, y)
    torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-10)


def test_deterministic_samplers_recover_a_known_x0():
    """An oracle ε-model for a fixed x₀: every deterministic sampler ends on x₀."""
    schedule = NoiseSchedule(**BETAS["linear"])
    target = torch.rand(2, 1, 4, 4, dtype=torch.float64) * 2 - 1
    ab = schedule.alphas_cumprod

    def oracle(x_vp, t):
        a = ab[int(t)]
        return (x_vp - a.sqrt() * target) / (1 - a).sqrt()

    for sched in (
        DDIMScheduler(schedule, set_alpha_to_one=True, timestep_spacing="trailing"),
        DPMSolverMultistepScheduler(schedule),
        EulerDiscreteScheduler(schedule, timestep_spacing="trailing"),
    ):
        sched.set_timesteps(20)  # divides T: DDIM's t - T//n rule then ends exactly at t=0
        x = torch.randn(2, 1, 4, 4, dtype=torch.float64) * sched.init_noise_sigma
        for t in sched.timesteps:
            x = sched.step(oracle(sched.scale_model_input(x, t), t), t, x)
        torch.testing.assert_close(x, target, rtol=1e-8, atol=1e-8)


def test_euler_add_noise_is_in_sigma_space():
    schedule = NoiseSchedule()
    ours = EulerDiscreteScheduler(schedule)
    ref = diffusers.EulerDiscreteScheduler(
        **schedule.to_diffusers_config(), timestep_spacing="leading", steps_offset=1
    )
    ours.set_timesteps(10)
    ref.set_timesteps(10)
    x0, eps = torch.randn(2, 1, 3, 3), torch.randn(2, 1, 3, 3)
    t = ours.timesteps[[1, 4]]
    torch.testing.assert_close(
        ours.add_noise(x0, eps, t),
        ref.add_noise(x0, eps, ref.timesteps[[1, 4]]),
        rtol=1e-5,
        atol=1e-6,
    )


def test_step_dtype_follows_model_output_for_half_inputs():
    schedule = NoiseSchedule()
    for name in ("ddim", "dpmpp-2m", "euler"):
        sched = build_scheduler(name, schedule)
        sched.set_timesteps(3)
        x = torch.randn(1, 1, 2, 2, dtype=torch.bfloat16)
        t = sched.timesteps[0]
        out = sched.step(torch.zeros_like(x), t, sched.scale_model_input(x, t))
        assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_errors():
    schedule = NoiseSchedule()
    with pytest.raises(ConfigError, match="did you mean 'dpmpp-2m'"):
        build_scheduler("dpmpp2m", schedule)
    with pytest.raises(ConfigError, match="did you mean 'eta'"):
        build_scheduler("ddim", schedule, etta=0.5)
    with pytest.raises(ConfigError, match="set_timesteps"):
        DDIMScheduler(schedule).step(torch.zeros(1), 1, torch.zeros(1))
    with pytest.raises(ConfigError, match="num_inference_steps"):
        DDIMScheduler(schedule).set_timesteps(1001)
    with pytest.raises(ConfigError, match="steps_offset=0"):
        DDIMScheduler(schedule).set_timesteps(1000)  # leading + offset 1 reaches t = 1000
    with pytest.raises(ConfigError, match="timestep_spacing"):
        DDIMScheduler(schedule, timestep_spacing="lead")
    with pytest.raises(ConfigError, match="NoiseSchedule"):
        DDIMScheduler({"beta_schedule": "linear"})
    sched = DPMSolverMultistepScheduler(schedule)
    sched.set_timesteps(5)
    with pytest.raises(ConfigError, match="not one of this run's timesteps"):
        sched.step(torch.zeros(1), 3, torch.zeros(1))
    with pytest.raises(ConfigError, match="order"):
        DPMSolverMultistepScheduler(schedule, order=3)
