"""CLIP text encoders in Flax linen: the text towers Stable Diffusion conditions on.

One causal pre-norm transformer covers OpenAI CLIP ViT-L/14 (SD 1.x, quick_gelu), OpenCLIP
ViT-H (SD 2.x, gelu) and, with its pooled-token projection, OpenCLIP ViT-bigG (SDXL's second
encoder). Parameter trees are those of transformers' FlaxCLIPTextModel /
FlaxCLIPTextModelWithProjection modules ("text_model", plus "text_projection"), so existing
flax_model.msgpack files load unchanged; with the same RNG, `init_weights` draws the same numbers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

# Before transformers fixed CLIP's configs, eos_token_id was 2 although the real end token is
# the vocabulary's largest id; for such configs the end token is found as the argmax of the ids.
LEGACY_EOS_TOKEN_ID = 2
# config.json keys that only matter to initialisation, to transformers' bookkeeping or (the
# generation defaults older transformers versions wrote into every config) to text
# generation: honoured by ignoring them.
_IGNORED_KEYS = frozenset({
    "architectures", "bos_token_id", "pad_token_id", "initializer_range", "initializer_factor",
    "model_type", "torch_dtype", "dtype", "transformers_version", "output_attentions",
    "output_hidden_states", "return_dict", "use_return_dict", "tie_word_embeddings",
    "is_encoder_decoder", "id2label", "label2id", "problem_type", "tokenizer_class", "prefix",
    "sep_token_id", "decoder_start_token_id", "task_specific_params", "finetuning_task",
    "add_cross_attention", "chunk_size_feed_forward", "pruned_heads", "torchscript",
    "tf_legacy_loss", "use_bfloat16", "cross_attention_hidden_size", "is_decoder",
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups",
    "diversity_penalty", "temperature", "top_k", "top_p", "typical_p", "repetition_penalty",
    "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size",
    "bad_words_ids", "num_return_sequences", "output_scores", "return_dict_in_generate",
    "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
    "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens",
    "_attn_implementation_autoset", "name_or_path"})
_ZERO_DROPOUT_KEYS = ("attention_dropout", "dropout")  # no dropout is implemented
_ARCHITECTURES = ("CLIPTextModel", "CLIPTextModelWithProjection")


def quick_gelu(x: jax.Array) -> jax.Array:
  """OpenAI CLIP's sigmoid approximation of GELU."""
  return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS = {
    "quick_gelu": quick_gelu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # OpenCLIP: exact, erf-based
}

# The initialisers transformers' Flax CLIP uses (jax's `normal()` defaults to stddev 0.01).
_small_normal = jax.nn.initializers.normal(stddev=0.01)


class CLIPTextOutput(NamedTuple):
  """What the text encoders return (a pytree, so it passes through jit)."""
  last_hidden_state: jax.Array  # [B, L, hidden], after the final layer norm
  pooled_output: jax.Array  # [B, hidden]: last_hidden_state at each sequence's end token
  # The embeddings, then each layer's output (the last one before the final layer norm).
  hidden_states: tuple[jax.Array, ...]
  text_embeds: jax.Array | None = None  # [B, projection_dim]; WithProjection only


class _Embeddings(nn.Module):
  vocab_size: int
  max_positions: int
  width: int
  dtype: Any = jnp.float32

  def setup(self):
    self.token_embedding = nn.Embed(self.vocab_size, self.width, embedding_init=_small_normal)
    self.position_embedding = nn.Embed(self.max_positions, self.width,
                                       embedding_init=_small_normal)

  def __call__(self, input_ids: jax.Array) -> jax.Array:
    positions = jnp.arange(input_ids.shape[-1])
    return self.token_embedding(input_ids) + self.position_embedding(positions)[None]


