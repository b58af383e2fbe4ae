"""Our AutoencoderKL against diffusers' FlaxAutoencoderKL and PyTorch AutoencoderKL (oracles)."""

import ast
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL
from diffusers import FlaxAutoencoderKL
from flax.traverse_util import flatten_dict

from dreambooth_jax.models import vae as vae_lib
from tests.models import tiny_configs

TOLERANCE = 1e-5  # fp32, max abs
CONFIGS = {"VAE": tiny_configs.VAE, "VAE_SDXL": tiny_configs.VAE_SDXL}

# The vae/config.json of SD 1.5 and SDXL (channel widths shrunk): every key a real one has.
SD15_CONFIG_JSON = {
    "_class_name": "AutoencoderKL", "_diffusers_version": "0.6.0",
    "_name_or_path": "runwayml/stable-diffusion-v1-5", "act_fn": "silu",
    "block_out_channels": [32, 64], "down_block_types": ["DownEncoderBlock2D"] * 2,
    "in_channels": 3, "latent_channels": 4, "layers_per_block": 1, "norm_num_groups": 32,
    "out_channels": 3, "sample_size": 16, "up_block_types": ["UpDecoderBlock2D"] * 2}
SDXL_CONFIG_JSON = dict(
    SD15_CONFIG_JSON, _diffusers_version="0.20.0.dev0", force_upcast=True,
    scaling_factor=0.13025, shift_factor=None, latents_mean=None, latents_std=None,
    use_quant_conv=True, use_post_quant_conv=True, mid_block_add_attention=True)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def setup(request):
  """(config, ours, init params, params, pixels, our (mean, std, decoded)).

  The outputs are computed with perturbed params: at init every bias is 0 and every norm
  scale 1, which would hide a misplaced bias or scale.
  """
  config = CONFIGS[request.param]
  ours = vae_lib.vae_from_config(config)
  init_params = jax.jit(ours.init_weights)(jax.random.key(0))
  params = perturbed(init_params, jax.random.key(3))
  pixels = jax.random.uniform(jax.random.key(1), (2, 3, 16, 16), minval=-1.0, maxval=1.0)

  @jax.jit
  def run(params, pixels):
    mean, std = ours.apply({"params": params}, pixels, method=ours.encode)
    return mean, std, ours.apply({"params": params}, mean, method=ours.decode)

  return config, ours, init_params, params, pixels, run(params, pixels)


