"""Our DINO ViT and CLIP vision tower against transformers' Flax and PyTorch models.

Each network is built from a tiny random config; its parameter tree must equal transformers'
Flax one (keys and shapes), and on the SAME random parameters (every weight, bias and
LayerNorm scale drawn at random, so none hides behind a zero or a one) its outputs must equal
transformers' Flax model and the PyTorch model loaded from those parameters by transformers'
own Flax->PyTorch loader. One jit per network and per Flax oracle.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import traverse_util
from transformers.modeling_flax_pytorch_utils import load_flax_weights_in_pytorch_model

from dreambooth_jax.models import clip_vision, vit

# transformers ViTConfig / CLIPVisionConfig fields.
VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
           image_size=32, patch_size=8)
CLIP_VISION = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                   intermediate_size=37, image_size=32, patch_size=8)
CLIP_TEXT = dict(vocab_size=100, hidden_size=24, intermediate_size=29, num_hidden_layers=1,
                 num_attention_heads=2, max_position_embeddings=16)
PROJECTION_DIM = 16
BATCH = 2
TOL = 1e-5  # fp32


def _shapes(tree) -> dict[tuple[str, ...], tuple[int, ...]]:
  return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(tree).items()}


def _random_like(shape_tree, seed: int):
  """Random float32 arrays in the tree's shapes (scale 0.2, LayerNorm scales near 1)."""
  rng = np.random.default_rng(seed)
  flat = {}
  for path, leaf in traverse_util.flatten_dict(shape_tree).items():
    value = 0.2 * rng.standard_normal(leaf.shape)
    if path[-1] == "scale":
      value += 1.0
    flat[path] = jnp.asarray(value, jnp.float32)
  return traverse_util.unflatten_dict(flat)


def _pixels(config: dict, seed: int) -> np.ndarray:
  side = config["image_size"]
  return np.random.default_rng(seed).standard_normal((BATCH, 3, side, side)).astype(np.float32)


def _max_err(ours, theirs) -> float:
  return float(np.max(np.abs(np.asarray(ours, np.float64) - np.asarray(theirs, np.float64))))


def _torch_from_flax(pt_model, flax_params):
  with warnings.catch_warnings():  # the loader hands torch its read-only transposed kernels
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    pt_model = load_flax_weights_in_pytorch_model(pt_model, flax_params)
  return pt_model.eval()


# --------------------------------------------------------------------------------------------
# DINO ViT.

@pytest.fixture(scope="module")
def vit_case():
  """(flax oracle, params, pixels, our last_hidden_state): our network jitted once."""
  model = vit.vit_from_config(VIT)
  oracle = transformers.FlaxViTModel(transformers.ViTConfig(**VIT), add_pooling_layer=False,
                                     _do_init=False)
  pixels = _pixels(VIT, seed=1)
  params = _random_like(jax.eval_shape(model.init, jax.random.key(0), pixels)["params"], seed=2)
  ours = jax.jit(model.apply)({"params": params}, pixels).last_hidden_state
  return oracle, params, pixels, ours


@pytest.mark.parametrize("qkv_bias", [True, False])
def test_vit_param_tree_is_transformers(qkv_bias):
  config = dict(VIT, qkv_bias=qkv_bias)
  pixels = _pixels(config, seed=0)
  ours = jax.eval_shape(vit.vit_from_config(config).init, jax.random.key(0), pixels)["params"]
  oracle = transformers.FlaxViTModel(transformers.ViTConfig(**config), add_pooling_layer=False,
                                     _do_init=False)
  theirs = jax.eval_shape(
      functools.partial(oracle.init_weights, input_shape=oracle.input_shape), jax.random.key(0))
  assert _shapes(ours) == _shapes(theirs)
  assert (("encoder", "layer", "0", "attention", "attention", "query", "bias") in
          _shapes(ours)) == qkv_bias


