"""Conditional diffusion U-Net with Stable-Diffusion-compatible module names.

The latent-diffusion U-Net of Rombach et al. 2022 ("High-Resolution Image Synthesis with
Latent Diffusion Models"), built on the DDPM U-Net (Ho et al. 2020): timestep-conditioned
residual blocks, spatial transformers with cross-attention to a text context on chosen
levels, strided-conv down-sampling, nearest + conv up-sampling, skip concatenation.

State-dict keys are identical to diffusers' ``UNet2DConditionModel`` (``conv_in``,
``time_embedding.linear_1``, ``down_blocks.0.resnets.0.conv1``,
``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``, ``mid_block``,
``up_blocks``, ``conv_norm_out``, ``conv_out``), so converting to and from diffusers is a
config mapping (``unetkit.formats.diffusers``) and LoRA targets are plain name patterns.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from unetkit.errors import ConfigError, InputSizeError
from unetkit.nn.conditioning import ConditionalSequential
from unetkit.nn.dims import check_dims, conv_nd
from unetkit.nn.init import zero_module
from unetkit.nn.resblock import ConvDownsample, NearestUpsample, TimestepResBlock
from unetkit.nn.timestep import TimestepEmbedding, timestep_embedding
from unetkit.nn.transformer import SpatialTransformer
from unetkit.registry import register_model


@dataclasses.dataclass(frozen=True)
class DiffusionUNetConfig:
    """Configuration of ``DiffusionUNet`` (diffusers' names in brackets).

    Args:
        in_channels, out_channels: latent channels in and out.
        channels: width per level [block_out_channels]; the time embedding is 4x channels[0].
        num_res_blocks: residual blocks per down level; up levels get one more [layers_per_block].
        attention_levels: which levels carry spatial transformers (mirrored on the way up;
            the middle block always has one).
        num_heads: attention heads, one int or one per level. SD 1.x uses 8. (diffusers'
            "attention_head_dim" holds this number for historical reasons.)
        head_dim: alternatively a fixed head width (heads = channels // head_dim); set
            ``num_heads=None`` when using it.
        cross_attention_dim: width of the text context; None: self-attention only.
        transformer_layers: transformer blocks per spatial transformer.
        use_linear_projection: Linear (SD 2.x) instead of 1x1-conv transformer projections.
        norm_groups, norm_eps: GroupNorm of the residual blocks and the output.
        num_class_embeds: if set, class labels (0..n-1) are embedded and added to the time
            embedding.
        dims: spatial dimensions (2 for images).
        flip_sin_to_cos, freq_shift: sinusoidal timestep features (SD: True, 0).
        dropout: residual/attention dropout.
        upcast_attention: float32 attention under half precision (SD 2.1).
    """

    in_channels: int = 4
    out_channels: int = 4
    channels: tuple[int, ...] = (320, 640, 1280, 1280)
    num_res_blocks: int = 2
    attention_levels: tuple[bool, ...] = (True, True, True, False)
    num_heads: int | tuple[int, ...] | None = 8
    head_dim: int | None = None
    cross_attention_dim: int | None = 768
    transformer_layers: int = 1
    use_linear_projection: bool = False
    norm_groups: int = 32
    norm_eps: float = 1e-5
    num_class_embeds: int | None = None
    dims: int = 2
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    dropout: float = 0.0
    upcast_attention: bool = False

    def __post_init__(self) -> None:
        check_dims(self.dims)
        n = len(self.channels)
        if n < 1 or any(c <= 0 or c % self.norm_groups for c in self.channels):
            raise ConfigError(
                f"channels={self.channels}: need positive widths divisible by "
                f"norm_groups={self.norm_groups}"
            )
        if len(self.attention_levels) != n:
            raise ConfigError(
                f"attention_levels={self.attention_levels} needs one flag per level "
                f"({n} levels from channels={self.channels})"
            )
        if (self.num_heads is None) == (self.head_dim is None):
            raise ConfigError(
                f"set exactly one of num_heads={self.num_heads!r} and head_dim={self.head_dim!r} "
                f"(e.g. head_dim=64, num_heads=None)"
            )
        if isinstance(self.num_heads, tuple) and len(self.num_heads) != n:
            raise ConfigError(f"num_heads={self.num_heads} needs one entry per level ({n})")
        heads = self.heads_per_level()
        for i, (c, h) in enumerate(zip(self.channels, heads, strict=True)):
            if not (self.attention_levels[i] or i == n - 1):  # the middle block uses the last
                continue
            if h <= 0 or c % h:
                raise ConfigError(
                    f"level width {c} is not divisible into {h} attention heads "
                    f"(num_heads={self.num_heads}, head_dim={self.head_dim})"
                )
        if self.num_res_blocks < 1 or self.transformer_layers < 1:
            raise ConfigError("num_res_blocks and transformer_layers must be >= 1")

    def heads_per_level(self) -> tuple[int, ...]:
        """Attention heads at each level (the middle block uses the last one)."""
        if self.head_dim is not None:
            return tuple(c // self.head_dim for c in self.channels)
        if isinstance(self.num_heads, int):
            return (self.num_heads,) * len(self.channels)
        return tuple(self.num_heads)


class UNetLevel(nn.Module):
    """One level of the U: ``resnets`` with optional ``attentions`` and a re-sampler.

    ``steps()`` pairs each residual block with its transformer as one
    ``ConditionalSequential``; the U-Net stores one skip per down step and consumes one per
    up step. The re-sampler lives in ``downsamplers`` or ``upsamplers`` (diffusers' names).
    """

    def __init__(
        self,
        resnets: list[nn.Module],
        attentions: list[nn.Module] | None,
        *,
        downsample: nn.Module | None = None,
        upsample: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(attentions) if attentions else None
        self.downsamplers = nn.ModuleList([downsample]) if downsample is not None else None
        self.upsamplers = nn.ModuleList([upsample]) if upsample is not None else None

    def steps(self) -> list[ConditionalSequential]:
        if self.attentions is None:
            pairs = [ConditionalSequential(r) for r in self.resnets]
        else:
            pairs = [
                ConditionalSequential(r, a)
                for r, a in zip(self.resnets, self.attentions, strict=True)
            ]
        if self.downsamplers is not None:
            pairs.append(ConditionalSequential(self.downsamplers[0]))
        return pairs


class MidBlock(nn.Module):
    """Bottleneck: ``resnets.0``, then (``attentions.k``, ``resnets.k+1``) pairs."""

    def __init__(self, resnets: list[nn.Module], attentions: list[nn.Module]) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(attentions)

    def step(self) -> ConditionalSequential:
        layers = [self.resnets[0]]
        for attn, res in zip(self.attentions, self.resnets[1:], strict=True):
            layers += [attn, res]
        return ConditionalSequential(*layers)


@register_model(
    "diffusion-unet",
    config=DiffusionUNetConfig,
    description="Conditional diffusion U-Net (LDM/Stable Diffusion): timestep ResBlocks, "
    "cross-attention transformers; diffusers/LDM-compatible weights",
    presets={
        "sd15": {},
        "tiny": dict(
            channels=(32, 64),
            num_res_blocks=1,
            attention_levels=(False, True),
            num_heads=2,
            cross_attention_dim=32,
            norm_groups=8,
        ),
        "digits": dict(
            in_channels=1,
            out_channels=1,
            channels=(32, 64, 128),  # 4.2M parameters: ~15 min of CPU training
            num_res_blocks=1,
            # cross-attention on the 8×8 level and the middle carries the caption; at 16×16
            # (256 tokens) it cost a third of each step without better digits
            attention_levels=(False, False, True),
            num_heads=None,
            head_dim=32,
            cross_attention_dim=384,
        ),
    },
    dims=(2,),
    task="diffusion",
    test_overrides=dict(
        channels=(16, 32),
        num_res_blocks=1,
        attention_levels=(False, True),
        num_heads=2,
        cross_attention_dim=16,
        norm_groups=8,
    ),
)
class DiffusionUNet(nn.Module):
    """Noise predictor ``eps(x_t, t, context)`` of latent diffusion (Rombach et al. 2022).

    Args:
        config: a ``DiffusionUNetConfig``.

    Set ``model.gradient_checkpointing = True`` to recompute each block in the backward
    pass (``torch.utils.checkpoint``, non-reentrant) and save activation memory.

    Example:
        >>> import unetkit
        >>> net = unetkit.create_model("diffusion-unet", preset="tiny")
        >>> x, ctx = torch.randn(2, 4, 16, 16), torch.randn(2, 7, 32)
        >>> net(x, 500, ctx).shape
        torch.Size([2, 4, 16, 16])
    """

    def __init__(self, config: DiffusionUNetConfig) -> None:
        super().__init__()
        c = self.config = config
        self.in_channels, self.out_channels, self.dims = c.in_channels, c.out_channels, c.dims
        self.gradient_checkpointing = False
        conv, ch, heads, emb_dim = (
            conv_nd(c.dims),
            c.channels,
            c.heads_per_level(),
            4 * c.channels[0],
        )
        self.conv_in = conv(c.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], emb_dim)
        if c.num_class_embeds is not None:
            self.class_embedding = nn.Embedding(c.num_class_embeds, emb_dim)

        def resnet(i: int, o: int) -> nn.Module:
            return TimestepResBlock(
                i, o, emb_dim, dims=c.dims, groups=c.norm_groups, eps=c.norm_eps, dropout=c.dropout
            )

        def attention(w: int, h: int) -> nn.Module:
            return SpatialTransformer(
                w, heads=h, context_dim=c.cross_attention_dim, depth=c.transformer_layers,
                dims=c.dims, groups=c.norm_groups, linear_projection=c.use_linear_projection,
                dropout=c.dropout, upcast=c.upcast_attention,
            )  # fmt: skip

        n, r = len(ch), c.num_res_blocks
        self.down_blocks = nn.ModuleList()
        for i, w in enumerate(ch):
            ins = [ch[max(i - 1, 0)]] + [w] * (r - 1)
            self.down_blocks.append(
                UNetLevel(
                    [resnet(k, w) for k in ins],
                    [attention(w, heads[i]) for _ in ins] if c.attention_levels[i] else None,
                    downsample=ConvDownsample(w, dims=c.dims) if i < n - 1 else None,
                )
            )
        self.mid_block = MidBlock(
            [resnet(ch[-1], ch[-1]) for _ in range(2)], [attention(ch[-1], heads[-1])]
        )
        self.up_blocks = nn.ModuleList()
        for i in reversed(range(n)):  # level i, from the bottom up
            prev = ch[min(i + 1, n - 1)]  # width arriving from below
            skips = [ch[i]] * r + [ch[max(i - 1, 0)]]  # widths of the skips it consumes
            ins = [prev if j == 0 else ch[i] for j in range(r + 1)]
            self.up_blocks.append(
                UNetLevel(
                    [resnet(a + s, ch[i]) for a, s in zip(ins, skips, strict=True)],
                    [attention(ch[i], heads[i]) for _ in ins] if c.attention_levels[i] else None,
                    upsample=NearestUpsample(ch[i], dims=c.dims) if i > 0 else None,
                )
            )
        self.conv_norm_out = nn.GroupNorm(c.norm_groups, ch[0], eps=c.norm_eps)
        self.conv_out = zero_module(conv(ch[0], c.out_channels, 3, padding=1))

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor | None = None,
        *,
        class_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict the noise (or v) for ``sample``.

        Args:
            sample: (B, in_channels, *spatial) noisy latents; any spatial size.
            timestep: int/float, 0-d or (B,) tensor.
            encoder_hidden_states: (B, L, cross_attention_dim) text context.
            class_labels: (B,) int labels when ``num_class_embeds`` is set.

        Returns:
            (B, out_channels, *spatial).
        """
        emb = F.silu(self.embed(sample, timestep, class_labels))  # (B, 4*C0), activated once
        context = self._check_context(sample, encoder_hidden_states)
        h = self.conv_in(sample)
        skips = [h]
        for level in self.down_blocks:  # encoder: every step leaves a skip
            for step in level.steps():
                h = self._run(step, h, emb, context)
                skips.append(h)
        h = self._run(self.mid_block.step(), h, emb, context)
        for level in self.up_blocks:  # decoder: every step concatenates one skip
            for step in level.steps():
                h = self._run(step, torch.cat([h, skips.pop()], dim=1), emb, context)
            if level.upsamplers is not None:
                h = level.upsamplers[0](h, skips[-1].shape[2:])
        return self.conv_out(F.silu(self.conv_norm_out(h)))

    def _run(
        self,
        step: ConditionalSequential,
        h: torch.Tensor,
        emb: torch.Tensor,
        ctx: torch.Tensor | None,
    ) -> torch.Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(step, h, emb, ctx, use_reentrant=False)
        return step(h, emb, ctx)

    def embed(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        class_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Time (+ class) embedding (B, 4*channels[0]) in the sample's dtype; checks inputs."""
        if sample.dim() != self.dims + 2 or sample.shape[1] != self.in_channels:
            raise InputSizeError(
                f"DiffusionUNet expects sample of shape (B, {self.in_channels}, "
                f"{', '.join('DHW'[-self.dims :])}), got {tuple(sample.shape)}"
            )
        b = sample.shape[0]
        t = torch.as_tensor(timestep, device=sample.device)
        if t.dim() > 1 or (t.dim() == 1 and t.shape[0] not in (1, b)):
            raise InputSizeError(f"timestep must be a scalar or shape ({b},), got {tuple(t.shape)}")
        t = t.reshape(-1).expand(b)
        feats = timestep_embedding(
            t, self.config.channels[0], flip_sin_to_cos=self.config.flip_sin_to_cos,
            freq_shift=self.config.freq_shift,
        )  # fmt: skip
        emb = self.time_embedding(feats.to(sample.dtype))
        if self.config.num_class_embeds is not None:
            if class_labels is None:
                raise InputSizeError(
                    f"this model is class-conditional (num_class_embeds="
                    f"{self.config.num_class_embeds}); pass class_labels=(B,) integers"
                )
            emb = emb + self.class_embedding(class_labels.to(sample.device)).to(emb.dtype)
        return emb

    def _check_context(
        self, sample: torch.Tensor, context: torch.Tensor | None
    ) -> torch.Tensor | None:
        want = self.config.cross_attention_dim
        if want is None:
            return None  # self-attention only: a given context is not used
        if context is None or context.dim() != 3 or context.shape[-1] != want:
            got = None if context is None else tuple(context.shape)
            raise InputSizeError(
                f"encoder_hidden_states must have shape (B, L, {want}) (cross_attention_dim), "
                f"got {got}; for unconditional samples pass the empty-prompt embedding"
            )
        if context.shape[0] != sample.shape[0]:
            raise InputSizeError(
                f"encoder_hidden_states batch {context.shape[0]} != sample batch {sample.shape[0]}"
            )
        return context.to(sample.dtype)
