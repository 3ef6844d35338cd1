"""generate(): guidance arithmetic, exactness with an oracle model, inpainting, and the
loop compared with diffusers' DDIM + classifier-free guidance."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from unetkit.diffusion.inpainting import InpaintingGuide
from unetkit.diffusion.samplers import build_scheduler
from unetkit.diffusion.sampling import generate, guided_output
from unetkit.diffusion.schedules import NoiseSchedule
from unetkit.errors import ConfigError


class ContextModel(nn.Module):
    """Output depends smoothly on x, t and the mean of the context."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.3))

    def forward(self, x, t, context=None):
        c = 0.0 if context is None else context.mean(dim=(1, 2)).view(-1, 1, 1, 1)
        tt = t.float().view(-1, 1, 1, 1) / 1000
        return self.w * x * (1 - tt) + c + 0.1 * torch.sin(x + tt)


class OracleModel(nn.Module):
    """Predicts the exact noise that turns ``target`` into x_t (ε-prediction)."""

    def __init__(self, target: torch.Tensor, alphas_cumprod: torch.Tensor) -> None:
        super().__init__()
        self.target, self.ab = target, alphas_cumprod.double()
        self.p = nn.Parameter(torch.zeros(()))
        self.inputs: list[torch.Tensor] = []

    def forward(self, x, t, context=None):
        self.inputs.append(x.clone())
        x = x[:, : self.target.shape[1]]
        ab = self.ab[t.long()].view(-1, 1, 1, 1)
        return ((x.double() - ab.sqrt() * self.target.double()) / (1 - ab).sqrt()).float()