def test_vit_param_tree_of_dino_vits16():
  """facebook/dino-vits16's config.json builds the tree of its published Flax weights."""
  dino = dict(model_type="vit", architectures=["ViTModel"], hidden_size=384, num_hidden_layers=12,
              num_attention_heads=6, intermediate_size=1536, hidden_act="gelu",
              layer_norm_eps=1e-12, image_size=224, patch_size=16, num_channels=3,
              qkv_bias=True, hidden_dropout_prob=0.0, initializer_range=0.02)
  pixels = jnp.zeros((1, 3, 224, 224))
  ours = jax.eval_shape(vit.vit_from_config(dino).init, jax.random.key(0), pixels)["params"]
  oracle = transformers.FlaxViTModel(transformers.ViTConfig(**dino), add_pooling_layer=False,
                                     _do_init=False)
  theirs = jax.eval_shape(
      functools.partial(oracle.init_weights, input_shape=oracle.input_shape), jax.random.key(0))
  assert _shapes(ours) == _shapes(theirs)
  assert _shapes(ours)[("embeddings", "position_embeddings")] == (1, 197, 384)


def test_vit_matches_transformers_flax(vit_case):
  oracle, params, pixels, ours = vit_case
  theirs = jax.jit(lambda p, x: oracle(x, params=p).last_hidden_state)(params, pixels)
  assert ours.shape == (BATCH, 1 + (32 // 8) ** 2, 32)
  assert _max_err(ours, theirs) <= TOL


def test_vit_matches_pytorch(vit_case):
  _, params, pixels, ours = vit_case
  pt_model = _torch_from_flax(
      transformers.ViTModel(transformers.ViTConfig(**VIT), add_pooling_layer=False), params)
  with torch.no_grad():
    theirs = pt_model(torch.from_numpy(pixels)).last_hidden_state.numpy()
  assert _max_err(ours, theirs) <= TOL


def test_vit_from_config_ignores_bookkeeping():
  """A whole saved config.json (architectures, dropout, id2label, ...) builds the same model."""
  full = transformers.ViTConfig(**VIT).to_dict()
  full.update(architectures=["ViTModel"], hidden_dropout_prob=0.1, pooler_act="relu")
  model = vit.vit_from_config(full, dtype=jnp.bfloat16)
  assert (model.hidden_size, model.num_hidden_layers, model.num_attention_heads,
          model.intermediate_size, model.image_size, model.patch_size) == (32, 2, 4, 37, 32, 8)
  assert (model.hidden_act, model.layer_norm_eps, model.qkv_bias, model.dtype) == (
      "gelu", 1e-12, True, jnp.bfloat16)
  assert vit.vit_from_config({}) == vit.ViTModel()  # transformers' defaults: ViT-B/16


@pytest.mark.parametrize("change, key", [
    (dict(hidden_act="gelu_fast"), "hidden_act"),
    (dict(image_size=[32, 32]), "image_size"),
    (dict(num_hidden_layers=0), "num_hidden_layers"),
    (dict(qkv_bias=1), "qkv_bias"),
    (dict(num_attention_heads=5), "num_attention_heads"),
    (dict(patch_size=64), "patch_size"),
    (dict(model_type="deit"), "model_type"),
])
def test_vit_from_config_refuses_in_one_line(change, key):
  with pytest.raises(ValueError, match=key) as error:
    vit.vit_from_config(dict(VIT, **change))
  assert "\n" not in str(error.value)


@pytest.mark.parametrize("shape, what", [((1, 3, 16, 16), "32x32"), ((1, 32, 32, 3), "NCHW")])
def test_vit_refuses_wrong_pixels(shape, what):
  model = vit.vit_from_config(VIT)
  with pytest.raises(ValueError, match=what):
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(shape))


# --------------------------------------------------------------------------------------------
# CLIP vision tower with projection.

def _clip_config():
  return transformers.CLIPConfig(text_config=CLIP_TEXT, vision_config=CLIP_VISION,
                                 projection_dim=PROJECTION_DIM)


@pytest.fixture(scope="module")
def clip_case():
  """(flax oracle, vision params, pixels, our outputs): our network jitted once."""
  model = clip_vision.clip_vision_from_config(_clip_config().to_dict())
  oracle = transformers.FlaxCLIPModel(_clip_config(), _do_init=False)
  pixels = _pixels(CLIP_VISION, seed=3)
  params = _random_like(jax.eval_shape(model.init, jax.random.key(0), pixels)["params"], seed=4)
  ours = jax.jit(model.apply)({"params": params}, pixels)
  return oracle, params, pixels, ours


def test_clip_param_tree_is_transformers_vision_subtrees():
  model = clip_vision.clip_vision_from_config(_clip_config().to_dict())
  ours = jax.eval_shape(model.init, jax.random.key(0), _pixels(CLIP_VISION, seed=0))["params"]
  oracle = transformers.FlaxCLIPModel(_clip_config(), _do_init=False)
  theirs = jax.eval_shape(
      functools.partial(oracle.init_weights, input_shape=oracle.input_shape), jax.random.key(0))
  assert set(theirs) == set(ours) | {"text_model", "text_projection", "logit_scale"}
  assert _shapes(ours) == _shapes({k: theirs[k] for k in ours})
  assert ("vision_model", "pre_layrnorm", "scale") in _shapes(ours)


def test_clip_vit_l14_shapes():
  """openai/clip-vit-large-patch14's config (abridged) gives its weights' shapes."""
  config = dict(model_type="clip", projection_dim=768, text_config=dict(hidden_size=768),
                vision_config=dict(hidden_size=1024, intermediate_size=4096,
                                   num_attention_heads=16, num_hidden_layers=24, patch_size=14,
                                   image_size=224, projection_dim=768))
  model = clip_vision.clip_vision_from_config(config)
  shapes = _shapes(jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 3, 224, 224))))
  tower = ("params", "vision_model")
  assert shapes[tower + ("embeddings", "patch_embedding", "kernel")] == (14, 14, 3, 1024)
  assert shapes[tower + ("embeddings", "position_embedding", "embedding")] == (257, 1024)
  assert shapes[tower + ("encoder", "layers", "23", "mlp", "fc1", "kernel")] == (1024, 4096)
  assert shapes[("params", "visual_projection", "kernel")] == (1024, 768)
  assert len(shapes) == 3 + 2 * 2 + 24 * 16 + 1  # embeddings, 2 LayerNorms, blocks, projection


