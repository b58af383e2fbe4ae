"""The Stable Diffusion autoencoder (AutoencoderKL) in Flax linen.

Its parameter tree is the one diffusers' FlaxAutoencoderKL builds (same module names, shapes
and kernel layouts), so the Flax weights of existing pipelines and exports load unchanged; with
the same RNG, `init_weights` even draws the same numbers.

Layouts: `encode` takes pixels NCHW (as pipelines hand them over) and returns the latent
Gaussian's mean and std channels-last (NHWC), as diffusers' Flax VAE does; `decode` takes
latents either way round and returns pixels NCHW. `latents_from_pixels_dist` turns the NHWC
moments into the NCHW, scaled latents the UNet sees; `latents_to_decoder_input` undoes the
scaling.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

DOWN_BLOCK = "DownEncoderBlock2D"
UP_BLOCK = "UpDecoderBlock2D"
# diffusers.AutoencoderKL (PyTorch) options this module always behaves as, with the values that
# describe that behaviour; a config with another value cannot be honoured.
_FIXED_OPTIONS = {
    "act_fn": ("silu", "swish"),
    "use_quant_conv": (True,),
    "use_post_quant_conv": (True,),
    "mid_block_add_attention": (True,),
    "latents_mean": (None,),
    "latents_std": (None,),
}
# Options that only steer PyTorch at run time (fp16 -> fp32 upcasting): any value is fine here.
_IGNORED_OPTIONS = ("force_upcast",)
_NORM_EPS = 1e-6


def _conv3x3(features: int, dtype: Any, name: str | None = None) -> nn.Conv:
  return nn.Conv(features, kernel_size=(3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                 dtype=dtype, name=name)


def _conv1x1(features: int, dtype: Any, name: str | None = None) -> nn.Conv:
  return nn.Conv(features, kernel_size=(1, 1), strides=(1, 1), padding="VALID", dtype=dtype,
                 name=name)


def _group_norm(groups: int, name: str | None = None) -> nn.GroupNorm:
  # No dtype: the statistics and the result stay in float32 even when the convs run in bf16,
  # as in the reference implementation.
  return nn.GroupNorm(num_groups=groups, epsilon=_NORM_EPS, name=name)


class _ResnetBlock(nn.Module):
  """Two norm-SiLU-conv steps plus a (1x1-projected when channels change) skip connection."""
  in_channels: int
  out_channels: int
  groups: int
  dtype: Any = jnp.float32

  def setup(self):
    self.norm1 = _group_norm(self.groups)
    self.conv1 = _conv3x3(self.out_channels, self.dtype)
    self.norm2 = _group_norm(self.groups)
    self.conv2 = _conv3x3(self.out_channels, self.dtype)
    if self.in_channels != self.out_channels:
      self.conv_shortcut = _conv1x1(self.out_channels, self.dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.conv1(nn.swish(self.norm1(x)))
    h = self.conv2(nn.swish(self.norm2(h)))
    skip = self.conv_shortcut(x) if self.in_channels != self.out_channels else x
    return h + skip


class _SpatialSelfAttention(nn.Module):
  """One-head self-attention over all pixels of an NHWC feature map, with a residual."""
  channels: int
  groups: int
  dtype: Any = jnp.float32

  def setup(self):
    self.group_norm = _group_norm(self.groups)
    self.query = nn.Dense(self.channels, dtype=self.dtype)
    self.key = nn.Dense(self.channels, dtype=self.dtype)
    self.value = nn.Dense(self.channels, dtype=self.dtype)
    self.proj_attn = nn.Dense(self.channels, dtype=self.dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    batch, height, width, channels = x.shape
    tokens = self.group_norm(x).reshape(batch, height * width, channels)
    # 1/sqrt(C) split evenly between queries and keys keeps the logits' intermediate products
    # small, which matters when the Dense layers run in bfloat16.
    root_scale = 1.0 / math.sqrt(math.sqrt(channels))
    queries = self.query(tokens) * root_scale
    keys = self.key(tokens) * root_scale
    weights = nn.softmax(jnp.einsum("bqc,bkc->bqk", queries, keys), axis=-1)
    attended = jnp.einsum("bqk,bkc->bqc", weights, self.value(tokens))
    return self.proj_attn(attended).reshape(batch, height, width, channels) + x


class _Downsample(nn.Module):
  """Stride-2 3x3 conv after padding one row and column at the bottom/right (as SD does)."""
  channels: int
  dtype: Any = jnp.float32

  def setup(self):
    self.conv = nn.Conv(self.channels, kernel_size=(3, 3), strides=(2, 2), padding="VALID",
                        dtype=self.dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.conv(jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0))))


class _Upsample(nn.Module):
  """Nearest-neighbour 2x upsampling followed by a 3x3 conv."""
  channels: int
  dtype: Any = jnp.float32

  def setup(self):
    self.conv = _conv3x3(self.channels, self.dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    batch, height, width, channels = x.shape
    x = jax.image.resize(x, (batch, 2 * height, 2 * width, channels), method="nearest")
    return self.conv(x)


class _EncoderBlock(nn.Module):
  in_channels: int
  out_channels: int
  num_layers: int
  groups: int
  downsample: bool
  dtype: Any = jnp.float32

  def setup(self):
    self.resnets = [
        _ResnetBlock(self.in_channels if i == 0 else self.out_channels, self.out_channels,
                     self.groups, self.dtype) for i in range(self.num_layers)]
    if self.downsample:
      self.downsamplers_0 = _Downsample(self.out_channels, self.dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    for resnet in self.resnets:
      x = resnet(x)
    return self.downsamplers_0(x) if self.downsample else x


class _DecoderBlock(nn.Module):
  in_channels: int
  out_channels: int
  num_layers: int
  groups: int
  upsample: bool
  dtype: Any = jnp.float32

  def setup(self):
    self.resnets = [
        _ResnetBlock(self.in_channels if i == 0 else self.out_channels, self.out_channels,
                     self.groups, self.dtype) for i in range(self.num_layers)]
    if self.upsample:
      self.upsamplers_0 = _Upsample(self.out_channels, self.dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    for resnet in self.resnets:
      x = resnet(x)
    return self.upsamplers_0(x) if self.upsample else x


class _MidBlock(nn.Module):
  """ResNet, self-attention, ResNet at the lowest resolution."""
  channels: int
  groups: int
  dtype: Any = jnp.float32

  def setup(self):
    self.resnets = [_ResnetBlock(self.channels, self.channels, self.groups, self.dtype)
                    for _ in range(2)]
    self.attentions = [_SpatialSelfAttention(self.channels, self.groups, self.dtype)]

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class _Encoder(nn.Module):
  """Pixels (NHWC) to the latent Gaussian's 2 x latent_channels moments."""
  block_out_channels: tuple[int, ...]
  layers_per_block: int
  groups: int
  moment_channels: int
  dtype: Any = jnp.float32

  def setup(self):
    widths = self.block_out_channels
    self.conv_in = _conv3x3(widths[0], self.dtype)
    self.down_blocks = [
        _EncoderBlock(widths[max(i - 1, 0)], width, self.layers_per_block, self.groups,
                      downsample=i < len(widths) - 1, dtype=self.dtype)
        for i, width in enumerate(widths)]
    self.mid_block = _MidBlock(widths[-1], self.groups, self.dtype)
    self.conv_norm_out = _group_norm(self.groups)
    self.conv_out = _conv3x3(self.moment_channels, self.dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.conv_in(x)
    for block in self.down_blocks:
      x = block(x)
    x = self.mid_block(x)
    return self.conv_out(nn.swish(self.conv_norm_out(x)))


class _Decoder(nn.Module):
  """Latents (NHWC, after post_quant_conv) to pixels (NHWC)."""
  block_out_channels: tuple[int, ...]
  layers_per_block: int
  groups: int
  out_channels: int
  dtype: Any = jnp.float32

  def setup(self):
    widths = tuple(reversed(self.block_out_channels))
    self.conv_in = _conv3x3(widths[0], self.dtype)
    self.mid_block = _MidBlock(widths[0], self.groups, self.dtype)
    # One ResNet more per block than the encoder has, as in SD.
    self.up_blocks = [
        _DecoderBlock(widths[max(i - 1, 0)], width, self.layers_per_block + 1, self.groups,
                      upsample=i < len(widths) - 1, dtype=self.dtype)
        for i, width in enumerate(widths)]
    self.conv_norm_out = _group_norm(self.groups)
    self.conv_out = _conv3x3(self.out_channels, self.dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.mid_block(self.conv_in(x))
    for block in self.up_blocks:
      x = block(x)
    return self.conv_out(nn.swish(self.conv_norm_out(x)))


class AutoencoderKL(nn.Module):
  """The KL-regularised autoencoder of Stable Diffusion; fields are diffusers' config keys."""
  in_channels: int = 3
  out_channels: int = 3
  down_block_types: tuple[str, ...] = (DOWN_BLOCK,)
  up_block_types: tuple[str, ...] = (UP_BLOCK,)
  block_out_channels: tuple[int, ...] = (64,)
  layers_per_block: int = 1
  latent_channels: int = 4
  norm_num_groups: int = 32
  sample_size: int = 32
  scaling_factor: float = 0.18215
  shift_factor: float | None = None
  dtype: Any = jnp.float32

  def setup(self):
    if any(t != DOWN_BLOCK for t in self.down_block_types):
      raise ValueError(f"down_block_types: only {DOWN_BLOCK} is supported, got "
                       f"{list(self.down_block_types)}")
    if any(t != UP_BLOCK for t in self.up_block_types):
      raise ValueError(f"up_block_types: only {UP_BLOCK} is supported, got "
                       f"{list(self.up_block_types)}")
    if not (len(self.down_block_types) == len(self.up_block_types)
            == len(self.block_out_channels)):
      raise ValueError("down_block_types, up_block_types and block_out_channels must have the "
                       "same length")
    self.encoder = _Encoder(tuple(self.block_out_channels), self.layers_per_block,
                            self.norm_num_groups, 2 * self.latent_channels, self.dtype)
    self.decoder = _Decoder(tuple(self.block_out_channels), self.layers_per_block,
                            self.norm_num_groups, self.out_channels, self.dtype)
    self.quant_conv = _conv1x1(2 * self.latent_channels, self.dtype)
    self.post_quant_conv = _conv1x1(self.latent_channels, self.dtype)

  def encode(self, pixels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Pixels NCHW in [-1, 1] -> (mean, std) of the latent Gaussian, both NHWC."""
    moments = self.quant_conv(self.encoder(jnp.transpose(pixels, (0, 2, 3, 1))))
    mean, log_variance = jnp.split(moments, 2, axis=-1)
    std = jnp.exp(0.5 * jnp.clip(log_variance, -30.0, 20.0))
    return mean, std

  def decode(self, latents: jax.Array) -> jax.Array:
    """Unscaled latents -> pixels NCHW.

    Latents may be NHWC or NCHW: like diffusers, an array whose last axis is not
    latent_channels long is taken to be NCHW (so avoid latents exactly latent_channels wide).
    """
    if latents.shape[-1] != self.latent_channels:
      latents = jnp.transpose(latents, (0, 2, 3, 1))
    pixels = self.decoder(self.post_quant_conv(latents))
    return jnp.transpose(pixels, (0, 3, 1, 2))

  def __call__(self, pixels: jax.Array) -> jax.Array:
    """Reconstruction through the latent mean (also what `init` traces to create every
    parameter)."""
    mean, _ = self.encode(pixels)
    return self.decode(mean)

  def latents_from_pixels_dist(self, mean: jax.Array, std: jax.Array,
                               noise: jax.Array) -> jax.Array:
    """A latent sample mean + std * noise (all NHWC, as `encode` returns them) as the UNet
    takes it: NCHW, shifted and scaled to about unit variance."""
    sample = mean + std * noise
    if self.shift_factor is not None:
      sample = sample - self.shift_factor
    return jnp.transpose(sample, (0, 3, 1, 2)) * self.scaling_factor

  def latents_to_decoder_input(self, latents: jax.Array) -> jax.Array:
    """UNet-space latents (any layout) back to the scale `decode` expects."""
    latents = latents / self.scaling_factor
    if self.shift_factor is not None:
      latents = latents + self.shift_factor
    return latents

  def init_weights(self, rng: jax.Array) -> dict[str, Any]:
    """Random parameters, drawn exactly as diffusers' FlaxAutoencoderKL.init_weights(rng)."""
    params_rng, _, _ = jax.random.split(rng, 3)  # diffusers also splits off dropout/gaussian
    pixels = jnp.zeros((1, self.in_channels, self.sample_size, self.sample_size), jnp.float32)
    return self.init({"params": params_rng}, pixels)["params"]

  @property
  def scale_factor(self) -> int:
    """Pixels per latent along each side."""
    return scale_factor(self.block_out_channels)


def scale_factor(block_out_channels) -> int:
  """Pixels per latent along each side: every block but the last halves the image."""
  return 2 ** (len(block_out_channels) - 1)


def vae_from_config(config: Mapping[str, Any], **overrides: Any) -> AutoencoderKL:
  """An AutoencoderKL from a diffusers vae/config.json dict (plus field overrides, e.g. dtype).

  Bookkeeping keys ("_class_name", ...) are skipped, PyTorch-only options are accepted at the
  values this module implements; anything else is a ValueError naming the key.
  """
  fields = {f for f in AutoencoderKL.__dataclass_fields__ if f not in ("parent", "name")}
  kwargs = {}
  for key, value in {**config, **overrides}.items():
    if key.startswith("_") or key in _IGNORED_OPTIONS:
      continue
    if key in _FIXED_OPTIONS:
      if value not in _FIXED_OPTIONS[key]:
        raise ValueError(f"vae config: {key}={value!r} is not supported (only "
                         f"{' or '.join(repr(v) for v in _FIXED_OPTIONS[key])})")
      continue
    if key not in fields:
      raise ValueError(f"vae config: unknown key {key!r}")
    kwargs[key] = tuple(value) if isinstance(value, list) else value
  for key, block in (("down_block_types", DOWN_BLOCK), ("up_block_types", UP_BLOCK)):
    other = [t for t in kwargs.get(key, ()) if t != block]
    if other:
      raise ValueError(f"vae config: {key} {other[0]!r} is not supported (only {block})")
  return AutoencoderKL(**kwargs)