def perturbed(params, key, scale: float = 0.1):
  """Biases and norm parameters (the 1-D leaves) + scale * N(0, 1); kernels as drawn."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(treedef, [
      leaf + scale * jax.random.normal(k, leaf.shape, leaf.dtype) if leaf.ndim == 1 else leaf
      for leaf, k in zip(leaves, keys)])


# Flax attention names -> diffusers' PyTorch Attention names (diffusers' own Flax->PyTorch
# loader predates that renaming, so it would leave the VAE's attention randomly initialised).
_TORCH_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _torch_module_name(flax_name: str) -> str:
  """"down_blocks_0" -> "down_blocks.0" (Flax list attributes are torch ModuleLists)."""
  if flax_name in _TORCH_ATTENTION_NAMES:
    return _TORCH_ATTENTION_NAMES[flax_name]
  stem, _, index = flax_name.rpartition("_")
  return f"{stem}.{index}" if stem and index.isdigit() else flax_name


def _load_into_torch(torch_model: torch.nn.Module, params) -> None:
  """Copies a diffusers-layout Flax VAE tree into the PyTorch model, every tensor exactly once."""
  state = {}
  for path, value in flatten_dict(jax.device_get(params)).items():
    *modules, leaf = path
    names = [_torch_module_name(m) for m in modules]
    value = np.array(value)  # a writable copy, as torch.from_numpy wants
    if leaf == "kernel":
      leaf, value = "weight", (value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T)
    elif leaf == "scale":
      leaf = "weight"
    state[".".join(names + [leaf])] = torch.from_numpy(np.ascontiguousarray(value, np.float64))
  missing, unexpected = torch_model.load_state_dict(state, strict=False)
  assert not missing and not unexpected, (missing, unexpected)


def _max_abs(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def test_param_tree_and_init_equal_diffusers(setup):
  config, _, params, _, _, _ = setup
  reference = jax.jit(FlaxAutoencoderKL(**config).init_weights)(jax.random.key(0))
  assert jax.tree.structure(params) == jax.tree.structure(reference)
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, reference)
  # Same module names and initialisers: the same numbers from the same key.
  assert all(jax.tree.leaves(jax.tree.map(lambda a, b: bool((a == b).all()), params, reference)))


def test_encode_decode_equal_diffusers_flax(setup):
  config, _, _, params, pixels, (mean, std, decoded) = setup
  reference = FlaxAutoencoderKL(**config)

  @jax.jit
  def run(params, pixels):
    dist = reference.apply({"params": params}, pixels, method=reference.encode).latent_dist
    return dist.mean, dist.std, reference.apply({"params": params}, dist.mean,
                                                method=reference.decode).sample

  ref_mean, ref_std, ref_decoded = run(params, pixels)
  assert mean.shape == (2, 8, 8, 4) and decoded.shape == (2, 3, 16, 16)
  assert _max_abs(mean, ref_mean) <= TOLERANCE
  assert _max_abs(std, ref_std) <= TOLERANCE
  assert _max_abs(decoded, ref_decoded) <= TOLERANCE


def test_encode_decode_equal_pytorch(setup):
  # PyTorch runs in float64, as the exact answer: two float32 implementations (XLA's and
  # PyTorch's convolutions sum in different orders) drift up to ~1e-5 apart on the decoder's
  # outputs (|x| ~ 2), each staying well inside 1e-5 of the float64 result.
  config, _, _, params, pixels, (mean, std, decoded) = setup
  torch_vae = TorchAutoencoderKL(**config).double().eval()
  _load_into_torch(torch_vae, params)
  with torch.no_grad():
    dist = torch_vae.encode(torch.from_numpy(np.asarray(pixels, np.float64))).latent_dist
    torch_decoded = torch_vae.decode(dist.mean).sample
  nhwc = lambda t: t.numpy().transpose(0, 2, 3, 1)
  assert _max_abs(mean, nhwc(dist.mean)) <= TOLERANCE
  assert _max_abs(std, nhwc(dist.std)) <= TOLERANCE
  assert _max_abs(decoded, torch_decoded.numpy()) <= TOLERANCE


def test_decode_takes_either_layout(setup):
  _, ours, _, params, _, (mean, _, decoded) = setup
  from_nchw = jax.jit(lambda p, z: ours.apply({"params": p}, z, method=ours.decode))(
      params, jnp.transpose(mean, (0, 3, 1, 2)))
  assert _max_abs(from_nchw, decoded) <= TOLERANCE


def test_latent_scaling_helpers(setup):
  config, ours, _, _, _, (mean, std, _) = setup
  noise = jax.random.normal(jax.random.key(2), mean.shape)
  # Without a shift: exactly what the training step has always computed.
  latents = ours.latents_from_pixels_dist(mean, std, noise)
  expected = jnp.transpose(mean + std * noise, (0, 3, 1, 2)) * config.get("scaling_factor",
                                                                          0.18215)
  np.testing.assert_array_equal(latents, expected)
  np.testing.assert_allclose(ours.latents_to_decoder_input(latents),
                             jnp.transpose(mean + std * noise, (0, 3, 1, 2)), atol=1e-6)
  shifted = ours.clone(shift_factor=0.0609)
  shifted_latents = shifted.latents_from_pixels_dist(mean, std, noise)
  np.testing.assert_allclose(shifted_latents, latents - 0.0609 * ours.scaling_factor, atol=1e-6)
  np.testing.assert_allclose(shifted.latents_to_decoder_input(shifted_latents),
                             jnp.transpose(mean + std * noise, (0, 3, 1, 2)), atol=1e-6)
  assert ours.scale_factor == 2


def test_from_config_reads_real_configs():
  sd15 = vae_lib.vae_from_config(SD15_CONFIG_JSON)
  assert sd15.scaling_factor == 0.18215 and sd15.shift_factor is None
  assert sd15.block_out_channels == (32, 64)
  sdxl = vae_lib.vae_from_config(SDXL_CONFIG_JSON, dtype=jnp.bfloat16)
  assert sdxl.scaling_factor == 0.13025 and sdxl.dtype == jnp.bfloat16
  flux_like = vae_lib.vae_from_config(dict(SDXL_CONFIG_JSON, shift_factor=0.0609))
  assert flux_like.shift_factor == 0.0609


@pytest.mark.parametrize("key, value", [
    ("use_quant_conv", False), ("use_post_quant_conv", False), ("act_fn", "gelu"),
    ("mid_block_add_attention", False), ("latents_mean", [0.1] * 4),
    ("down_block_types", ["AttnDownEncoderBlock2D", "DownEncoderBlock2D"]),
    ("up_block_types", ["UpDecoderBlock2D", "AttnUpDecoderBlock2D"]), ("norm_type", "spatial")])
def test_from_config_refuses_what_it_cannot_honour(key, value):
  with pytest.raises(ValueError, match=key) as error:
    vae_lib.vae_from_config(dict(SDXL_CONFIG_JSON, **{key: value}))
  assert "\n" not in str(error.value)