def test_clip_image_embeds_match_transformers_flax(clip_case):
  oracle, params, pixels, ours = clip_case
  # Only the vision subtrees are used; logit_scale is there because the module's setup makes it.
  theirs = jax.jit(lambda p, x: oracle.get_image_features(x, params=p))(
      dict(params, logit_scale=jnp.zeros(())), pixels)
  assert ours.image_embeds.shape == (BATCH, PROJECTION_DIM)
  assert _max_err(ours.image_embeds, theirs) <= TOL


def test_clip_matches_pytorch(clip_case):
  """get_image_features, and the tower's last hidden state (before post_layernorm) and pooler."""
  _, params, pixels, ours = clip_case
  # Only the vision weights come from ours; the text half keeps PyTorch's init (unused here).
  pt_model = _torch_from_flax(transformers.CLIPModel(_clip_config()), params)
  with torch.no_grad():
    image_embeds = pt_model.get_image_features(torch.from_numpy(pixels)).numpy()
    tower = pt_model.vision_model(torch.from_numpy(pixels))
  assert _max_err(ours.image_embeds, image_embeds) <= TOL
  assert _max_err(ours.last_hidden_state, tower.last_hidden_state.numpy()) <= TOL
  assert _max_err(ours.pooler_output, tower.pooler_output.numpy()) <= TOL


def test_clip_from_config_takes_whole_or_vision_config():
  """CLIPConfig: its vision_config with the top-level projection_dim (what FlaxCLIPModel uses)."""
  whole = _clip_config().to_dict()
  whole["vision_config"]["projection_dim"] = 99  # ignored: the model projects to 16
  model = clip_vision.clip_vision_from_config(whole)
  vision = transformers.CLIPVisionConfig(**CLIP_VISION, projection_dim=PROJECTION_DIM).to_dict()
  assert clip_vision.clip_vision_from_config(vision) == model
  assert (model.hidden_size, model.num_hidden_layers, model.image_size, model.patch_size,
          model.hidden_act, model.layer_norm_eps, model.projection_dim) == (
              32, 2, 32, 8, "quick_gelu", 1e-5, PROJECTION_DIM)
  # transformers' defaults: CLIP ViT-B/32.
  assert clip_vision.clip_vision_from_config({}) == clip_vision.CLIPVisionModelWithProjection()


@pytest.mark.parametrize("config, key", [
    (dict(model_type="siglip"), "model_type"),
    (dict(model_type="clip", vision_config=dict(hidden_act="gelu_fast")), "hidden_act"),
    (dict(projection_dim=-1), "projection_dim"),
])
def test_clip_from_config_refuses_in_one_line(config, key):
  with pytest.raises(ValueError, match=key) as error:
    clip_vision.clip_vision_from_config(config)
  assert "\n" not in str(error.value)
