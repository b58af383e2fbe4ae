"""DINO's image network: a ViT encoder in linen, loading transformers' Flax ViT weights as they are.

The DreamBooth evaluation embeds images with DINO ViT-S/16 (`facebook/dino-vits16`): the CLS
token of the last hidden state, after the final LayerNorm, without transformers' pooler.
transformers 5 dropped its Flax classes, so this is our own module. Its parameter tree is the
one `FlaxViTModel(config, add_pooling_layer=False).params` has (the same names, nesting and
shapes), so Flax checkpoints saved by transformers 4.x plug in unchanged.

The module is inference only (no dropout) and, like `FlaxViTModel.__call__`, takes pixels NCHW.
The helpers at the bottom (activations, multi-head attention, reading config.json) are shared
with the CLIP vision tower in `clip_vision.py`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

# hidden_act names of transformers configs, with the functions transformers' Flax models used.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),  # erf form, as PyTorch's
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),  # OpenAI CLIP's
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


class ViTOutput(NamedTuple):
  last_hidden_state: jax.Array  # [B, 1 + patches, hidden], CLS first, after the final LayerNorm


class ViTModel(nn.Module):
  """transformers' ViTModel without its pooler (the form DINO is used in).

  Fields are ViTConfig's keys of the same names; `dtype` is the compute dtype (the
  parameters stay as given, float32 from a checkpoint).
  """
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = "gelu"
  layer_norm_eps: float = 1e-12
  image_size: int = 224
  patch_size: int = 16
  num_channels: int = 3
  qkv_bias: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, pixel_values: jax.Array) -> ViTOutput:
    """pixel_values: [B, num_channels, image_size, image_size], normalised as the model expects."""
    x = _ViTEmbeddings(self.hidden_size, self.image_size, self.patch_size, self.num_channels,
                       self.dtype, name="embeddings")(pixel_values)
    block = _BlockSpec(self.hidden_size, self.num_attention_heads, self.intermediate_size,
                       self.hidden_act, self.layer_norm_eps, self.qkv_bias, self.dtype)
    x = _ViTEncoder(block, self.num_hidden_layers, name="encoder")(x)
    x = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name="layernorm")(x)
    return ViTOutput(last_hidden_state=x)


class _ViTEmbeddings(nn.Module):
  """Patch projection, a learned CLS token in front, learned absolute positions added."""
  hidden_size: int
  image_size: int
  patch_size: int
  num_channels: int
  dtype: Any

  @nn.compact
  def __call__(self, pixel_values: jax.Array) -> jax.Array:
    grid = self.image_size // self.patch_size
    patches = _PatchProjection(self.hidden_size, self.patch_size, self.num_channels, grid,
                               self.dtype, name="patch_embeddings")(pixel_values)
    cls_token = self.param("cls_token", nn.initializers.truncated_normal(0.02),
                           (1, 1, self.hidden_size))
    positions = self.param("position_embeddings", nn.initializers.truncated_normal(0.02),
                           (1, grid * grid + 1, self.hidden_size))
    cls_tokens = jnp.broadcast_to(cls_token.astype(self.dtype),
                                  (patches.shape[0], 1, self.hidden_size))
    return jnp.concatenate([cls_tokens, patches], axis=1) + positions.astype(self.dtype)


class _PatchProjection(nn.Module):
  """NCHW pixels -> [B, grid*grid, hidden] by a strided patch convolution (named `projection`)."""
  hidden_size: int
  patch_size: int
  num_channels: int
  grid: int
  dtype: Any

  @nn.compact
  def __call__(self, pixel_values: jax.Array) -> jax.Array:
    return patch_tokens(pixel_values, self.hidden_size, self.patch_size, self.num_channels,
                        self.grid, True, self.dtype, "projection")


def patch_tokens(pixel_values: jax.Array, hidden_size: int, patch_size: int, num_channels: int,
                 grid: int, use_bias: bool, dtype: Any, conv_name: str) -> jax.Array:
  """Inside a compact method: [B, grid*grid, hidden] patch tokens of NCHW pixels (row-major).

  The convolution becomes a child of the calling module, named `conv_name`.

  The image must be exactly grid*patch_size square, as the learned positions are for that grid
  (neither transformers' Flax ViT nor its CLIP interpolated them).
  """
  if pixel_values.ndim != 4 or pixel_values.shape[1] != num_channels:
    raise ValueError(f"expected pixel_values [batch, {num_channels}, height, width] (NCHW), got "
                     f"shape {tuple(pixel_values.shape)}")
  side = grid * patch_size
  if pixel_values.shape[2:] != (side, side):
    raise ValueError(f"expected {side}x{side} images (image_size of the config), got "
                     f"{pixel_values.shape[2]}x{pixel_values.shape[3]}")
  x = jnp.transpose(pixel_values, (0, 2, 3, 1))  # the conv runs NHWC, as transformers' did
  x = nn.Conv(hidden_size, (patch_size, patch_size), strides=(patch_size, patch_size),
              padding="VALID", use_bias=use_bias, dtype=dtype, name=conv_name)(x)
  return x.reshape(x.shape[0], grid * grid, hidden_size)


@dataclasses.dataclass(frozen=True)
class _BlockSpec:
  """What one transformer block needs of the ViTModel's fields."""
  hidden_size: int
  num_attention_heads: int
  intermediate_size: int
  hidden_act: str
  layer_norm_eps: float
  qkv_bias: bool
  dtype: Any


class _ViTEncoder(nn.Module):
  """The layer stack; transformers nests it as encoder/layer/<i>, kept for the weights' sake."""
  block: _BlockSpec
  num_layers: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return _ViTLayerStack(self.block, self.num_layers, name="layer")(x)


class _ViTLayerStack(nn.Module):
  block: _BlockSpec
  num_layers: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i in range(self.num_layers):
      x = _ViTLayer(self.block, name=str(i))(x)
    return x


class _ViTLayer(nn.Module):
  """Pre-LayerNorm transformer block: x + attention(LN(x)), then x + MLP(LN(x))."""
  block: _BlockSpec

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.block
    h = nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=c.dtype, name="layernorm_before")(x)
    x = x + _ViTAttention(c, name="attention")(h)
    h = nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=c.dtype, name="layernorm_after")(x)
    h = ACTIVATIONS[c.hidden_act](_OneDense(c.intermediate_size, c.dtype, name="intermediate")(h))
    return x + _OneDense(c.hidden_size, c.dtype, name="output")(h)