def test_guidance_mixes_conditional_and_unconditional_predictions():
    model = ContextModel()
    x, t = torch.randn(3, 1, 8, 8), torch.tensor(500)
    ctx, null = torch.randn(3, 4, 6), torch.randn(1, 4, 6)
    out = guided_output(model, x, t, ctx, null, 4.0)
    cond = model(x, t.expand(3), ctx)
    uncond = model(x, t.expand(3), null.expand(3, -1, -1))
    torch.testing.assert_close(out, uncond + 4.0 * (cond - uncond))
    torch.testing.assert_close(guided_output(model, x, t, ctx, null, 1.0), cond)


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp-2m"])
def test_deterministic_samplers_land_on_the_oracle_target(sampler):
    schedule = NoiseSchedule(beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    target = torch.rand(2, 1, 8, 8) * 2 - 1
    model = OracleModel(target, schedule.alphas_cumprod)
    options = {"set_alpha_to_one": True} if sampler == "ddim" else {}  # end exactly on x0
    sched = build_scheduler(sampler, schedule, **options)
    out = generate(model, sched, None, shape=(2, 1, 8, 8), steps=20)
    torch.testing.assert_close(out, target, atol=1e-4, rtol=0)


def test_guidance_without_null_context_is_an_error():
    schedule = NoiseSchedule()
    with pytest.raises(ConfigError, match="uncond_context"):
        generate(
            ContextModel(),
            build_scheduler("ddim", schedule),
            torch.randn(1, 2, 3),
            shape=(1, 1, 4, 4),
            guidance=3.0,
        )


def test_loop_matches_diffusers_ddim_with_guidance():
    diffusers = pytest.importorskip("diffusers")
    schedule = NoiseSchedule(beta_schedule="scaled_linear")
    model = ContextModel()
    ctx, null = torch.randn(2, 4, 6), torch.randn(1, 4, 6)
    noise = torch.randn(2, 1, 8, 8)
    ours = generate(
        model,
        build_scheduler("ddim", schedule),
        ctx,
        uncond_context=null,
        shape=(2, 1, 8, 8),
        steps=10,
        guidance=2.5,
        noise=noise,
    )
    ref = diffusers.DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    ref.set_timesteps(10)
    x = noise * ref.init_noise_sigma
    with torch.no_grad():
        for t in ref.timesteps:
            both = model(torch.cat([x, x]), t.expand(4), torch.cat([ctx, null.expand(2, -1, -1)]))
            cond, uncond = both.chunk(2)
            x = ref.step(uncond + 2.5 * (cond - uncond), t, x).prev_sample
    torch.testing.assert_close(ours, x, rtol=1e-4, atol=1e-5)


def _half_mask(n=2, size=8):
    mask = torch.zeros(n, 1, size, size)
    mask[..., size // 2 :] = 1  # repaint the right half
    return mask


@pytest.mark.parametrize("resample", [1, 3])
def test_replace_inpainting_keeps_known_pixels_and_fills_the_hole(resample):
    schedule = NoiseSchedule(beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    image = torch.rand(2, 1, 8, 8) * 2 - 1
    target = torch.rand(2, 1, 8, 8) * 2 - 1  # what the (oracle) model wants everywhere
    mask = _half_mask()
    guide = InpaintingGuide(image, mask, schedule.alphas_cumprod, resample=resample)
    model = OracleModel(target, schedule.alphas_cumprod)
    out = generate(
        model, build_scheduler("ddim", schedule), None, shape=image.shape, steps=10, inpaint=guide
    )
    keep = mask == 0
    torch.testing.assert_close(out[keep], image[keep], atol=1e-6, rtol=0)
    # the hole follows the model (the oracle's target), up to the known region's influence
    assert (out[~keep] - target[~keep]).abs().mean() < 0.1
    assert len(model.inputs) == 10 * resample


def test_concat_inpainting_feeds_mask_and_masked_image_channels():
    schedule = NoiseSchedule()
    image, mask = torch.rand(1, 1, 8, 8), _half_mask(1)
    guide = InpaintingGuide(image, mask, schedule.alphas_cumprod, mode="concat")
    model = OracleModel(torch.zeros(1, 1, 8, 8), schedule.alphas_cumprod)
    generate(
        model, build_scheduler("ddim", schedule), None, shape=(1, 1, 8, 8), steps=2, inpaint=guide
    )
    first = model.inputs[0]
    assert first.shape == (1, 3, 8, 8)  # 2C + 1 channels: [x_t, mask, masked image]
    torch.testing.assert_close(first[:, 1:2], mask)
    torch.testing.assert_close(first[:, 2:], image * (1 - mask))


def test_repaint_refuses_multistep_sampler():
    schedule = NoiseSchedule()
    guide = InpaintingGuide(
        torch.zeros(1, 1, 4, 4), _half_mask(1, 4), schedule.alphas_cumprod, resample=2
    )
    with pytest.raises(ConfigError, match="ddpm or ddim"):
        generate(
            ContextModel(),
            build_scheduler("dpmpp-2m", schedule),
            None,
            shape=(1, 1, 4, 4),
            steps=2,
            inpaint=guide,
        )


@pytest.mark.parametrize(
    ("prediction_type", "clips"), [("epsilon", True), ("v_prediction", False), ("sample", False)]
)
def test_pipeline_clips_the_x0_estimate_only_for_epsilon_models(prediction_type, clips):
    from unetkit.workflows.diffuse import DiffusionPipeline

    schedule = NoiseSchedule(prediction_type=prediction_type)
    pipe = DiffusionPipeline(ContextModel(), schedule)
    assert pipe.clip_sample is clips
    assert pipe._scheduler("ddim").clip_sample is clips
    assert DiffusionPipeline(ContextModel(), schedule, clip_sample=True).clip_sample is True


@pytest.mark.skipif(
    not __import__("unetkit.runtime.fastpath").runtime.fastpath.can_freeze(
        nn.Conv2d(1, 1, 1), torch.bfloat16
    ),
    reason="no oneDNN bf16 kernels here",
)
def test_pipeline_bf16_runs_the_frozen_copy_and_stays_close_to_fp32(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As close to float32 as bf16 autocast is (an untrained net's trajectory amplifies
    any rounding, so the bound is relative to autocast's)."""
    import unetkit
    from unetkit.runtime import fastpath
    from unetkit.workflows.diffuse import DiffusionPipeline

    torch.manual_seed(0)
    net = unetkit.create_model(
        "diffusion-unet", in_channels=1, out_channels=1, channels=(16, 32), num_res_blocks=1,
        attention_levels=(False, True), num_heads=2, cross_attention_dim=None, norm_groups=8,
    ).eval()  # fmt: skip
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.normal_(0, 0.05)
    schedule = NoiseSchedule(beta_schedule="linear", beta_start=1e-4, beta_end=0.02)

    def sample(precision: str) -> torch.Tensor:
        pipe = DiffusionPipeline(net, schedule, size=16, channels=1, precision=precision)
        return pipe.generate(["", ""], steps=4, guidance=1.0, seed=3)

    exact, fast = sample("fp32"), sample("bf16")
    assert isinstance(fastpath._CACHE.get(net)[1], fastpath.FrozenModel)
    monkeypatch.setattr(fastpath, "can_freeze", lambda model, dtype: False)
    autocast = sample("bf16")
    assert fast.dtype == torch.float32
    err, err_autocast = (fast - exact).abs().max(), (autocast - exact).abs().max()
    assert err <= 1.5 * err_autocast + 0.02
