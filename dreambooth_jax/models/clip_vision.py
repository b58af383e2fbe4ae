"""CLIP's image tower and projection in linen, taking transformers' Flax CLIP weights as they are.

The DreamBooth evaluation's CLIP-I and CLIP-T scores use `openai/clip-vit-large-patch14`'s
projected embeddings. This module is the image half: patches and a learned class embedding,
positions added, a LayerNorm before the encoder (transformers spells its parameter
`pre_layrnorm`), pre-LayerNorm blocks, `post_layernorm` of the class token, then
`visual_projection`. Its parameter tree is `{"vision_model": ..., "visual_projection": ...}`
exactly as in `FlaxCLIPModel(config).params`, so those two subtrees of a transformers 4.x Flax
CLIP checkpoint plug in unchanged. The text half comes from the project's CLIP text module.

Inference only (no dropout); pixels NCHW, as `FlaxCLIPModel.get_image_features` took them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from dreambooth_jax.models.vit import (ACTIVATIONS, check_model_type, multi_head_attention,
                                       patch_tokens, read_config)


class CLIPVisionOutput(NamedTuple):
  image_embeds: jax.Array  # [B, projection_dim], projected, not normalised
  last_hidden_state: jax.Array  # [B, 1 + patches, hidden], the encoder's (no post LayerNorm)
  pooler_output: jax.Array  # [B, hidden], post_layernorm of the class token


class CLIPVisionModelWithProjection(nn.Module):
  """transformers' CLIPVisionModelWithProjection; fields are CLIPVisionConfig's keys."""
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  num_channels: int = 3
  image_size: int = 224
  patch_size: int = 32
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  projection_dim: int = 512
  dtype: Any = jnp.float32  # compute dtype; parameters stay as given

  @nn.compact
  def __call__(self, pixel_values: jax.Array) -> CLIPVisionOutput:
    """pixel_values: [B, num_channels, image_size, image_size], CLIP-normalised."""
    last_hidden_state, pooled = CLIPVisionTransformer(
        self.hidden_size, self.intermediate_size, self.num_hidden_layers,
        self.num_attention_heads, self.num_channels, self.image_size, self.patch_size,
        self.hidden_act, self.layer_norm_eps, self.dtype, name="vision_model")(pixel_values)
    image_embeds = nn.Dense(self.projection_dim, use_bias=False, dtype=self.dtype,
                            name="visual_projection")(pooled)
    return CLIPVisionOutput(image_embeds, last_hidden_state, pooled)


class CLIPVisionTransformer(nn.Module):
  """The tower without the projection: (last hidden state, post-LayerNormed class token)."""
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  num_channels: int
  image_size: int
  patch_size: int
  hidden_act: str
  layer_norm_eps: float
  dtype: Any

  @nn.compact
  def __call__(self, pixel_values: jax.Array) -> tuple[jax.Array, jax.Array]:
    x = _CLIPVisionEmbeddings(self.hidden_size, self.image_size, self.patch_size,
                              self.num_channels, self.dtype, name="embeddings")(pixel_values)
    x = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name="pre_layrnorm")(x)
    x = _CLIPEncoder(self.hidden_size, self.intermediate_size, self.num_hidden_layers,
                     self.num_attention_heads, self.hidden_act, self.layer_norm_eps, self.dtype,
                     name="encoder")(x)
    pooled = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype,
                          name="post_layernorm")(x[:, 0])
    return x, pooled


class _CLIPVisionEmbeddings(nn.Module):
  """Bias-free patch convolution, the class embedding in front, learned positions added."""
  hidden_size: int
  image_size: int
  patch_size: int
  num_channels: int
  dtype: Any

  @nn.compact
  def __call__(self, pixel_values: jax.Array) -> jax.Array:
    grid = self.image_size // self.patch_size
    patches = patch_tokens(pixel_values, self.hidden_size, self.patch_size, self.num_channels,
                           grid, False, self.dtype, "patch_embedding")
    class_embedding = self.param("class_embedding", nn.initializers.normal(0.02),
                                 (self.hidden_size,))
    positions = nn.Embed(grid * grid + 1, self.hidden_size, dtype=self.dtype,
                         name="position_embedding")(jnp.arange(grid * grid + 1))
    class_tokens = jnp.broadcast_to(class_embedding.astype(self.dtype),
                                    (patches.shape[0], 1, self.hidden_size))
    return jnp.concatenate([class_tokens, patches], axis=1) + positions


class _CLIPEncoder(nn.Module):
  """The blocks, nested encoder/layers/<i> as in transformers."""
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  hidden_act: str
  layer_norm_eps: float
  dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return _CLIPLayerStack(self.hidden_size, self.intermediate_size, self.num_hidden_layers,
                           self.num_attention_heads, self.hidden_act, self.layer_norm_eps,
                           self.dtype, name="layers")(x)


class _CLIPLayerStack(_CLIPEncoder):
  """The encoder's fields; this level holds the blocks, named by their index."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i in range(self.num_hidden_layers):
      x = _CLIPEncoderLayer(self.hidden_size, self.intermediate_size, self.num_attention_heads,
                            self.hidden_act, self.layer_norm_eps, self.dtype, name=str(i))(x)
    return x


