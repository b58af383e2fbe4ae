"""Our Flax (linen) conditional UNet for Stable Diffusion 1.x, 2.x and SDXL.

The parameter tree is the one diffusers' FlaxUNet2DConditionModel builds (same nested names and
shapes), so Flax weights, checkpoints and exports written by the diffusers-based code load
unchanged. What we add over that module: a choice of attention kernel (models.attention),
optional rematerialisation of every ResNet and transformer block for training at large batch,
and a strict config reader that refuses what it cannot honour instead of ignoring it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dreambooth_jax.models.attention import ATTENTION_IMPLEMENTATIONS, dot_product_attention

Dtype = Any

_CROSS_ATTN_DOWN = "CrossAttnDownBlock2D"
_PLAIN_DOWN = "DownBlock2D"
_CROSS_ATTN_UP = "CrossAttnUpBlock2D"
_PLAIN_UP = "UpBlock2D"
_CROSS_ATTN_MID = "UNetMidBlock2DCrossAttn"

# GroupNorm everywhere has 32 groups, as in every Stable Diffusion UNet.
_NORM_GROUPS = 32
_NORM_EPS = 1e-5


def sinusoidal_embedding(positions: jax.Array, dim: int, *, flip_sin_to_cos: bool,
                         freq_shift: float, max_period: float = 10000.0) -> jax.Array:
  """[N] scalars -> [N, dim] float32 sines and cosines at geometrically spaced frequencies."""
  half = dim // 2
  exponent = -math.log(max_period) / (half - freq_shift)
  frequencies = jnp.exp(jnp.arange(half, dtype=jnp.float32) * exponent)
  angles = positions.astype(jnp.float32)[:, None] * frequencies[None, :]
  parts = (jnp.cos(angles), jnp.sin(angles)) if flip_sin_to_cos else (jnp.sin(angles),
                                                                     jnp.cos(angles))
  return jnp.concatenate(parts, axis=-1)


class TimestepEmbedding(nn.Module):
  """Two-layer MLP lifting the sinusoidal features to the block's embedding width."""
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.Dense(self.features, dtype=self.dtype, name="linear_1")(x)
    return nn.Dense(self.features, dtype=self.dtype, name="linear_2")(nn.silu(x))


def _conv3x3(features: int, dtype: Dtype, name: str, stride: int = 1) -> nn.Conv:
  return nn.Conv(features, kernel_size=(3, 3), strides=(stride, stride),
                 padding=((1, 1), (1, 1)), dtype=dtype, name=name)


class ResnetBlock2D(nn.Module):
  """GroupNorm-SiLU-conv twice, the time embedding added in between, plus a skip path."""
  out_channels: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, temb: jax.Array) -> jax.Array:
    h = nn.GroupNorm(_NORM_GROUPS, epsilon=_NORM_EPS, dtype=self.dtype, name="norm1")(x)
    h = _conv3x3(self.out_channels, self.dtype, "conv1")(nn.silu(h))
    time_shift = nn.Dense(self.out_channels, dtype=self.dtype, name="time_emb_proj")(nn.silu(temb))
    h = h + time_shift[:, None, None, :]
    h = nn.GroupNorm(_NORM_GROUPS, epsilon=_NORM_EPS, dtype=self.dtype, name="norm2")(h)
    h = _conv3x3(self.out_channels, self.dtype, "conv2")(nn.silu(h))
    if x.shape[-1] != self.out_channels:
      x = nn.Conv(self.out_channels, kernel_size=(1, 1), padding="VALID", dtype=self.dtype,
                  name="conv_shortcut")(x)
    return h + x


