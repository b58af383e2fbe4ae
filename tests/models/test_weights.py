"""PyTorch-layout weight files <-> Flax trees, checked against the libraries that define both.

Every tiny SD-family component is built in PyTorch (random weights), saved by its own
`save_pretrained`, and must load exactly as diffusers' / transformers' own PyTorch-to-Flax
conversion loads it; what we save must load back into PyTorch with nothing missing or left
over. No forward passes: the Flax modules only provide reference trees (via eval_shape).
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import json
import os
import shutil
import sys
import types

import jax
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch
from diffusers import (AutoencoderKL, FlaxAutoencoderKL, FlaxUNet2DConditionModel,
                       UNet2DConditionModel)
from diffusers.models.modeling_flax_pytorch_utils import convert_pytorch_state_dict_to_flax
from flax import traverse_util
from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection,
                          FlaxCLIPTextModel, FlaxCLIPTextModelWithProjection)
from transformers.modeling_flax_pytorch_utils import load_pytorch_checkpoint_in_flax_state_dict

from dreambooth_jax.models import weights
from tests.models import tiny_configs


@dataclasses.dataclass(frozen=True)
class Spec:
  component: str
  torch_cls: type
  flax_cls: type
  config: dict

  @property
  def is_diffusers(self) -> bool:
    return self.component in ("unet", "vae")


SPECS = {
    "unet_sd1": Spec("unet", UNet2DConditionModel, FlaxUNet2DConditionModel,
                     tiny_configs.UNET_SD1),
    "unet_sd2": Spec("unet", UNet2DConditionModel, FlaxUNet2DConditionModel,
                     tiny_configs.UNET_SD2),
    "unet_sdxl": Spec("unet", UNet2DConditionModel, FlaxUNet2DConditionModel,
                      tiny_configs.UNET_SDXL),
    "vae": Spec("vae", AutoencoderKL, FlaxAutoencoderKL, tiny_configs.VAE),
    "clip_sd1": Spec("text_encoder", CLIPTextModel, FlaxCLIPTextModel,
                     tiny_configs.CLIP_TEXT_SD1),
    "clip_sdxl_2": Spec("text_encoder", CLIPTextModelWithProjection,
                        FlaxCLIPTextModelWithProjection, tiny_configs.CLIP_TEXT_SDXL_2),
}


@dataclasses.dataclass
class Built:
  spec: Spec
  torch_model: torch.nn.Module
  torch_state: dict[str, np.ndarray]  # what save_pretrained wrote, as float32 numpy
  dir: str  # the save_pretrained folder
  weights_file: str
  reference: dict  # Flax tree of jax.ShapeDtypeStruct


class _Models:
  """Each spec built once per module, on first use."""

  def __init__(self, root: str):
    self.root = root
    self._built = {}

  def __getitem__(self, name: str) -> Built:
    if name not in self._built:
      self._built[name] = self._build(name, SPECS[name])
    return self._built[name]

  def _build(self, name: str, spec: Spec) -> Built:
    torch.manual_seed(len(self._built))
    rng = jax.random.PRNGKey(0)
    if spec.is_diffusers:
      torch_model = spec.torch_cls(**spec.config)
      flax_model = spec.flax_cls.from_config(spec.config)
      reference = jax.eval_shape(flax_model.init_weights, rng)
    else:
      config = CLIPTextConfig(**spec.config)
      torch_model = spec.torch_cls(config)
      flax_model = spec.flax_cls(config, _do_init=False)
      reference = jax.eval_shape(lambda r: flax_model.init_weights(r, (1, 77)), rng)
    # Random values everywhere (norms included), so that a swapped or untransposed tensor
    # cannot hide behind ones, zeros or a square shape.
    with torch.no_grad():
      for parameter in torch_model.parameters():
        parameter.normal_()
    torch_model.eval()
    directory = os.path.join(self.root, name)
    torch_model.save_pretrained(directory, safe_serialization=True)
    weights_file = os.path.join(directory, weights.WEIGHT_FILES[spec.component][0])
    torch_state = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    return Built(spec, torch_model, torch_state, directory, weights_file, reference)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> _Models:
  return _Models(str(tmp_path_factory.mktemp("saved_by_torch")))


def library_conversion(built: Built):
  """diffusers' / transformers' own PyTorch-to-Flax conversion of the saved file.

  They use the model's random init only for its keys and shapes; zeros of the reference's
  shapes stand in for it (and spare an eager init of each module).
  """
  zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), built.reference)
  if built.spec.is_diffusers:
    stand_in = types.SimpleNamespace(init_weights=lambda rng: zeros)
    return convert_pytorch_state_dict_to_flax(safetensors.torch.load_file(built.weights_file),
                                              stand_in)
  stand_in = types.SimpleNamespace(base_model_prefix=built.spec.flax_cls.base_model_prefix,
                                   params=zeros)
  return load_pytorch_checkpoint_in_flax_state_dict(stand_in, built.weights_file,
                                                    is_sharded=False)


def assert_trees_equal(actual, expected) -> None:
  """Same keys, shapes, float32 dtype and values (exactly)."""
  actual = traverse_util.flatten_dict(actual)
  expected = traverse_util.flatten_dict(expected)
  assert sorted(actual) == sorted(expected)
  for key, value in expected.items():
    np.testing.assert_array_equal(np.asarray(actual[key]), np.asarray(value, np.float32),
                                  err_msg="/".join(key), strict=True)


def assert_shapes_match(tree, reference) -> None:
  shapes = {k: v.shape for k, v in traverse_util.flatten_dict(tree).items()}
  assert shapes == {k: v.shape for k, v in traverse_util.flatten_dict(reference).items()}


def assert_torch_state_equal(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]):
  assert sorted(state) == sorted(expected)
  for key, value in expected.items():
    assert state[key].dtype == value.dtype, key
    assert torch.equal(state[key], value), key


def assert_clean_loading_info(info: dict) -> None:
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  assert not info["mismatched_keys"] and not info["error_msgs"], info


def save_as_component(directory: str, built: Built, state: dict[str, np.ndarray]) -> str:
  """A component folder holding `state` under the component's file name and its config."""
  os.makedirs(directory)
  shutil.copy(os.path.join(built.dir, "config.json"), directory)
  path = os.path.join(directory, weights.WEIGHT_FILES[built.spec.component][0])
  weights.save_safetensors(path, state)
  return path


