"""Our CLIP text encoders against transformers' Flax modules and PyTorch models (oracles)."""

import ast
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax.traverse_util import flatten_dict
from transformers import (CLIPTextConfig, FlaxCLIPTextModel, FlaxCLIPTextModelWithProjection)
from transformers import CLIPTextModel as TorchCLIPTextModel
from transformers import CLIPTextModelWithProjection as TorchCLIPTextModelWithProjection

from dreambooth_jax.models import clip_text
from tests.models import tiny_configs

TOLERANCE = 1e-5  # fp32, max abs
LEGACY_SD1 = dict(tiny_configs.CLIP_TEXT_SD1, eos_token_id=2)  # the eos_token_id real SD configs have
CONFIGS = {  # name -> (config, architecture)
    "SD1": (tiny_configs.CLIP_TEXT_SD1, "CLIPTextModel"),
    "SD1_LEGACY_EOS": (LEGACY_SD1, "CLIPTextModel"),
    "SD2": (tiny_configs.CLIP_TEXT_SD2, "CLIPTextModel"),
    "SDXL_2": (tiny_configs.CLIP_TEXT_SDXL_2, "CLIPTextModelWithProjection"),
}
BOS, EOS = 998, 999


def _token_ids() -> np.ndarray:
  """Four prompts: EOS-padded (SD 1.x), filling all 77, "!"-padded (SD 2.x), no specials."""
  rng = np.random.RandomState(0)
  ids = rng.randint(1, 990, size=(4, 77)).astype(np.int32)
  ids[:, 0] = BOS
  ids[0, 10:] = EOS
  ids[1, 76] = EOS
  ids[2, 5], ids[2, 6:] = EOS, 0
  ids[3, 0], ids[3, 40] = 3, 995  # no BOS/EOS; the largest id is where the legacy rule pools
  return ids


TOKEN_IDS = _token_ids()


def perturbed(params, key, scale: float = 0.1):
  """Biases and norm parameters (the 1-D leaves, 0 or 1 at init) + scale * N(0, 1)."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(treedef, [
      leaf + scale * jax.random.normal(k, leaf.shape, leaf.dtype) if leaf.ndim == 1 else leaf
      for leaf, k in zip(leaves, keys)])


@functools.cache
def _computed(name: str):
  """(name, config, ours, init params, params, our outputs on TOKEN_IDS), once per config."""
  config, architecture = CONFIGS[name]
  ours = clip_text.text_encoder_from_config(dict(config, architectures=[architecture]))
  init_params = jax.jit(ours.init_weights)(jax.random.PRNGKey(0))
  params = perturbed(init_params, jax.random.PRNGKey(1))
  outputs = jax.jit(ours.apply)({"params": params}, TOKEN_IDS)
  return name, config, ours, init_params, params, outputs


@pytest.fixture(params=sorted(CONFIGS))
def setup(request):
  return _computed(request.param)


def _reference(name, config):
  _, architecture = CONFIGS[name]
  cls = FlaxCLIPTextModel if architecture == "CLIPTextModel" else FlaxCLIPTextModelWithProjection
  return cls(CLIPTextConfig(**config), _do_init=False)


def _run_reference(reference, params, ids):
  ids = jnp.asarray(ids)
  positions = jnp.broadcast_to(jnp.arange(ids.shape[-1]), ids.shape)
  return jax.jit(lambda p, i: reference.module.apply(
      {"params": p}, i, jnp.ones_like(i), positions, output_hidden_states=True))(params, ids)


def _max_abs(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def test_param_tree_and_init_equal_transformers(setup):
  name, config, ours, init_params, _, _ = setup
  # What FlaxCLIPTextModel(config, seed=0).params holds, drawn under jit as ours are (jit and
  # eager sampling may differ in the last bit).
  reference_module = _reference(name, config)
  reference = jax.jit(lambda key: reference_module.init_weights(key, (1, 1)))(
      jax.random.PRNGKey(0))
  assert jax.tree.structure(init_params) == jax.tree.structure(reference)
  assert jax.tree.map(jnp.shape, init_params) == jax.tree.map(jnp.shape, reference)
  assert all(jax.tree.leaves(jax.tree.map(lambda a, b: bool((a == b).all()), init_params,
                                          reference)))
  assert isinstance(ours, clip_text.CLIPTextModelWithProjection) == (name == "SDXL_2")


def test_outputs_equal_transformers_flax(setup):
  name, config, _, _, params, ours = setup
  reference = _run_reference(_reference(name, config), params, TOKEN_IDS)
  assert ours.last_hidden_state.shape == (4, 77, 32)
  assert len(ours.hidden_states) == len(reference.hidden_states) == 3
  assert _max_abs(ours.last_hidden_state, reference.last_hidden_state) <= TOLERANCE
  for mine, theirs in zip(ours.hidden_states, reference.hidden_states):
    assert _max_abs(mine, theirs) <= TOLERANCE
  if name == "SDXL_2":
    assert ours.text_embeds.shape == (4, 32)
    assert _max_abs(ours.text_embeds, reference.text_embeds) <= TOLERANCE
  else:
    assert ours.text_embeds is None
    assert _max_abs(ours.pooled_output, reference.pooler_output) <= TOLERANCE


def test_outputs_equal_pytorch(setup):
  # PyTorch in float64: the exact answer our float32 must be within 1e-5 of.
  name, config, _, _, params, ours = setup
  cls = TorchCLIPTextModelWithProjection if name == "SDXL_2" else TorchCLIPTextModel
  model = cls(CLIPTextConfig(**config)).double().eval()
  _load_into_torch(model, params)
  default_dtype = torch.get_default_dtype()
  # transformers builds its causal mask with torch.full(..., finfo(float64).min) in the
  # default dtype, which must then be float64 too.
  torch.set_default_dtype(torch.float64)
  try:
    with torch.no_grad():
      reference = model(torch.from_numpy(TOKEN_IDS).long(), output_hidden_states=True)
  finally:
    torch.set_default_dtype(default_dtype)
  assert _max_abs(ours.last_hidden_state, reference.last_hidden_state) <= TOLERANCE
  assert _max_abs(ours.hidden_states[-2], reference.hidden_states[-2]) <= TOLERANCE
  assert _max_abs(ours.hidden_states[0], reference.hidden_states[0]) <= TOLERANCE
  if name == "SDXL_2":
    assert _max_abs(ours.text_embeds, reference.text_embeds) <= TOLERANCE
  else:
    assert _max_abs(ours.pooled_output, reference.pooler_output) <= TOLERANCE


def test_pooling_rule(setup):
  """The end token: first EOS for today's configs, the largest id for eos_token_id == 2."""
  name, _, _, _, _, ours = setup
  last = np.asarray(ours.last_hidden_state)
  # Rows: EOS at 10 then EOS padding, EOS at 76, EOS at 5 then "!" (0) padding, no BOS or EOS
  # with its largest id (995) at 40.
  positions = [10, 76, 5, 40] if name == "SD1_LEGACY_EOS" else [10, 76, 5, 0]
  np.testing.assert_array_equal(np.asarray(ours.pooled_output), last[np.arange(4), positions])