class _CausalSelfAttention(nn.Module):
  width: int
  num_heads: int
  dtype: Any = jnp.float32

  def setup(self):
    if self.width % self.num_heads:
      raise ValueError(f"hidden_size {self.width} is not a multiple of num_attention_heads "
                       f"{self.num_heads}")
    dense = lambda: nn.Dense(self.width, dtype=self.dtype, kernel_init=_small_normal)
    # Created in transformers' order (k, v, q, out); only the names matter for the RNG, but
    # keeping the order costs nothing.
    self.k_proj, self.v_proj, self.q_proj, self.out_proj = dense(), dense(), dense(), dense()

  def __call__(self, x: jax.Array) -> jax.Array:
    batch, length, _ = x.shape
    head_dim = self.width // self.num_heads
    split = lambda t: t.reshape(batch, length, self.num_heads, head_dim)
    queries = split(self.q_proj(x)) * head_dim ** -0.5
    keys, values = split(self.k_proj(x)), split(self.v_proj(x))
    logits = jnp.einsum("bqhd,bkhd->bhqk", queries, keys)
    # Each token sees itself and the tokens before it.
    causal = jnp.tril(jnp.ones((length, length), dtype=bool))
    logits = jnp.where(causal, logits, jnp.finfo(logits.dtype).min)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
    attended = jnp.einsum("bhqk,bkhd->bqhd", weights, values)
    return self.out_proj(attended.reshape(batch, length, self.width))


class _MLP(nn.Module):
  width: int
  hidden: int
  activation: str
  dtype: Any = jnp.float32

  def setup(self):
    self.fc1 = nn.Dense(self.hidden, dtype=self.dtype, kernel_init=_small_normal)
    self.fc2 = nn.Dense(self.width, dtype=self.dtype, kernel_init=_small_normal)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(ACTIVATIONS[self.activation](self.fc1(x)))


class _LayerSpec(NamedTuple):
  """The shape of one transformer layer (hashable, so it can be a module field)."""
  width: int
  hidden: int
  num_heads: int
  activation: str
  eps: float