class _ViTAttention(nn.Module):
  """Self-attention: q/k/v under `attention`, the output projection under `output/dense`."""
  block: _BlockSpec

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.block
    attended = _ViTSelfAttention(c, name="attention")(x)
    return _OneDense(c.hidden_size, c.dtype, name="output")(attended)


class _ViTSelfAttention(nn.Module):
  block: _BlockSpec

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.block
    q, k, v = (nn.Dense(c.hidden_size, use_bias=c.qkv_bias, dtype=c.dtype, name=name)(x)
               for name in ("query", "key", "value"))
    return multi_head_attention(q, k, v, c.num_attention_heads)


class _OneDense(nn.Module):
  """A Dense named `dense` one level down: how transformers' ViT nests its projections."""
  features: int
  dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return nn.Dense(self.features, dtype=self.dtype, name="dense")(x)


# --------------------------------------------------------------------------------------------
# Shared with clip_vision.py.

def multi_head_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                         num_heads: int) -> jax.Array:
  """Unmasked scaled dot-product attention of [B, L, D] projections split into `num_heads`.

  jax.nn.dot_product_attention takes [batch, length, heads, head_dim] and always runs its
  softmax in float32, whatever the compute dtype.
  """
  batch, length, width = query.shape
  def split(x):
    return x.reshape(batch, x.shape[1], num_heads, width // num_heads)
  attended = jax.nn.dot_product_attention(split(query), split(key), split(value))
  return attended.reshape(batch, length, width)


def read_config(config: Mapping[str, Any], defaults: Mapping[str, Any],
                what: str) -> dict[str, Any]:
  """The values of `defaults`' keys in a transformers config dict (its default where absent).

  Other keys (dropout rates, initialisers, pooler and head settings, hub bookkeeping) do not
  change the evaluation network and are ignored. A value of the wrong kind, a non-positive
  size, an unknown activation or heads that do not divide the width is refused by a
  ValueError of one line naming the key.
  """
  values = {}
  for key, default in defaults.items():
    value = config.get(key, default)
    if isinstance(default, bool):
      ok = isinstance(value, bool)
    elif isinstance(default, int):
      ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
    elif isinstance(default, float):
      ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
      value = float(value) if ok else value
    else:
      ok = isinstance(value, str)
    if not ok:
      raise ValueError(f"{what}: unsupported {key}={value!r} (expected a "
                       f"{'positive ' if type(default) in (int, float) else ''}"
                       f"{type(default).__name__})")
    values[key] = value
  if values["hidden_act"] not in ACTIVATIONS:
    raise ValueError(f"{what}: unsupported hidden_act={values['hidden_act']!r} (supported: "
                     f"{', '.join(sorted(ACTIVATIONS))})")
  if values["hidden_size"] % values["num_attention_heads"]:
    raise ValueError(f"{what}: num_attention_heads={values['num_attention_heads']} does not "
                     f"divide hidden_size={values['hidden_size']}")
  if values["patch_size"] > values["image_size"]:
    raise ValueError(f"{what}: patch_size={values['patch_size']} is larger than "
                     f"image_size={values['image_size']}")
  return values


def check_model_type(config: Mapping[str, Any], accepted: tuple[str, ...], what: str) -> None:
  found = config.get("model_type", accepted[0])
  if found not in accepted:
    raise ValueError(f"{what}: unsupported model_type={found!r} (expected "
                     f"{' or '.join(map(repr, accepted))})")


_VIT_DEFAULTS = {  # ViTConfig's defaults
    "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
    "intermediate_size": 3072, "hidden_act": "gelu", "layer_norm_eps": 1e-12,
    "image_size": 224, "patch_size": 16, "num_channels": 3, "qkv_bias": True,
}


def vit_from_config(config: Mapping[str, Any], dtype: Any = jnp.float32) -> ViTModel:
  """A ViTModel from a transformers ViT config.json dict (e.g. facebook/dino-vits16's)."""
  check_model_type(config, ("vit",), "ViT config")
  return ViTModel(**read_config(config, _VIT_DEFAULTS, "ViT config"), dtype=dtype)