class Attention(nn.Module):
  """Multi-head attention; self-attention when context is None."""
  heads: int
  head_dim: int
  implementation: str = "xla"
  chunk_size: int = 1024
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
    context = x if context is None else context
    inner = self.heads * self.head_dim

    def project(name: str, source: jax.Array) -> jax.Array:
      projected = nn.Dense(inner, use_bias=False, dtype=self.dtype, name=name)(source)
      return projected.reshape(source.shape[:2] + (self.heads, self.head_dim))

    attended = dot_product_attention(project("to_q", x), project("to_k", context),
                                     project("to_v", context),
                                     implementation=self.implementation,
                                     chunk_size=self.chunk_size)
    attended = attended.reshape(x.shape[:2] + (inner,))
    return nn.Dense(x.shape[-1], dtype=self.dtype, name="to_out_0")(attended)


class _GegluProjection(nn.Module):
  """One Dense to twice the hidden width; half of it gates the other half through a GELU."""
  hidden: int
  exact_gelu: bool
  dtype: Dtype

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    projected = nn.Dense(self.hidden * 2, dtype=self.dtype, name="proj")(x)
    value, gate = jnp.split(projected, 2, axis=-1)
    return value * nn.gelu(gate, approximate=not self.exact_gelu)


class FeedForward(nn.Module):
  """Gated-GELU MLP with a 4x hidden width (the only feed-forward SD UNets use)."""
  exact_gelu: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    hidden = _GegluProjection(x.shape[-1] * 4, self.exact_gelu, self.dtype, name="net_0")(x)
    return nn.Dense(x.shape[-1], dtype=self.dtype, name="net_2")(hidden)


@dataclasses.dataclass(frozen=True)
class _Options:
  """UNet-wide settings every block needs, passed down as one hashable field."""
  dtype: Dtype
  attention_implementation: str
  attention_chunk_size: int
  use_linear_projection: bool
  torch_numerics: bool
  remat: bool


class TransformerBlock(nn.Module):
  """Pre-norm self-attention, cross-attention to the text, and a GEGLU feed-forward."""
  heads: int
  head_dim: int
  only_cross_attention: bool
  options: _Options

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
    o = self.options

    def attention(name: str) -> Attention:
      return Attention(self.heads, self.head_dim, o.attention_implementation,
                       o.attention_chunk_size, o.dtype, name=name)

    def norm(name: str) -> nn.LayerNorm:
      return nn.LayerNorm(epsilon=_NORM_EPS, dtype=o.dtype, name=name)

    # With only_cross_attention the first attention, too, reads the text rather than the image.
    first_context = context if self.only_cross_attention else None
    x = x + attention("attn1")(norm("norm1")(x), first_context)
    x = x + attention("attn2")(norm("norm2")(x), context)
    return x + FeedForward(o.torch_numerics, o.dtype, name="ff")(norm("norm3")(x))


_RematResnetBlock2D = nn.remat(ResnetBlock2D)
_RematTransformerBlock = nn.remat(TransformerBlock)


class Transformer2D(nn.Module):
  """GroupNorm, projection to tokens, `depth` transformer blocks, projection back, residual."""
  heads: int
  depth: int
  only_cross_attention: bool
  options: _Options

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
    o = self.options
    batch, height, width, channels = x.shape
    if channels % self.heads:
      raise ValueError(f"a transformer over {channels} channels cannot have {self.heads} heads")
    # The PyTorch UNet (like the original LDM) uses eps 1e-6 here; diffusers' Flax port 1e-5.
    eps = 1e-6 if o.torch_numerics else _NORM_EPS
    h = nn.GroupNorm(_NORM_GROUPS, epsilon=eps, dtype=o.dtype, name="norm")(x)
    if o.use_linear_projection:
      h = nn.Dense(channels, dtype=o.dtype, name="proj_in")(h.reshape(batch, -1, channels))
    else:
      h = nn.Conv(channels, kernel_size=(1, 1), padding="VALID", dtype=o.dtype,
                  name="proj_in")(h).reshape(batch, -1, channels)
    block_class = _RematTransformerBlock if o.remat else TransformerBlock
    for i in range(self.depth):
      h = block_class(self.heads, channels // self.heads, self.only_cross_attention, o,
                      name=f"transformer_blocks_{i}")(h, context)
    if o.use_linear_projection:
      h = nn.Dense(channels, dtype=o.dtype, name="proj_out")(h).reshape(x.shape)
    else:
      h = nn.Conv(channels, kernel_size=(1, 1), padding="VALID", dtype=o.dtype,
                  name="proj_out")(h.reshape(x.shape))
    return h + x


