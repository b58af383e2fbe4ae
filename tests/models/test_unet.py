"""Our Flax UNet against its oracles: diffusers' FlaxUNet2DConditionModel and the PyTorch
UNet2DConditionModel, on tiny SD 1.x / 2.x / XL-shaped configs with random weights.

Compilations of a UNet (the slow part): per config one forward+gradient of ours and one of
diffusers' Flax module (6), one torch_numerics forward (SD1) and one chunked-attention + remat
forward+gradient (SDXL): 8 in all. Everything else is traced (eval_shape) or runs in PyTorch.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from dreambooth_jax.models import attention
from dreambooth_jax.models.unet import UNet2DConditionModel, unet_from_config
from tests.models.tiny_configs import UNET_SD1, UNET_SD2, UNET_SDXL

CONFIGS = {"sd1": UNET_SD1, "sd2": UNET_SD2, "sdxl": UNET_SDXL}
# Text lengths: the full 77 tokens, and a shorter one for SD2.
TOKENS = {"sd1": 77, "sd2": 20, "sdxl": 77}
ARCHITECTURES = os.path.join(os.path.dirname(__file__), "..", "..", "dreambooth_jax",
                             "architectures")

# SDXL base's unet/config.json (stabilityai/stable-diffusion-xl-base-1.0), as the hub has it.
SDXL_BASE_UNET = {
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.19.0.dev0",
    "act_fn": "silu", "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280], "center_input_sample": False,
    "class_embed_type": None, "class_embeddings_concat": False, "conv_in_kernel": 3,
    "conv_out_kernel": 3, "cross_attention_dim": 2048, "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1, "dual_cross_attention": False, "encoder_hid_dim": None,
    "encoder_hid_dim_type": None, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
    "layers_per_block": 2, "mid_block_only_cross_attention": None, "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05, "norm_num_groups": 32,
    "num_attention_heads": None, "num_class_embeds": None, "only_cross_attention": False,
    "out_channels": 4, "projection_class_embeddings_input_dim": 2816,
    "resnet_out_scale_factor": 1.0, "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default", "sample_size": 128, "time_cond_proj_dim": None,
    "time_embedding_act_fn": None, "time_embedding_dim": None,
    "time_embedding_type": "positional", "timestep_post_act": None,
    "transformer_layers_per_block": [1, 2, 10], "up_block_types": [
        "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None, "use_linear_projection": True}


def _quiet_diffusers():
  from diffusers.utils import logging as diffusers_logging  # pylint: disable=g-import-not-at-top
  diffusers_logging.set_verbosity_error()
  logging.getLogger("diffusers").setLevel(logging.ERROR)


def _random_params(shapes, seed: int):
  """Random weights of a realistic scale (the default init zeroes biases and sets norms to 1,
  which would hide mistakes in them): kernels ~ N(0, 1/fan_in), norm scales ~ 1 + N(0, 0.1^2),
  biases ~ N(0, 0.1^2)."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = path[-1].key
    if name == "kernel":
      values = rng.normal(size=leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
    elif name == "scale":
      values = 1.0 + 0.1 * rng.normal(size=leaf.shape)
    else:
      values = 0.1 * rng.normal(size=leaf.shape)
    return values.astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def _to_torch_state_dict(params) -> dict:
  """Flax UNet params -> PyTorch state dict: list indices "_N" become ".N" (except in
  linear_1/linear_2), kernels are transposed to PyTorch's layouts, LayerNorm/GroupNorm scale
  becomes weight."""
  import torch  # pylint: disable=g-import-not-at-top
  state = {}
  for path, value in flatten_dict(params).items():
    names = [n if n.startswith("linear_") else re.sub(r"_(\d+)$", r".\1", n) for n in path[:-1]]
    leaf = path[-1]
    value = np.asarray(value)
    if leaf == "kernel":
      value = np.transpose(value, (3, 2, 0, 1)) if value.ndim == 4 else value.T
      leaf = "weight"
    elif leaf == "scale":
      leaf = "weight"
    state[".".join(names + [leaf])] = torch.from_numpy(np.ascontiguousarray(value))
  return state


def _jit(function):
  """jax.jit with LLVM's optimisations off on CPU: halves the compile time of these tiny UNets,
  most of this file's run time. Each op still rounds in float32; only programs that XLA fuses
  differently (remat) may round differently, by a few 1e-6 at the output here."""
  if jax.default_backend() == "cpu":
    return jax.jit(function, compiler_options={"xla_backend_optimization_level": 0})
  return jax.jit(function)


def _max_abs(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def _tree_max_abs_diff(a, b) -> float:
  return max(jax.tree.leaves(jax.tree.map(_max_abs, a, b)))


def _tree_max_abs(a) -> float:
  return max(float(np.max(np.abs(leaf))) for leaf in jax.tree.leaves(a))


@dataclasses.dataclass
class Case:
  """One config: our module, random params and inputs, and our forward output and gradients."""
  name: str
  config: dict
  unet: UNet2DConditionModel
  params: dict
  inputs: tuple  # (sample, timesteps, encoder_hidden_states, added_cond_kwargs)
  cotangent: np.ndarray
  out: np.ndarray
  grads: dict

  def output_and_grads(self, apply):
    """Output and d/dparams of sum(output * cotangent) for apply(params, *inputs) (one jit)."""
    def loss(params):
      out = apply(params, *self.inputs)
      return jnp.sum(out * self.cotangent), out

    (_, out), grads = _jit(jax.value_and_grad(loss, has_aux=True))(self.params)
    return np.asarray(out), jax.tree.map(np.asarray, grads)


def _inputs(config: dict, tokens: int, seed: int):
  rng = np.random.default_rng(seed)
  sample = rng.normal(size=(2, 4, 8, 8)).astype(np.float32)
  timesteps = np.array([10, 901], np.int32)
  encoder_states = rng.normal(size=(2, tokens, config["cross_attention_dim"])).astype(np.float32)
  added = None
  if config.get("addition_embed_type") == "text_time":
    text_width = config["projection_class_embeddings_input_dim"] - 6 * config[
        "addition_time_embed_dim"]
    added = {"text_embeds": rng.normal(size=(2, text_width)).astype(np.float32),
             # original size, crop top-left, target size (SDXL's micro-conditioning)
             "time_ids": np.array([[1024, 1024, 0, 0, 1024, 1024],
                                   [512, 768, 16, 32, 1024, 1024]], np.float32)}
  # jax arrays: diffusers' Flax UNet wraps anything else (a numpy array too) in a new axis.
  return jax.tree.map(jnp.asarray, (sample, timesteps, encoder_states, added))


@pytest.fixture(scope="module", params=list(CONFIGS))
def case(request) -> Case:
  name = request.param
  config = CONFIGS[name]
  unet = unet_from_config(config)
  params = _random_params(jax.eval_shape(unet.init_weights, jax.random.key(0)), seed=1)
  inputs = _inputs(config, TOKENS[name], seed=2)
  cotangent = np.random.default_rng(3).normal(size=inputs[0].shape).astype(np.float32)
  without_results = Case(name, config, unet, params, inputs, cotangent, out=None, grads=None)
  out, grads = without_results.output_and_grads(
      lambda p, *args: unet.apply({"params": p}, *args))
  return dataclasses.replace(without_results, out=out, grads=grads)


@pytest.fixture(scope="module")
def flax_reference(case):
  """diffusers' Flax UNet on the same params and inputs: (output, gradients)."""
  _quiet_diffusers()
  from diffusers import FlaxUNet2DConditionModel  # pylint: disable=g-import-not-at-top
  reference = FlaxUNet2DConditionModel(**case.config)
  return case.output_and_grads(lambda p, *args: reference.apply({"params": p}, *args).sample)


def _torch_output(case: Case, *, flax_numerics: bool) -> np.ndarray:
  """The PyTorch UNet's output on case's params and inputs.

  flax_numerics: patch the PyTorch model's two deliberate numeric differences from diffusers'
  Flax port (exact vs tanh GELU in the GEGLU feed-forwards, GroupNorm eps 1e-6 vs 1e-5 in the
  Transformer2D blocks) so that it computes what our default (torch_numerics=False) does.
  """
  _quiet_diffusers()
  import diffusers  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  model = diffusers.UNet2DConditionModel(**case.config).eval()
  model.load_state_dict(_to_torch_state_dict(case.params), strict=True)
  if flax_numerics:
    for module in model.modules():
      if isinstance(module, diffusers.models.transformers.transformer_2d.Transformer2DModel):
        module.norm.eps = 1e-5
      if isinstance(module, diffusers.models.activations.GEGLU):
        module.gelu = lambda gate: F.gelu(gate, approximate="tanh")
  sample, timesteps, encoder_states, added = jax.tree.map(
      lambda x: torch.from_numpy(np.array(x)), case.inputs)
  with torch.no_grad():
    out = model(sample, timesteps, encoder_states, added_cond_kwargs=added).sample
  return out.numpy()


def test_param_tree_matches_diffusers_flax(case):
  _quiet_diffusers()
  from diffusers import FlaxUNet2DConditionModel  # pylint: disable=g-import-not-at-top
  rng = jax.random.key(0)
  ours = flatten_dict(jax.eval_shape(case.unet.init_weights, rng))
  theirs = flatten_dict(jax.eval_shape(FlaxUNet2DConditionModel(**case.config).init_weights, rng))
  assert sorted(ours) == sorted(theirs)
  assert {k: (v.shape, v.dtype) for k, v in ours.items()} == {
      k: (v.shape, v.dtype) for k, v in theirs.items()}


def test_forward_matches_diffusers_flax(case, flax_reference):
  reference_out, _ = flax_reference
  assert case.out.shape == case.inputs[0].shape
  assert np.max(np.abs(case.out)) > 0.1  # a real signal, not a dead network
  assert _max_abs(case.out, reference_out) <= 1e-5  # measured: <= 1e-6


def test_gradients_match_diffusers_flax(case, flax_reference):
  _, reference_grads = flax_reference
  scale = _tree_max_abs(reference_grads)  # ~20 here
  assert scale > 1.0
  # Asserted: every gradient entry within 5e-6 x the largest gradient entry of the tree.
  # Measured: <= 1.2e-6 x (SD2: 2.8e-5 at a largest entry of 23). That is float32 rounding, not a
  # different function: run in float64, ours and diffusers' gradients agree to 2e-6 (both keep
  # the attention softmax in float32), and in float32 each is ~3.5e-5 from the float64 run.
  assert _tree_max_abs_diff(case.grads, reference_grads) <= 5e-6 * scale


def test_forward_matches_pytorch(case):
  # Everything but the two documented numeric differences (see _torch_output) at 1e-5.
  assert _max_abs(case.out, _torch_output(case, flax_numerics=True)) <= 1e-5  # measured ~5e-6
  # And those differences are real: our default (= diffusers' Flax) is ~4e-4 from PyTorch.
  assert _max_abs(case.out, _torch_output(case, flax_numerics=False)) > 1e-5


def test_torch_numerics_matches_pytorch(case):
  if case.name != "sd1":
    pytest.skip("one config is enough: the flag only swaps GELU and a GroupNorm epsilon")
  unet = case.unet.clone(torch_numerics=True)
  out = _jit(lambda p, *args: unet.apply({"params": p}, *args))(case.params, *case.inputs)
  assert _max_abs(out, _torch_output(case, flax_numerics=False)) <= 1e-5  # measured ~4e-6


def test_chunked_attention_and_remat_match(case):
  if case.name != "sdxl":
    pytest.skip("one config (the deepest transformers, 77 tokens = 4 chunks + padding)")
  # Chunks of 16 split the 64 image tokens at 8x8 into 4 query and 4 key chunks, and the 77
  # text tokens into 5 key chunks with 3 padded keys; remat=True wraps every block.
  unet = case.unet.clone(attention_implementation="chunked", attention_chunk_size=16, remat=True)
  out, grads = case.output_and_grads(lambda p, *args: unet.apply({"params": p}, *args))
  # Both are float32 rounding, not 1e-6 as for a single attention (the next test): measured
  # 3.2e-6 at the output (outputs up to 1.9), gradients 2.1e-6 x the largest entry (5.3e-5 at
  # 25.7). Each change alone: chunked 1.9e-6 / 5.1e-5; remat 2.6e-6 / 5.5e-5 under _jit's
  # unoptimised compile, 0 / 9e-6 under a default jax.jit (remat's fusion then rounds alike).
  assert _max_abs(out, case.out) <= 1e-5
  assert _tree_max_abs_diff(grads, case.grads) <= 5e-6 * _tree_max_abs(case.grads)


def test_text_time_requires_added_cond_kwargs():
  unet = unet_from_config(UNET_SDXL)
  sample, timesteps, encoder_states, _ = _inputs(UNET_SDXL, 4, seed=0)
  params = jax.eval_shape(unet.init_weights, jax.random.key(0))
  with pytest.raises(ValueError, match="text_embeds"):
    jax.eval_shape(lambda p: unet.apply({"params": p}, sample, timesteps, encoder_states), params)


def test_half_precision_compute_keeps_float32_params():
  unet = unet_from_config(UNET_SDXL, dtype=jnp.bfloat16, attention_implementation="chunked")
  params = jax.eval_shape(unet.init_weights, jax.random.key(0))
  assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
  inputs = _inputs(UNET_SDXL, 77, seed=0)
  out = jax.eval_shape(lambda p: unet.apply({"params": p}, *inputs), params)
  assert (out.shape, out.dtype) == (inputs[0].shape, jnp.bfloat16)


@pytest.mark.parametrize("name, parameter_count", [("sd15", 859_520_964),
                                                   ("sd21", 865_910_724)])
def test_unet_from_config_reads_shipped_configs(name, parameter_count):
  with open(os.path.join(ARCHITECTURES, f"{name}.json")) as f:
    config = json.load(f)["unet"]
  unet = unet_from_config(config, dtype=jnp.bfloat16, remat=True)
  assert unet.block_out_channels == (320, 640, 1280, 1280)
  assert unet.cross_attention_dim == config["cross_attention_dim"]
  assert unet.attention_head_dim == (8 if name == "sd15" else (5, 10, 20, 20))
  assert unet.use_linear_projection == (name == "sd21")
  assert (unet.dtype, unet.remat) == (jnp.bfloat16, True)
  shapes = jax.eval_shape(unet.init_weights, jax.random.key(0))  # traced, not materialised
  assert sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(shapes)) == parameter_count


def test_unet_from_config_reads_sdxl_base_config():
  unet = unet_from_config(SDXL_BASE_UNET)
  assert unet.transformer_layers_per_block == (1, 2, 10)
  assert unet.attention_head_dim == (5, 10, 20)
  assert unet.added_cond_widths() == (1280, 6)  # pooled OpenCLIP bigG text, 6 time ids


def test_unet_from_config_reads_pytorch_config():
  """The PyTorch model's full config (every key, at its default) gives the same module."""
  _quiet_diffusers()
  import diffusers  # pylint: disable=g-import-not-at-top
  full = dict(diffusers.UNet2DConditionModel.from_config(UNET_SDXL).config)
  assert len(full) > 40
  assert unet_from_config(full) == unet_from_config(UNET_SDXL)


@pytest.mark.parametrize("key, value", [
    ("class_embed_type", "timestep"), ("time_cond_proj_dim", 256), ("attention_type", "gated"),
    ("act_fn", "gelu"), ("norm_num_groups", 16), ("resnet_time_scale_shift", "scale_shift"),
    ("addition_embed_type", "text"), ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
    ("transformer_layers_per_block", [[1, 1], [2, 2]]), ("dropout", 0.1),
    ("not_a_unet_key", 1)])
def test_unet_from_config_refuses_what_it_cannot_honour(key, value):
  with pytest.raises(ValueError) as error:
    unet_from_config({**UNET_SD1, key: value})
  message = str(error.value)
  assert f"{key}={value!r}" in message and "\n" not in message


def test_unet_from_config_refuses_unknown_override():
  with pytest.raises(ValueError, match="use_memory_efficient_attention"):
    unet_from_config(UNET_SD1, use_memory_efficient_attention=True)


# Attention on its own (small compilations, no UNet).


def _qkv(query_length: int, key_length: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  shape = lambda length: (2, length, 3, 8)  # [batch, length, heads, head_dim]
  return (jnp.asarray(2 * rng.normal(size=shape(query_length)), jnp.float32),
          jnp.asarray(2 * rng.normal(size=shape(key_length)), jnp.float32),
          jnp.asarray(rng.normal(size=shape(key_length)), jnp.float32))


def _numpy_attention(query, key, value) -> np.ndarray:
  """The textbook formula in float64: the truth both float32 implementations round."""
  query, key, value = (np.asarray(x, np.float64) for x in (query, key, value))
  scores = np.einsum("bqhd,bkhd->bhqk", query, key) / np.sqrt(query.shape[-1])
  weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
  weights /= weights.sum(axis=-1, keepdims=True)
  return np.einsum("bhqk,bkhd->bqhd", weights, value)


def test_chunked_attention_matches_xla_with_ragged_chunks():
  query, key, value = _qkv(37, 29)  # neither length a multiple of the chunk

  def loss_and_grads(implementation):
    def loss(q, k, v):
      out = attention.dot_product_attention(q, k, v, implementation=implementation,
                                            chunk_size=8)
      return jnp.sum(jnp.sin(out)), out
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(query, key, value)

  (_, expected), expected_grads = loss_and_grads("xla")
  (_, out), grads = loss_and_grads("chunked")
  truth = _numpy_attention(query, key, value)
  assert out.shape == query.shape
  # Measured: 7e-7 apart, 1.1e-6 (xla) and 1.2e-6 (chunked) from the float64 truth, at outputs
  # up to 2.8; gradients 1.4e-6 apart at entries up to 6.3. (With float64 inputs the chunked
  # form equals the formula to 4e-15: what remains is float32 rounding.)
  assert _max_abs(out, expected) <= 1e-6
  assert _max_abs(out, truth) <= 3e-6 and _max_abs(expected, truth) <= 3e-6
  assert _tree_max_abs_diff(grads, expected_grads) <= 1e-6 * _tree_max_abs(expected_grads)


def _autodiff_softmax_attention(query, key, value):
  """The "xla" path with jax's own softmax gradient, which keeps the float32 weights."""
  q, k, v = (jnp.swapaxes(x, 1, 2) for x in (query, key, value))
  q = q * jnp.asarray(1.0 / np.sqrt(q.shape[-1]), q.dtype)
  weights = jax.nn.softmax(jnp.einsum("bhqd,bhkd->bhqk", q, k).astype(jnp.float32), axis=-1)
  return jnp.swapaxes(jnp.einsum("bhqk,bhkd->bhqd", weights.astype(v.dtype), v), 1, 2)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_xla_attention_backward_keeps_weights_in_the_compute_dtype(dtype):
  """Same gradient as autodiff of the float32 softmax; in bf16 the backward pass holds the
  bf16 weights instead of float32 ones (SD 1.5 at 512 px: 0.9 GiB less per device)."""
  rng = np.random.default_rng(0)
  query, key, value = (jnp.asarray(rng.normal(size=(2, 256, 4, 16)), dtype) for _ in range(3))

  def compiled_grad(attend):
    loss = lambda q, k, v: jnp.sum(jnp.sin(attend(q, k, v).astype(jnp.float32)))
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(query, key, value).compile()

  ours = compiled_grad(attention.dot_product_attention)
  autodiff = compiled_grad(_autodiff_softmax_attention)
  grads, expected = ours(query, key, value), autodiff(query, key, value)
  scale = _tree_max_abs(expected)
  # Measured: 3.6e-7 apart in float32 at entries up to 3.8; in bf16 one rounding step of the
  # weights (0.016 at entries up to 4.7, bf16 keeping 8 bits of mantissa).
  assert _tree_max_abs_diff(grads, expected) <= (1e-6 if dtype == "float32" else 1e-2) * scale
  saved = (ours.memory_analysis().temp_size_in_bytes,
           autodiff.memory_analysis().temp_size_in_bytes)
  weights_bytes = 2 * 4 * 256 * 256 * 4  # [batch, heads, query, key] in float32
  if dtype == "float32":
    assert abs(saved[0] - saved[1]) < weights_bytes // 4  # nothing to save in float32
  else:  # measured: 4.7 MB against 6.8 MB, the float32 weights' 2.1 MB less
    assert saved[1] - saved[0] >= weights_bytes * 3 // 4


def test_chunked_attention_keeps_half_precision_dtype():
  query, key, value = (x.astype(jnp.bfloat16) for x in _qkv(16, 16))
  out = jax.eval_shape(lambda q, k, v: attention.dot_product_attention(
      q, k, v, implementation="chunked", chunk_size=4), query, key, value)
  assert out.dtype == jnp.bfloat16 and out.shape == query.shape


def test_attention_refuses_cudnn_off_gpu_and_unknown_names():
  query, key, value = _qkv(4, 4)
  if jax.default_backend() != "gpu":
    with pytest.raises(ValueError, match="cudnn.*GPU"):
      attention.dot_product_attention(query, key, value, implementation="cudnn")
  with pytest.raises(ValueError, match="float16 or bfloat16|GPU"):
    attention.dot_product_attention(query, key, value, implementation="cudnn")
  with pytest.raises(ValueError, match="flash"):
    attention.dot_product_attention(query, key, value, implementation="flash")
  assert attention.ATTENTION_IMPLEMENTATIONS == ("xla", "cudnn", "chunked")