def test_shorter_sequences_use_the_first_positions():
  """The toy world's 16-token prompts: positions 0..15, causal attention within them."""
  name, config, ours, _, params, full = _computed("SD1")
  short = jax.jit(ours.apply)({"params": params}, TOKEN_IDS[:, :16])
  # Causal attention: the first 16 positions cannot see the rest, so they agree with the
  # full-length run.
  assert _max_abs(short.last_hidden_state, full.last_hidden_state[:, :16]) <= TOLERANCE
  reference = _run_reference(_reference(name, config), params, TOKEN_IDS[:, :16])
  assert _max_abs(short.pooled_output, reference.pooler_output) <= TOLERANCE


def _load_into_torch(model: torch.nn.Module, params) -> None:
  """Copies a transformers-layout Flax CLIP tree into the PyTorch model, every tensor once."""
  state = {}
  for path, value in flatten_dict(jax.device_get(params)).items():
    *modules, leaf = path
    value = np.array(value, np.float64)
    if leaf == "kernel":
      leaf, value = "weight", value.T
    elif leaf in ("scale", "embedding"):
      leaf = "weight"
    state[".".join([*modules, leaf])] = torch.from_numpy(np.ascontiguousarray(value))
  missing, unexpected = model.load_state_dict(state, strict=False)
  missing = [k for k in missing if not k.endswith("position_ids")]  # a buffer, not a weight
  assert not missing and not unexpected, (missing, unexpected)


# Real text_encoder/config.json files (widths shrunk), as written by the transformers versions
# the SD 1.5, SD 2.1 and SDXL repos were saved with.
SD15_CONFIG_JSON = {
    "_name_or_path": "openai/clip-vit-large-patch14", "architectures": ["CLIPTextModel"],
    "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0, "eos_token_id": 2,
    "hidden_act": "quick_gelu", "hidden_size": 32, "initializer_factor": 1.0,
    "initializer_range": 0.02, "intermediate_size": 37, "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77, "model_type": "clip_text_model", "num_attention_heads": 4,
    "num_hidden_layers": 2, "pad_token_id": 1, "projection_dim": 32, "torch_dtype": "float32",
    "transformers_version": "4.22.0.dev0", "vocab_size": 1000}
SD21_CONFIG_JSON = dict(SD15_CONFIG_JSON, hidden_act="gelu", transformers_version="4.25.0.dev0",
                        _name_or_path="hf-models/stable-diffusion-v2-768x768/text_encoder")
SDXL_2_CONFIG_JSON = dict(SD21_CONFIG_JSON, architectures=["CLIPTextModelWithProjection"],
                          projection_dim=16, dtype="float16", torch_dtype=None)


def test_from_config_reads_real_configs():
  sd15 = clip_text.text_encoder_from_config(SD15_CONFIG_JSON)
  assert type(sd15) is clip_text.CLIPTextModel  # pylint: disable=unidiomatic-typecheck
  assert (sd15.hidden_act, sd15.eos_token_id, sd15.hidden_size) == ("quick_gelu", 2, 32)
  assert sd15.dtype == jnp.float32  # the checkpoint's storage dtype does not set compute dtype
  sd21 = clip_text.text_encoder_from_config(SD21_CONFIG_JSON, dtype=jnp.bfloat16)
  assert sd21.hidden_act == "gelu" and sd21.dtype == jnp.bfloat16
  sdxl = clip_text.text_encoder_from_config(SDXL_2_CONFIG_JSON)
  assert isinstance(sdxl, clip_text.CLIPTextModelWithProjection) and sdxl.projection_dim == 16
  assert sdxl.dtype == jnp.float32


@pytest.mark.parametrize("key, value", [
    ("hidden_act", "relu"), ("architectures", ["CLIPModel"]), ("attention_dropout", 0.1),
    ("dropout", 0.1), ("model_type", "clip_vision_model"), ("rope_theta", 10000.0)])
def test_from_config_refuses_what_it_cannot_honour(key, value):
  with pytest.raises(ValueError, match=key) as error:
    clip_text.text_encoder_from_config(dict(SD15_CONFIG_JSON, **{key: value}))
  assert "\n" not in str(error.value)