def _resnet(out_channels: int, o: _Options, name: str) -> nn.Module:
  block_class = _RematResnetBlock2D if o.remat else ResnetBlock2D
  return block_class(out_channels, o.dtype, name=name)


class DownBlock(nn.Module):
  """ResNet (+ transformer) layers at one resolution, then an optional stride-2 conv.

  Returns the block's output and every intermediate state the up path concatenates back.
  """
  out_channels: int
  num_layers: int
  heads: int | None  # None: no attention (diffusers' DownBlock2D)
  transformer_depth: int
  only_cross_attention: bool
  add_downsample: bool
  options: _Options

  @nn.compact
  def __call__(self, x: jax.Array, temb: jax.Array,
               context: jax.Array) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    skips = ()
    for i in range(self.num_layers):
      x = _resnet(self.out_channels, self.options, f"resnets_{i}")(x, temb)
      if self.heads is not None:
        x = Transformer2D(self.heads, self.transformer_depth, self.only_cross_attention,
                          self.options, name=f"attentions_{i}")(x, context)
      skips += (x,)
    if self.add_downsample:
      x = _Resample(self.out_channels, "down", self.options.dtype, name="downsamplers_0")(x)
      skips += (x,)
    return x, skips


class UpBlock(nn.Module):
  """Per layer: concatenate a skip from the down path, ResNet (+ transformer); then upsample."""
  out_channels: int
  num_layers: int
  heads: int | None  # None: no attention (diffusers' UpBlock2D)
  transformer_depth: int
  only_cross_attention: bool
  add_upsample: bool
  options: _Options

  @nn.compact
  def __call__(self, x: jax.Array, skips: Sequence[jax.Array], temb: jax.Array,
               context: jax.Array) -> jax.Array:
    for i, skip in enumerate(reversed(skips)):
      x = jnp.concatenate([x, skip], axis=-1)
      x = _resnet(self.out_channels, self.options, f"resnets_{i}")(x, temb)
      if self.heads is not None:
        x = Transformer2D(self.heads, self.transformer_depth, self.only_cross_attention,
                          self.options, name=f"attentions_{i}")(x, context)
    if self.add_upsample:
      x = _Resample(self.out_channels, "up", self.options.dtype, name="upsamplers_0")(x)
    return x


class MidBlock(nn.Module):
  """ResNet, transformer, ResNet at the lowest resolution (diffusers' UNetMidBlock2DCrossAttn)."""
  heads: int
  transformer_depth: int
  options: _Options

  @nn.compact
  def __call__(self, x: jax.Array, temb: jax.Array, context: jax.Array) -> jax.Array:
    channels = x.shape[-1]
    x = _resnet(channels, self.options, "resnets_0")(x, temb)
    x = Transformer2D(self.heads, self.transformer_depth, False, self.options,
                      name="attentions_0")(x, context)
    return _resnet(channels, self.options, "resnets_1")(x, temb)


class _Resample(nn.Module):
  """Stride-2 3x3 conv ("down"), or nearest-neighbour 2x upsampling then a 3x3 conv ("up")."""
  out_channels: int
  direction: str
  dtype: Dtype

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.direction == "up":
      x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
      return _conv3x3(self.out_channels, self.dtype, "conv")(x)
    return _conv3x3(self.out_channels, self.dtype, "conv", stride=2)(x)


def _per_block(value: Any, count: int, key: str) -> tuple:
  """A config value given once for all blocks or once per block, as a per-block tuple."""
  if isinstance(value, (list, tuple)):
    if len(value) != count:
      raise ValueError(f"{key}={list(value)} needs one entry per down block ({count})")
    return tuple(value)
  return (value,) * count