@pytest.mark.parametrize("name", SPECS)
def test_load_equals_library_conversion(models, name):
  built = models[name]
  loaded = weights.load_component(built.dir, built.spec.component, built.reference)
  assert_shapes_match(loaded, built.reference)
  assert_trees_equal(loaded, library_conversion(built))


@pytest.mark.parametrize("name", SPECS)
def test_round_trips_are_exact(models, name):
  built = models[name]
  component = built.spec.component
  # Flax -> torch -> Flax, from values unlike the torch model's.
  rng = np.random.default_rng(1)
  params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32),
                        built.reference)
  back = weights.torch_to_flax(weights.flax_to_torch(params, component), built.reference,
                               "round trip", component)
  assert_trees_equal(back, params)
  # torch -> Flax -> torch: today's names, every key, the same values.
  state = weights.load_safetensors(built.weights_file)
  again = weights.flax_to_torch(
      weights.torch_to_flax(state, built.reference, built.weights_file), component)
  assert sorted(again) == sorted(built.torch_state)
  for key, value in built.torch_state.items():
    np.testing.assert_array_equal(again[key], value, err_msg=key, strict=True)


@pytest.mark.parametrize("name", SPECS)
def test_saved_component_loads_in_torch(models, tmp_path, name):
  built = models[name]
  params = weights.load_component(built.dir, built.spec.component, built.reference)
  out = str(tmp_path / name)
  path = weights.save_component(out, built.spec.component, params)
  shutil.copy(os.path.join(built.dir, "config.json"), out)
  assert sorted(os.listdir(out)) == sorted(  # the file name the libraries use, no temp files
      ["config.json", weights.WEIGHT_FILES[built.spec.component][0]])
  with safetensors.safe_open(path, framework="np") as f:
    assert f.metadata() == {"format": "pt"}
  model, info = built.spec.torch_cls.from_pretrained(out, output_loading_info=True)
  assert_clean_loading_info(info)
  assert_torch_state_equal(model.state_dict(), built.torch_model.state_dict())


