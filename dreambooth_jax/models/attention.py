"""Multi-head dot-product attention shared by every transformer block of our models.

One entry point so that the attention kernel is a config choice, not a property of each model:
plain XLA ops, cuDNN flash attention on GPUs (jax.nn.dot_product_attention), or a
memory-efficient chunked form of our own for long sequences on backends without a fused kernel.
All three take and return [batch, length, heads, head_dim] arrays (jax.nn.dot_product_attention's
layout, so callers reshape but never transpose) and compute the softmax in float32.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

ATTENTION_IMPLEMENTATIONS = ("xla", "cudnn", "chunked")

_CUDNN_DTYPES = (jnp.float16, jnp.bfloat16)


def dot_product_attention(query: jax.Array, key: jax.Array, value: jax.Array, *,
                          implementation: str = "xla", chunk_size: int = 1024) -> jax.Array:
  """softmax(query key^T / sqrt(head_dim)) value, without masks.

  Args:
    query: [batch, query_length, heads, head_dim].
    key: [batch, key_length, heads, head_dim].
    value: [batch, key_length, heads, head_dim].
    implementation: one of ATTENTION_IMPLEMENTATIONS.
      "xla": plain XLA ops (einsum, float32 softmax, einsum); XLA fuses what its backend can.
      "cudnn": cuDNN flash attention (GPU only, float16/bfloat16 inputs).
      "chunked": our online-softmax form that holds at most chunk_size x chunk_size scores
        per (batch, head) at a time, for sequences whose full score matrix does not fit.
    chunk_size: query and key chunk length of "chunked" (ignored by the others).

  Returns:
    [batch, query_length, heads, head_dim] in query's dtype.

  Raises:
    ValueError: at trace time, for an unknown implementation, or "cudnn" off GPU or with a
      dtype cuDNN's kernel does not take.
  """
  if implementation == "xla":
    return _xla_attention(query, key, value)
  if implementation == "cudnn":
    backend = jax.default_backend()
    if backend != "gpu":
      raise ValueError(f'attention implementation "cudnn" needs a GPU, but the backend is '
                       f'{backend!r}; use "xla" or "chunked"')
    if query.dtype not in _CUDNN_DTYPES:
      raise ValueError(f'attention implementation "cudnn" takes float16 or bfloat16, got '
                       f'{query.dtype}; set a half-precision compute dtype or use "xla"')
    return jax.nn.dot_product_attention(query, key, value, implementation="cudnn")
  if implementation == "chunked":
    if chunk_size < 1:
      raise ValueError(f"attention chunk_size must be positive, got {chunk_size}")
    return _chunked_attention(query, key, value, chunk_size)
  raise ValueError(f"unknown attention implementation {implementation!r}; expected one of "
                   f"{', '.join(ATTENTION_IMPLEMENTATIONS)}")


def _xla_attention(query: jax.Array, key: jax.Array, value: jax.Array) -> jax.Array:
  """Plain XLA ops, with the heads moved in front of the sequence so that both products are
  batched matmuls over contiguous [length, head_dim] blocks.

  jax.nn.dot_product_attention's own XLA path contracts in the [B, L, H, D] layout; on CPU
  that made the tiny UNet's forward pass 1.5x slower (71 ms against 46 ms, batch 8, 16x16
  latents), with the backward pass unchanged. The softmax runs in float32, as there.
  """
  q, k, v = (jnp.swapaxes(x, 1, 2) for x in (query, key, value))  # [B, H, L, D]
  q = q * jnp.asarray(1.0 / math.sqrt(q.shape[-1]), q.dtype)
  scores = jnp.einsum("bhqd,bhkd->bhqk", q, k)
  weights = _softmax_in_float32(scores)
  return jnp.swapaxes(jnp.einsum("bhqk,bhkd->bhqd", weights, v), 1, 2)


@jax.custom_vjp
def _softmax_in_float32(scores: jax.Array) -> jax.Array:
  """Softmax over the last axis computed in float32, returned in the scores' dtype.

  Its own backward pass keeps the returned weights, in that dtype, for the gradient: autodiff
  of softmax(scores.astype(float32)) would keep the float32 weights, the largest array of a
  bf16 step (SD 1.5 at 512 px: +0.9 GiB of temporaries per device, `plan`'s first row). In
  float32 both are the same.
  """
  return jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(scores.dtype)


def _softmax_forward(scores: jax.Array) -> tuple[jax.Array, jax.Array]:
  weights = _softmax_in_float32(scores)
  return weights, weights


def _softmax_backward(weights: jax.Array, grad: jax.Array) -> tuple[jax.Array]:
  w, g = weights.astype(jnp.float32), grad.astype(jnp.float32)
  return ((w * (g - jnp.sum(g * w, axis=-1, keepdims=True))).astype(weights.dtype),)


_softmax_in_float32.defvjp(_softmax_forward, _softmax_backward)


def _pad_length(x: jax.Array, length: int) -> jax.Array:
  """Zero-pads axis 1 (the sequence) up to length."""
  if x.shape[1] == length:
    return x
  return jnp.pad(x, [(0, 0), (0, length - x.shape[1])] + [(0, 0)] * (x.ndim - 2))


def _split_chunks(x: jax.Array, chunk: int) -> jax.Array:
  """[B, n * chunk, ...] -> [n, B, chunk, ...], the leading axis for lax.map/scan."""
  batch, length = x.shape[:2]
  x = x.reshape((batch, length // chunk, chunk) + x.shape[2:])
  return jnp.moveaxis(x, 1, 0)


def _chunked_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                       chunk_size: int) -> jax.Array:
  """Attention over query chunks, each reading the keys chunk by chunk with an online softmax.

  For each query chunk we keep a running row maximum, a running softmax denominator and a
  running weighted sum of values (float32, or float64 for float64 inputs), rescaling them
  whenever a later key chunk raises the maximum (Milakov & Gimelshein 2018; Rabe & Staats
  2021). The key step is rematerialised so that the backward pass, too, never stores a chunk's
  score matrix. Sequence lengths need not divide chunk_size: padded keys are masked out, padded
  queries dropped.
  """
  batch, query_length, heads, head_dim = query.shape
  key_length = key.shape[1]
  query_chunk = min(chunk_size, query_length)
  key_chunk = min(chunk_size, key_length)
  padded_query_length = math.ceil(query_length / query_chunk) * query_chunk
  padded_key_length = math.ceil(key_length / key_chunk) * key_chunk

  # Scaled once here, as the "xla" path does, rather than every chunk of scores.
  query = query * jnp.asarray(1.0 / math.sqrt(head_dim), query.dtype)
  query_chunks = _split_chunks(_pad_length(query, padded_query_length), query_chunk)
  key_chunks = _split_chunks(_pad_length(key, padded_key_length), key_chunk)
  value_chunks = _split_chunks(_pad_length(value, padded_key_length), key_chunk)
  key_is_real = (jnp.arange(padded_key_length) < key_length).reshape(-1, key_chunk)
  # float32 for half-precision inputs (float64 ones stay float64).
  accumulate = jnp.promote_types(query.dtype, jnp.float32)

  @functools.partial(jax.checkpoint, prevent_cse=False)
  def read_key_chunk(query_block, carry, chunk):
    weighted_values, denominator, running_max = carry
    keys, values, is_real = chunk
    scores = jnp.einsum("bqhd,bkhd->bqhk", query_block, keys, preferred_element_type=accumulate)
    scores = jnp.where(is_real, scores, -jnp.inf)
    # The result does not depend on the shift, so no gradient needs to flow through it.
    new_max = jax.lax.stop_gradient(jnp.maximum(running_max, scores.max(axis=-1)))
    rescale = jnp.exp(running_max - new_max)
    weights = jnp.exp(scores - new_max[..., None])
    denominator = denominator * rescale + weights.sum(axis=-1)
    weighted_values = weighted_values * rescale[..., None] + jnp.einsum(
        "bqhk,bkhd->bqhd", weights.astype(values.dtype), values,
        preferred_element_type=accumulate)
    return (weighted_values, denominator, new_max), None

  def attend(query_block):
    rows = (batch, query_chunk, heads)
    init = (jnp.zeros(rows + (head_dim,), accumulate), jnp.zeros(rows, accumulate),
            jnp.full(rows, -jnp.inf, accumulate))
    (weighted_values, denominator, _), _ = jax.lax.scan(
        functools.partial(read_key_chunk, query_block), init,
        (key_chunks, value_chunks, key_is_real))
    return (weighted_values / denominator[..., None]).astype(query.dtype)

  out = jax.lax.map(attend, query_chunks)  # [n_query_chunks, B, query_chunk, H, D]
  out = jnp.moveaxis(out, 0, 1).reshape(batch, padded_query_length, heads, head_dim)
  return out[:, :query_length]