class UNet2DConditionModel(nn.Module):
  """Stable Diffusion's conditional UNet: noisy latents, timesteps and text states -> a
  prediction of the latents' shape (epsilon or v: the UNet does not care which).

  Fields carry diffusers' config.json names and meanings (see unet_from_config), plus:
    dtype: compute dtype (parameters stay float32).
    attention_implementation: one of models.attention.ATTENTION_IMPLEMENTATIONS.
    attention_chunk_size: query/key chunk length of the "chunked" attention.
    remat: recompute each ResNet and transformer block's activations in the backward pass
      (less memory, about a third more compute); the parameter tree is unchanged.
    torch_numerics: use the PyTorch UNet's (and the original LDM's) exact GELU and 1e-6
      transformer GroupNorm epsilon instead of diffusers' Flax port's tanh-approximated GELU
      and 1e-5. False reproduces FlaxUNet2DConditionModel; the two differ by ~3e-4 at the
      output of tiny random models (outputs ~2).

  Note diffusers' historical naming: when num_attention_heads is None, attention_head_dim is
  the number of attention heads per block (not their width), as in every SD config.json.
  diffusers refuses num_attention_heads itself; we take it as the head count it names.
  """
  sample_size: int = 32
  in_channels: int = 4
  out_channels: int = 4
  down_block_types: tuple[str, ...] = (_CROSS_ATTN_DOWN, _CROSS_ATTN_DOWN, _CROSS_ATTN_DOWN,
                                       _PLAIN_DOWN)
  up_block_types: tuple[str, ...] = (_PLAIN_UP, _CROSS_ATTN_UP, _CROSS_ATTN_UP, _CROSS_ATTN_UP)
  mid_block_type: str | None = _CROSS_ATTN_MID
  only_cross_attention: bool | tuple[bool, ...] = False
  block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
  layers_per_block: int = 2
  attention_head_dim: int | tuple[int, ...] = 8
  num_attention_heads: int | tuple[int, ...] | None = None
  cross_attention_dim: int = 1280
  use_linear_projection: bool = False
  flip_sin_to_cos: bool = True
  freq_shift: int = 0
  transformer_layers_per_block: int | tuple[int, ...] = 1
  addition_embed_type: str | None = None
  addition_time_embed_dim: int | None = None
  projection_class_embeddings_input_dim: int | None = None
  dtype: Dtype = jnp.float32
  attention_implementation: str = "xla"
  attention_chunk_size: int = 512
  remat: bool = False
  torch_numerics: bool = False

  def _check(self) -> None:
    """Raises ValueError for a structure this module cannot build (at trace time)."""
    blocks = len(self.block_out_channels)
    if len(self.down_block_types) != blocks or len(self.up_block_types) != blocks:
      raise ValueError(f"down_block_types, up_block_types and block_out_channels need equal "
                       f"lengths, got {len(self.down_block_types)}, {len(self.up_block_types)} "
                       f"and {blocks}")
    for key, value, known in (("down_block_types", self.down_block_types,
                               (_CROSS_ATTN_DOWN, _PLAIN_DOWN)),
                              ("up_block_types", self.up_block_types,
                               (_CROSS_ATTN_UP, _PLAIN_UP))):
      for block_type in value:
        if block_type not in known:
          raise ValueError(f"{key} entry {block_type!r} is not supported (only "
                           f"{' and '.join(known)})")
    if self.mid_block_type not in (_CROSS_ATTN_MID, None):
      raise ValueError(f"mid_block_type={self.mid_block_type!r} is not supported (only "
                       f"{_CROSS_ATTN_MID} or null)")
    if self.addition_embed_type not in (None, "text_time"):
      raise ValueError(f"addition_embed_type={self.addition_embed_type!r} is not supported "
                       f"(only text_time or null)")
    if self.addition_embed_type == "text_time" and self.addition_time_embed_dim is None:
      raise ValueError("addition_embed_type='text_time' needs addition_time_embed_dim")
    if self.attention_implementation not in ATTENTION_IMPLEMENTATIONS:
      raise ValueError(f"attention_implementation={self.attention_implementation!r}: expected "
                       f"one of {', '.join(ATTENTION_IMPLEMENTATIONS)}")

  @nn.compact
  def __call__(self, sample: jax.Array, timesteps: jax.Array | float | int,
               encoder_hidden_states: jax.Array,
               added_cond_kwargs: Mapping[str, jax.Array] | None = None) -> jax.Array:
    """Predicts noise (or v) for sample [B, C, H, W] (NCHW, as diffusers' UNets take it).

    Args:
      sample: noisy latents [B, in_channels, H, W]; H and W divisible by 2**(blocks - 1).
      timesteps: [B], [1] or a scalar.
      encoder_hidden_states: text encoder states [B, tokens, cross_attention_dim].
      added_cond_kwargs: with addition_embed_type="text_time" (SDXL), {"text_embeds": pooled
        text [B, D], "time_ids": micro-conditioning [B, 6] (5 for the refiner)}.

    Returns:
      [B, out_channels, H, W] in the compute dtype.
    """
    self._check()
    count = len(self.block_out_channels)
    heads = _per_block(self.num_attention_heads if self.num_attention_heads is not None
                       else self.attention_head_dim, count, "attention_head_dim")
    depths = _per_block(self.transformer_layers_per_block, count, "transformer_layers_per_block")
    cross_only = _per_block(self.only_cross_attention, count, "only_cross_attention")
    options = _Options(self.dtype, self.attention_implementation, self.attention_chunk_size,
                       self.use_linear_projection, self.torch_numerics, self.remat)
    batch = sample.shape[0]

    # Time (and SDXL's pooled-text and micro-conditioning) embedding.
    timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (batch,))
    time_features = sinusoidal_embedding(timesteps, self.block_out_channels[0],
                                         flip_sin_to_cos=self.flip_sin_to_cos,
                                         freq_shift=self.freq_shift)
    embed_width = self.block_out_channels[0] * 4
    temb = TimestepEmbedding(embed_width, self.dtype, name="time_embedding")(time_features)
    if self.addition_embed_type == "text_time":
      if not added_cond_kwargs or "text_embeds" not in added_cond_kwargs or (
          "time_ids" not in added_cond_kwargs):
        raise ValueError('addition_embed_type="text_time" needs added_cond_kwargs with '
                         '"text_embeds" and "time_ids"')
      text_embeds = added_cond_kwargs["text_embeds"]
      time_ids = jnp.asarray(added_cond_kwargs["time_ids"])
      time_id_features = sinusoidal_embedding(time_ids.reshape(-1), self.addition_time_embed_dim,
                                              flip_sin_to_cos=self.flip_sin_to_cos,
                                              freq_shift=self.freq_shift)
      added = jnp.concatenate([text_embeds, time_id_features.reshape(text_embeds.shape[0], -1)],
                              axis=-1)
      temb = temb + TimestepEmbedding(embed_width, self.dtype, name="add_embedding")(added)

    x = jnp.transpose(sample, (0, 2, 3, 1))
    x = _conv3x3(self.block_out_channels[0], self.dtype, "conv_in")(x)

    skips = (x,)
    for i, block_type in enumerate(self.down_block_types):
      x, block_skips = DownBlock(
          self.block_out_channels[i], self.layers_per_block,
          heads[i] if block_type == _CROSS_ATTN_DOWN else None, depths[i], cross_only[i],
          add_downsample=i < count - 1, options=options, name=f"down_blocks_{i}")(
              x, temb, encoder_hidden_states)
      skips += block_skips

    if self.mid_block_type is not None:
      x = MidBlock(heads[-1], depths[-1], options, name="mid_block")(x, temb,
                                                                    encoder_hidden_states)

    for i, block_type in enumerate(self.up_block_types):
      level = count - 1 - i  # the down block this up block mirrors
      layers = self.layers_per_block + 1  # one skip per layer, taken back in reverse order
      block_skips, skips = skips[-layers:], skips[:-layers]
      x = UpBlock(
          self.block_out_channels[level], layers,
          heads[level] if block_type == _CROSS_ATTN_UP else None, depths[level],
          cross_only[level], add_upsample=i < count - 1, options=options,
          name=f"up_blocks_{i}")(x, block_skips, temb, encoder_hidden_states)

    x = nn.GroupNorm(_NORM_GROUPS, epsilon=_NORM_EPS, dtype=self.dtype, name="conv_norm_out")(x)
    x = _conv3x3(self.out_channels, self.dtype, "conv_out")(nn.silu(x))
    return jnp.transpose(x, (0, 3, 1, 2))

  def added_cond_widths(self) -> tuple[int, int] | None:
    """(text_embeds width, number of time_ids) the text_time embedding expects, else None.

    Read back from projection_class_embeddings_input_dim as diffusers does: the SDXL refiner
    has 5 micro-conditioning numbers and a pooled text as wide as cross_attention_dim, the
    base model 6.
    """
    if self.addition_embed_type != "text_time":
      return None
    total = self.projection_class_embeddings_input_dim
    is_refiner = 5 * self.addition_time_embed_dim + self.cross_attention_dim == total
    num_time_ids = 5 if is_refiner else 6
    return total - num_time_ids * self.addition_time_embed_dim, num_time_ids

  def init_weights(self, rng: jax.Array) -> dict:
    """Fresh parameters, from the same dummy inputs and rng split as diffusers' init_weights."""
    sample = jnp.zeros((1, self.in_channels, self.sample_size, self.sample_size), jnp.float32)
    timesteps = jnp.ones((1,), jnp.int32)
    encoder_hidden_states = jnp.zeros((1, 1, self.cross_attention_dim), jnp.float32)
    added_cond_kwargs = None
    widths = self.added_cond_widths()
    if widths is not None:
      added_cond_kwargs = {"text_embeds": jnp.zeros((1, widths[0]), jnp.float32),
                           "time_ids": jnp.zeros((1, widths[1]), jnp.float32)}
    params_rng, dropout_rng = jax.random.split(rng)
    variables = self.init({"params": params_rng, "dropout": dropout_rng}, sample, timesteps,
                          encoder_hidden_states, added_cond_kwargs)
    return variables["params"]