class _EncoderLayer(nn.Module):
  """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""
  spec: _LayerSpec
  dtype: Any = jnp.float32

  def setup(self):
    spec = self.spec
    self.self_attn = _CausalSelfAttention(spec.width, spec.num_heads, self.dtype)
    self.layer_norm1 = nn.LayerNorm(epsilon=spec.eps, dtype=self.dtype)
    self.mlp = _MLP(spec.width, spec.hidden, spec.activation, self.dtype)
    self.layer_norm2 = nn.LayerNorm(epsilon=spec.eps, dtype=self.dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.self_attn(self.layer_norm1(x))
    return x + self.mlp(self.layer_norm2(x))


class _LayerStack(nn.Module):
  """The layers, named "0", "1", ... (the checkpoint layout: encoder/layers/<i>)."""
  num_layers: int
  spec: _LayerSpec
  dtype: Any = jnp.float32

  def setup(self):
    self.layers = [_EncoderLayer(self.spec, self.dtype, name=str(i))
                   for i in range(self.num_layers)]

  def __call__(self, x: jax.Array) -> tuple[jax.Array, ...]:
    outputs = [x]
    for layer in self.layers:
      outputs.append(layer(outputs[-1]))
    return tuple(outputs)


class _Encoder(nn.Module):
  num_layers: int
  spec: _LayerSpec
  dtype: Any = jnp.float32

  def setup(self):
    self.layers = _LayerStack(self.num_layers, self.spec, self.dtype)

  def __call__(self, x: jax.Array) -> tuple[jax.Array, ...]:
    return self.layers(x)


class _TextTransformer(nn.Module):
  """Token ids -> (final-norm states, pooled end-token state, per-layer states)."""
  vocab_size: int
  max_positions: int
  num_layers: int
  spec: _LayerSpec
  eos_token_id: int
  dtype: Any = jnp.float32

  def setup(self):
    self.embeddings = _Embeddings(self.vocab_size, self.max_positions, self.spec.width,
                                  self.dtype)
    self.encoder = _Encoder(self.num_layers, self.spec, self.dtype)
    self.final_layer_norm = nn.LayerNorm(epsilon=self.spec.eps, dtype=self.dtype)

  def __call__(self, input_ids: jax.Array) -> tuple[jax.Array, jax.Array, tuple[jax.Array, ...]]:
    input_ids = input_ids.astype(jnp.int32)
    hidden_states = self.encoder(self.embeddings(input_ids))
    last = self.final_layer_norm(hidden_states[-1])
    if self.eos_token_id == LEGACY_EOS_TOKEN_ID:
      end = jnp.argmax(input_ids, axis=-1)
    else:  # the first end token (position 0 when there is none, as in transformers)
      end = jnp.argmax(input_ids == self.eos_token_id, axis=-1)
    pooled = jnp.take_along_axis(last, end[:, None, None], axis=1)[:, 0]
    return last, pooled, hidden_states


class CLIPTextModel(nn.Module):
  """CLIP's text tower; fields are transformers' CLIPTextConfig keys.

  Called on int token ids [B, L] (L <= max_position_embeddings, no padding mask: Stable
  Diffusion attends over the padding too) it returns a CLIPTextOutput.
  """
  vocab_size: int = 49408
  hidden_size: int = 512
  intermediate_size: int = 2048
  num_hidden_layers: int = 12
  num_attention_heads: int = 8
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  eos_token_id: int = 49407
  projection_dim: int = 512  # used only by CLIPTextModelWithProjection
  dtype: Any = jnp.float32

  def _check(self) -> None:
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(f"hidden_act {self.hidden_act!r} is not supported (only "
                       f"{', '.join(ACTIVATIONS)})")

  def _text_transformer(self) -> _TextTransformer:
    spec = _LayerSpec(self.hidden_size, self.intermediate_size, self.num_attention_heads,
                      self.hidden_act, self.layer_norm_eps)
    return _TextTransformer(self.vocab_size, self.max_position_embeddings,
                            self.num_hidden_layers, spec, self.eos_token_id, self.dtype)

  def setup(self):
    self._check()
    self.text_model = self._text_transformer()

  def __call__(self, input_ids: jax.Array) -> CLIPTextOutput:
    last, pooled, hidden_states = self.text_model(input_ids)
    return CLIPTextOutput(last, pooled, hidden_states)

  def init_weights(self, rng: jax.Array) -> dict[str, Any]:
    """Random parameters, drawn exactly as transformers' Flax model does from `rng` (which
    is jax.random.PRNGKey(seed) for FlaxCLIPTextModel(config, seed=seed))."""
    params_rng, _ = jax.random.split(rng)  # transformers also splits off a dropout key
    return self.init({"params": params_rng}, jnp.zeros((1, 1), jnp.int32))["params"]


class CLIPTextModelWithProjection(CLIPTextModel):
  """The text tower plus a bias-free projection of the pooled state (`text_embeds`)."""

  def setup(self):
    self._check()
    self.text_model = self._text_transformer()
    self.text_projection = nn.Dense(self.projection_dim, use_bias=False, dtype=self.dtype)

  def __call__(self, input_ids: jax.Array) -> CLIPTextOutput:
    last, pooled, hidden_states = self.text_model(input_ids)
    return CLIPTextOutput(last, pooled, hidden_states, self.text_projection(pooled))


def text_encoder_from_config(config: Mapping[str, Any], **overrides: Any) -> CLIPTextModel:
  """The text encoder a transformers text_encoder/config.json describes (plus field
  overrides, e.g. dtype); the class comes from its "architectures" entry."""
  architectures = list(config.get("architectures") or ["CLIPTextModel"])
  if len(architectures) != 1 or architectures[0] not in _ARCHITECTURES:
    raise ValueError(f"text encoder config: architectures {architectures} is not supported "
                     f"(only one of {', '.join(_ARCHITECTURES)})")
  cls = (CLIPTextModelWithProjection if architectures[0] == "CLIPTextModelWithProjection"
         else CLIPTextModel)
  model_type = config.get("model_type", "clip_text_model")
  if model_type != "clip_text_model":
    raise ValueError(f"text encoder config: model_type {model_type!r} is not supported "
                     "(only 'clip_text_model')")
  fields = {f for f in cls.__dataclass_fields__ if f not in ("parent", "name")}
  kwargs = {}
  for key, value in {**config, **overrides}.items():
    if key in fields and (key != "dtype" or key in overrides):
      kwargs[key] = value
    elif key in _ZERO_DROPOUT_KEYS:
      if value:
        raise ValueError(f"text encoder config: {key}={value!r} is not supported (only 0.0)")
    elif key in _IGNORED_KEYS or key.startswith("_"):
      continue
    else:
      raise ValueError(f"text encoder config: unknown key {key!r}")
  act = kwargs.get("hidden_act", "quick_gelu")
  if act not in ACTIVATIONS:
    raise ValueError(f"text encoder config: hidden_act {act!r} is not supported (only "
                     f"{', '.join(ACTIVATIONS)})")
  return cls(**kwargs)