class _CLIPEncoderLayer(nn.Module):
  """x + self_attn(layer_norm1(x)), then x + mlp(layer_norm2(x))."""
  hidden_size: int
  intermediate_size: int
  num_attention_heads: int
  hidden_act: str
  layer_norm_eps: float
  dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name="layer_norm1")(x)
    x = x + _CLIPSelfAttention(self.hidden_size, self.num_attention_heads, self.dtype,
                               name="self_attn")(h)
    h = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name="layer_norm2")(x)
    return x + _CLIPMLP(self.hidden_size, self.intermediate_size, self.hidden_act, self.dtype,
                        name="mlp")(h)


class _CLIPSelfAttention(nn.Module):
  """Unmasked: every patch sees every patch (only the text tower is causal)."""
  hidden_size: int
  num_attention_heads: int
  dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    q, k, v = (nn.Dense(self.hidden_size, dtype=self.dtype, name=name)(x)
               for name in ("q_proj", "k_proj", "v_proj"))
    attended = multi_head_attention(q, k, v, self.num_attention_heads)
    return nn.Dense(self.hidden_size, dtype=self.dtype, name="out_proj")(attended)


class _CLIPMLP(nn.Module):
  hidden_size: int
  intermediate_size: int
  hidden_act: str
  dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = ACTIVATIONS[self.hidden_act](nn.Dense(self.intermediate_size, dtype=self.dtype,
                                              name="fc1")(x))
    return nn.Dense(self.hidden_size, dtype=self.dtype, name="fc2")(h)


_CLIP_VISION_DEFAULTS = {  # CLIPVisionConfig's defaults
    "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "num_channels": 3, "image_size": 224, "patch_size": 32,
    "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "projection_dim": 512,
}


def clip_vision_from_config(config: Mapping[str, Any],
                            dtype: Any = jnp.float32) -> CLIPVisionModelWithProjection:
  """The image tower of a transformers CLIP config.json dict.

  Takes a whole CLIPConfig (e.g. openai/clip-vit-large-patch14's: its `vision_config` and its
  top-level `projection_dim`, which is what FlaxCLIPModel projects to) or a CLIPVisionConfig.
  """
  check_model_type(config, ("clip", "clip_vision_model"), "CLIP config")
  if "vision_config" in config or config.get("model_type") == "clip":
    vision = dict(config.get("vision_config") or {})
    vision.pop("projection_dim", None)  # the whole model's projection_dim is the one used
    vision["projection_dim"] = config.get("projection_dim",
                                          _CLIP_VISION_DEFAULTS["projection_dim"])
    check_model_type(vision, ("clip_vision_model",), "CLIP vision_config")
  else:
    vision = config
  return CLIPVisionModelWithProjection(
      **read_config(vision, _CLIP_VISION_DEFAULTS, "CLIP vision config"), dtype=dtype)