# diffusers' own bookkeeping in config.json.
_BOOKKEEPING_KEYS = frozenset({"_class_name", "_diffusers_version", "_name_or_path",
                               "_use_default_values"})

# Keys that only choose how diffusers' Flax module computes, not what: the same parameters give
# the same function whatever their value, and our attention_implementation / dtype replace them.
_FLAX_RUNTIME_KEYS = frozenset({"use_memory_efficient_attention", "split_head_dim", "dtype"})

# Keys with no effect on the UNet we build (the PyTorch UNet, too, reads none of them for it).
#   upcast_attention: computes attention in float32 in PyTorch; ours always does the softmax so.
#   addition_embed_type_num_heads: used only by addition_embed_type="text".
#   mid_block_only_cross_attention: used only by UNetMidBlock2DSimpleCrossAttn.
_NO_EFFECT_KEYS = frozenset({"upcast_attention", "addition_embed_type_num_heads",
                             "mid_block_only_cross_attention"})

# PyTorch UNet2DConditionModel arguments that diffusers' Flax UNet lacks: accepted only at
# their defaults (the architecture every SD 1.x/2.x/XL config has).
_TORCH_DEFAULTS = {
    "center_input_sample": False,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "dropout": 0.0,
    "act_fn": "silu",
    "norm_num_groups": _NORM_GROUPS,
    "norm_eps": _NORM_EPS,
    "reverse_transformer_layers_per_block": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "dual_cross_attention": False,
    "class_embed_type": None,
    "num_class_embeds": None,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "cross_attention_norm": None,
}