def test_old_vae_layout_loads_the_same(models, tmp_path):
  """SD 1.5's original repo names the VAE mid-block attention query/key/value/proj_attn."""
  built = models["vae"]
  old_names = (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn"))
  old_state = {}
  for key, value in built.torch_state.items():
    for new, old in old_names:
      key = key.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
    old_state[key] = value
  assert len(set(old_state) - set(built.torch_state)) == 16  # 2 blocks x 4 layers x 2
  old_dir = str(tmp_path / "vae_old")
  save_as_component(old_dir, built, old_state)
  assert_trees_equal(weights.load_component(old_dir, "vae", built.reference),
                     weights.load_component(built.dir, "vae", built.reference))
  # The renamed file is a layout diffusers itself still reads as the deprecated one.
  model, info = AutoencoderKL.from_pretrained(old_dir, output_loading_info=True)
  assert_clean_loading_info(info)
  assert_torch_state_equal(model.state_dict(), built.torch_model.state_dict())
  # Both spellings of one weight in a file: the second is unexpected, not silently dropped.
  both_dir = str(tmp_path / "vae_both")
  both_path = save_as_component(both_dir, built, {
      **built.torch_state, "encoder.mid_block.attentions.0.query.weight":
          built.torch_state["encoder.mid_block.attentions.0.to_q.weight"]})
  with pytest.raises(weights.WeightsError, match="unexpected weight encoder.mid_block."
                     "attentions.0.query.weight") as e:
    weights.load_component(both_dir, "vae", built.reference)
  assert both_path in str(e.value)


@pytest.mark.parametrize("name", ["unet_sd1", "clip_sd1"])
def test_fp16_variants_and_shards_load(models, tmp_path, name):
  built = models[name]
  component = built.spec.component
  expected = weights.torch_to_flax(
      {k: v.astype(np.float16).astype(np.float32) for k, v in built.torch_state.items()},
      built.reference, "fp16 values")
  half = copy.deepcopy(built.torch_model).half()
  half.save_pretrained(tmp_path / "fp16", safe_serialization=True, variant="fp16")
  stem, ext = weights.WEIGHT_FILES[component][0].rsplit(".", 1)
  assert os.listdir(tmp_path / "fp16").count(f"{stem}.fp16.{ext}") == 1
  assert_trees_equal(
      weights.load_component(str(tmp_path / "fp16"), component, built.reference, "fp16"),
      expected)
  # Sharded and a variant at once: the index is <name>.safetensors.index.fp16.json.
  half_bytes = sum(v.nbytes for v in built.torch_state.values()) // 2
  half.save_pretrained(tmp_path / "shards", safe_serialization=True, variant="fp16",
                       max_shard_size=half_bytes // 3)
  with open(tmp_path / "shards" / f"{stem}.{ext}.index.fp16.json") as f:
    assert len(set(json.load(f)["weight_map"].values())) > 1
  assert_trees_equal(
      weights.load_component(str(tmp_path / "shards"), component, built.reference, "fp16"),
      expected)
  # Plain float32 shards, as the hub's large repos have them: <name>.safetensors.index.json.
  built.torch_model.save_pretrained(tmp_path / "shards32", safe_serialization=True,
                                    max_shard_size=half_bytes // 2)
  with open(tmp_path / "shards32" / f"{stem}.{ext}.index.json") as f:
    assert len(set(json.load(f)["weight_map"].values())) > 1
  assert not os.path.exists(tmp_path / "shards32" / f"{stem}.{ext}")
  assert_trees_equal(
      weights.load_component(str(tmp_path / "shards32"), component, built.reference),
      library_conversion(built))
  # A variant that is not there is an error, not a silent fallback to the float32 file.
  with pytest.raises(weights.WeightsError, match=f"{stem}.fp16.{ext}"):
    weights.load_component(built.dir, component, built.reference, variant="fp16")


def test_half_precision_files(models, tmp_path):
  built = models["unet_sdxl"]
  params = weights.load_component(built.dir, "unet", built.reference)
  # bf16 written by torch reads as torch's own float32 widening of it.
  bf16_model = copy.deepcopy(built.torch_model).to(torch.bfloat16)
  bf16_model.save_pretrained(tmp_path / "bf16_torch", safe_serialization=True, variant="bf16")
  expected = {k: v.float().numpy() for k, v in bf16_model.state_dict().items()}
  assert_trees_equal(
      weights.load_component(str(tmp_path / "bf16_torch"), "unet", built.reference, "bf16"),
      weights.torch_to_flax(expected, built.reference, "bf16 values"))
  # bf16 we write rounds as torch rounds (to nearest even).
  path = weights.save_component(str(tmp_path / "bf16_ours"), "unet", params, dtype="bfloat16",
                                variant="bf16")
  assert os.path.basename(path) == "diffusion_pytorch_model.bf16.safetensors"
  assert_torch_state_equal(safetensors.torch.load_file(path), bf16_model.state_dict())
  raw = weights.load_safetensors(path, dtype=None)
  assert {v.dtype.name for v in raw.values()} == {"bfloat16"}
  # fp16 we write is what diffusers loads as its fp16 variant.
  out = str(tmp_path / "fp16_ours")
  weights.save_component(out, "unet", params, dtype="float16", variant="fp16")
  shutil.copy(os.path.join(built.dir, "config.json"), out)
  model, info = UNet2DConditionModel.from_pretrained(out, variant="fp16",
                                                     torch_dtype=torch.float16,
                                                     output_loading_info=True)
  assert_clean_loading_info(info)
  assert_torch_state_equal(model.state_dict(), copy.deepcopy(built.torch_model).half()
                           .state_dict())


def test_bad_files_fail_with_one_line_naming_file_and_key(models, tmp_path):
  built = models["clip_sd1"]
  state = built.torch_state
  fc1 = "text_model.encoder.layers.0.mlp.fc1.weight"
  bad_states = {
      "missing": ({k: v for k, v in state.items() if k != "text_model.final_layer_norm.bias"},
                  "missing weight text_model.final_layer_norm.bias"),
      "unexpected": ({**state, "text_model.pooler.weight": np.zeros(3, np.float32)},
                     "unexpected weight text_model.pooler.weight (not in the model)"),
      # A Flax-layout [in, out] kernel where PyTorch's [out, in] belongs.
      "shape": ({**state, fc1: state[fc1].T}, f"{fc1} has shape (32, 37), the model needs "
                                              "(37, 32)"),
  }
  for kind, (bad_state, message) in bad_states.items():
    path = save_as_component(str(tmp_path / kind), built, bad_state)
    with pytest.raises(weights.WeightsError) as e:
      weights.load_component(str(tmp_path / kind), "text_encoder", built.reference)
    assert str(e.value) == f"{path}: {message}", kind
  # A file cut short (a killed download).
  with open(path, "rb") as f:
    head = f.read(1000)
  with open(path, "wb") as f:
    f.write(head)
  with pytest.raises(weights.WeightsError) as e:
    weights.load_component(str(tmp_path / kind), "text_encoder", built.reference)
  assert str(e.value).startswith(f"{path}: not a readable safetensors file (")
  assert "\n" not in str(e.value)
  # Older transformers files carry the position_ids buffer: ignored.
  with_ids = {**state, "text_model.embeddings.position_ids": np.arange(77)[None]}
  save_as_component(str(tmp_path / "position_ids"), built, with_ids)
  assert_trees_equal(
      weights.load_component(str(tmp_path / "position_ids"), "text_encoder", built.reference),
      weights.load_component(built.dir, "text_encoder", built.reference))
  os.makedirs(tmp_path / "empty")
  with pytest.raises(weights.WeightsError, match=r"empty: no weights found \(looked for "
                     r"model\.safetensors, model\.safetensors\.index\.json, pytorch_model\.bin"):
    weights.load_component(str(tmp_path / "empty"), "text_encoder", built.reference)


def test_pickle_files_need_torch(models, tmp_path, monkeypatch):
  built = models["clip_sd1"]
  built.torch_model.save_pretrained(tmp_path / "bin", safe_serialization=False)
  assert os.path.isfile(tmp_path / "bin" / "pytorch_model.bin")
  assert_trees_equal(
      weights.load_component(str(tmp_path / "bin"), "text_encoder", built.reference),
      weights.load_component(built.dir, "text_encoder", built.reference))
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now fails
  with pytest.raises(weights.WeightsError, match=r'pytorch_model\.bin: .*pip install -e '
                     r'"\.\[torch\]"'):
    weights.load_component(str(tmp_path / "bin"), "text_encoder", built.reference)


def test_safetensors_reader_agrees_with_the_library(models):
  built = models["clip_sdxl_2"]
  ours = weights.load_safetensors(built.weights_file, dtype=None)
  theirs = safetensors.numpy.load_file(built.weights_file)
  assert sorted(ours) == sorted(theirs)
  for key, value in theirs.items():
    np.testing.assert_array_equal(ours[key], value, strict=True)


def test_module_imports_no_torch_world():
  """diffusers / transformers never; torch only inside the .bin reader."""
  with open(weights.__file__) as f:
    tree = ast.parse(f.read())
  module_level, nested = set(), set()
  for node in ast.walk(tree):
    if isinstance(node, (ast.Import, ast.ImportFrom)):
      names = ([a.name for a in node.names] if isinstance(node, ast.Import)
               else [node.module or ""])
      (module_level if node in tree.body else nested).update(n.split(".")[0] for n in names)
  assert not module_level & {"torch", "diffusers", "transformers"}, module_level
  assert nested == {"torch"}