# Fields set by the caller, never read from a diffusers config.
_RUNTIME_FIELDS = ("dtype", "attention_implementation", "attention_chunk_size", "remat",
                   "torch_numerics")


def _as_tuples(value: Any) -> Any:
  """JSON lists -> tuples, so that the module's fields are hashable."""
  if isinstance(value, (list, tuple)):
    return tuple(_as_tuples(v) for v in value)
  return value


def unet_from_config(config: Mapping[str, Any], **overrides: Any) -> UNet2DConditionModel:
  """Builds our UNet from a diffusers UNet config.json dict (PyTorch's or Flax's).

  Args:
    config: the parsed config.json of a UNet2DConditionModel or FlaxUNet2DConditionModel.
    **overrides: our own fields (dtype, attention_implementation, attention_chunk_size, remat,
      torch_numerics) or config keys to replace.

  Raises:
    ValueError: naming the first key whose value this module cannot honour (a class
      embedding, a non-SiLU activation, an asymmetric transformer depth, ...): one that would
      silently give a different network is never dropped.
  """
  fields = {f.name for f in dataclasses.fields(UNet2DConditionModel)} - {"parent", "name"}
  for key in overrides:
    if key not in fields:
      raise ValueError(f"unet_from_config: unknown override {key}={overrides[key]!r}")
  kwargs = {}
  for key, raw in {**config, **overrides}.items():
    value = _as_tuples(raw)
    if key in _BOOKKEEPING_KEYS or key in _FLAX_RUNTIME_KEYS and key not in overrides:
      continue
    if key in _NO_EFFECT_KEYS:
      continue
    if key in _TORCH_DEFAULTS:
      if value != _TORCH_DEFAULTS[key]:
        raise ValueError(f"unet config {key}={raw!r} is not supported (only "
                         f"{_TORCH_DEFAULTS[key]!r})")
      continue
    if key == "time_embedding_dim":  # the PyTorch UNet's override of 4 x block_out_channels[0]
      default = 4 * _as_tuples(config.get("block_out_channels", (320,)))[0]
      if value not in (None, default):
        raise ValueError(f"unet config time_embedding_dim={value!r} is not supported (only "
                         f"{default} or null)")
      continue
    if key in ("layers_per_block", "cross_attention_dim") and isinstance(value, tuple):
      raise ValueError(f"unet config {key}={raw!r} is not supported (only one value "
                       f"for all blocks)")
    if key == "transformer_layers_per_block" and isinstance(value, tuple) and any(
        isinstance(v, tuple) for v in value):
      raise ValueError(f"unet config transformer_layers_per_block={raw!r} is not supported "
                       f"(asymmetric depths)")
    if key == "sample_size" and isinstance(value, tuple):
      if len(set(value)) != 1:
        raise ValueError(f"unet config sample_size={raw!r} is not supported (square "
                         f"only)")
      value = value[0]
    if key not in fields or key in _RUNTIME_FIELDS and key not in overrides:
      raise ValueError(f"unet config key {key}={raw!r} is not supported")
    kwargs[key] = value
  unet = UNet2DConditionModel(**kwargs)
  unet._check()  # pylint: disable=protected-access
  count = len(unet.block_out_channels)
  for key in ("attention_head_dim", "num_attention_heads", "transformer_layers_per_block",
              "only_cross_attention"):
    value = getattr(unet, key)
    if value is not None:
      _per_block(value, count, key)
  if unet.addition_embed_type == "text_time" and unet.projection_class_embeddings_input_dim is None:
    raise ValueError("unet config addition_embed_type='text_time' needs "
                     "projection_class_embeddings_input_dim")
  return unet
