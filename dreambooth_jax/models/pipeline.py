"""A Stable Diffusion pipeline as our own Flax modules: load it from what users have, export it
to what the PyTorch world loads.

In: a diffusers-layout folder (a hub id is first downloaded to one) whose components hold
PyTorch safetensors (today's hub repos and `save_pretrained` output, `.fp16` variants, shards),
Flax msgpack (this project's earlier exports, the committed toy-world model) or, with torch
installed, `.bin` pickles; or one `.safetensors` file in the original Stable Diffusion key
layout (what ComfyUI and A1111 share), whose family is recognised from its keys.
Out: a diffusers folder of PyTorch safetensors that `StableDiffusionPipeline.from_pretrained`
loads as it is, and optionally a single file in the original layout.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
import shutil
from typing import Any

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from dreambooth_jax import failpoints, sharding
from dreambooth_jax.errors import ModelLoadError, WeightsError
from dreambooth_jax.models import (clip_text, schedulers, single_file, tokenizer as tokenizers,
                                   unet as unet_lib, vae as vae_lib, weights)

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
WEIGHTED = ("unet", "vae", "text_encoder")

_FLAX_FILES = {"unet": "diffusion_flax_model.msgpack", "vae": "diffusion_flax_model.msgpack",
               "text_encoder": "flax_model.msgpack"}
_CONFIG_FILES = {"unet": "config.json", "vae": "config.json", "text_encoder": "config.json",
                 "scheduler": "scheduler_config.json"}
# The PyTorch classes an exported folder names (model_index.json and each config's _class_name).
_TORCH_CLASSES = {"unet": ("diffusers", "UNet2DConditionModel"),
                  "vae": ("diffusers", "AutoencoderKL"),
                  "text_encoder": ("transformers", "CLIPTextModel"),
                  "tokenizer": ("transformers", "CLIPTokenizer")}
# Flax-only keys of configs that our earlier (Flax) exports wrote; PyTorch does not take them.
_FLAX_ONLY_KEYS = ("use_memory_efficient_attention", "split_head_dim", "dtype")
DIFFUSERS_VERSION = "0.39.0"  # the config format we write, read by every later release


@dataclasses.dataclass(frozen=True)
class Components:
  """The modules (no weights) of one Stable Diffusion pipeline, and the configs they came from.

  configs holds each component's config.json dict as read, so that an export writes back what
  the user's model said (with the PyTorch class names).
  """
  tokenizer: tokenizers.ClipTokenizer
  text_encoder: clip_text.CLIPTextModel
  vae: vae_lib.AutoencoderKL
  unet: unet_lib.UNet2DConditionModel
  scheduler_config: dict[str, Any]
  configs: dict[str, dict[str, Any]]

  @property
  def vae_scale_factor(self) -> int:
    return self.vae.scale_factor

  @property
  def prediction_type(self) -> str:
    return self.noise_schedule().prediction_type

  @property
  def latent_channels(self) -> int:
    return self.unet.in_channels

  def noise_schedule(self) -> schedulers.NoiseSchedule:
    return schedulers.NoiseSchedule.from_config(self.scheduler_config)

  def sampler(self, name: str, num_inference_steps: int) -> schedulers.Sampler:
    return schedulers.make_sampler(name, self.noise_schedule(), num_inference_steps)

  def encode_text(self, text_params: Any, input_ids: jax.Array) -> jax.Array:
    """The prompt embeddings the UNet attends to: the encoder's last hidden states."""
    return self.text_encoder.apply({"params": text_params}, input_ids).last_hidden_state

  def encode_pixels(self, vae_params: Any, pixels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Pixels NCHW in [-1, 1] -> float32 (mean, std) of the latent Gaussian, NHWC."""
    mean, std = self.vae.apply({"params": vae_params}, pixels, method=self.vae.encode)
    return mean.astype(jnp.float32), std.astype(jnp.float32)

  def latents(self, mean: jax.Array, std: jax.Array, noise: jax.Array) -> jax.Array:
    """A latent sample (NHWC mean + std · noise) as the UNet sees it: NCHW, scaled."""
    return self.vae.latents_from_pixels_dist(mean, std, noise)

  def decode(self, vae_params: Any, latents: jax.Array) -> jax.Array:
    """UNet-space latents NCHW -> pixels NCHW in about [-1, 1]."""
    return self.vae.apply({"params": vae_params}, self.vae.latents_to_decoder_input(latents),
                          method=self.vae.decode)

  def predict(self, unet_params: Any, noisy_latents: jax.Array, timesteps: jax.Array,
              encoder_hidden_states: jax.Array, remat: bool = False) -> jax.Array:
    unet = self.unet.clone(remat=True) if remat and not self.unet.remat else self.unet
    return unet.apply({"params": unet_params}, noisy_latents, timesteps, encoder_hidden_states)

  def abstract_params(self) -> dict[str, Any]:
    """Each weighted component's parameter shapes (nothing allocated)."""
    rng = jax.random.key(0)
    return {name: jax.eval_shape(getattr(self, name).init_weights, rng) for name in WEIGHTED}

  def init_params(self, seed: int = 0) -> dict[str, Any]:
    """Random float32 parameters of every weighted component (tests, demos, benchmarks)."""
    rngs = jax.random.split(jax.random.key(seed), len(WEIGHTED))
    return {name: jax.jit(getattr(self, name).init_weights)(rng)
            for name, rng in zip(WEIGHTED, rngs)}


def build_components(configs: dict[str, dict[str, Any]], tokenizer: tokenizers.ClipTokenizer,
                     dtype: str = "float32", attention: str = "xla",
                     where: str = "model.pretrained") -> Components:
  """Our modules from diffusers/transformers config dicts ({unet, vae, text_encoder,
  scheduler}); a config we cannot honour is a ModelLoadError naming it."""
  compute_dtype = jnp.dtype(dtype)
  try:
    unet = unet_lib.unet_from_config(configs["unet"], dtype=compute_dtype,
                                     attention_implementation=attention, torch_numerics=True)
    vae = vae_lib.vae_from_config(configs["vae"], dtype=compute_dtype)
    text_encoder = clip_text.text_encoder_from_config(configs["text_encoder"],
                                                      dtype=compute_dtype)
    schedulers.NoiseSchedule.from_config(configs["scheduler"])
  except ValueError as e:
    raise ModelLoadError(f"{where}: {e}") from None
  return Components(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, unet=unet,
                    scheduler_config=dict(configs["scheduler"]),
                    configs={k: dict(v) for k, v in configs.items()})


# --------------------------------------------------------------------------------------------
# Finding a model: local folders, hub ids, single files (builtin names: builtin.py).

def is_hub_id(name: str) -> bool:
  return not name.startswith((".", "/", "~")) and name.count("/") == 1


def is_single_file(name: str) -> bool:
  return name.endswith(".safetensors") and os.path.isfile(name)


def local_dir(name: str, what: str) -> str | None:
  """`name` if it is a local directory, None if it is a hub id; otherwise a ModelLoadError."""
  if os.path.isdir(name):
    return name
  if os.path.exists(name):
    raise ModelLoadError(f"{what}: {name} is a file, not a model directory")
  if not is_hub_id(name):
    raise ModelLoadError(f"{what}: {name} is neither a local directory nor a hub id of the "
                         "form owner/name")
  return None


def _weight_candidates(component: str, variant: str | None) -> list[str]:
  """File names that may hold a component's weights, in order of preference."""
  names = [weights.with_variant(name, variant) for name in weights.WEIGHT_FILES[component]]
  return names + [_FLAX_FILES[component]]


def hub_weight_files(files: set[str], component: str, variant: str | None) -> list[str] | None:
  """The repo files of the one weight file `_component_weights` would read: the first of
  today's names the repo has (weights.first_weights: the file itself, or its shard index and
  shards), else the Flax msgpack; None if there is none. Other formats and variants beside it
  are not listed."""
  found = weights.first_weights(weights.WEIGHT_FILES[component], variant,
                                lambda name: f"{component}/{name}" in files)
  if found is None:
    flax_file = f"{component}/{_FLAX_FILES[component]}"
    return [flax_file] if variant is None and flax_file in files else None
  filename, name = found
  single = weights.with_variant(filename, variant)
  if name == single:
    return [f"{component}/{single}"]
  # Shards are <stem>-00001-of-00002.<ext>, the variant inside the stem.
  stem, extension = f"{component}/{single}".rsplit(".", 1)
  shard = re.compile(re.escape(stem) + r"-\d+-of-\d+\." + re.escape(extension))
  return [f"{component}/{name}"] + sorted(f for f in files if shard.fullmatch(f))


def hub_config_files(files: set[str]) -> list[str]:
  """model_index.json and each component folder's .json/.txt files (configs, tokenizer),
  without the shard indexes of weight files that are not fetched."""
  return sorted(f for f in files if f == "model_index.json" or (
      f.count("/") == 1 and f.endswith((".json", ".txt")) and ".index." not in f))


def download_from_hub(repo_id: str, revision: str | None, variant: str | None = None) -> str:
  """Downloads configs, tokenizer files and one weight file (or its shards) per component."""
  import huggingface_hub  # pylint: disable=g-import-not-at-top
  files = set(huggingface_hub.list_repo_files(repo_id, revision=revision))
  wanted = hub_config_files(files)
  for component in WEIGHTED:
    found = hub_weight_files(files, component, variant)
    if found is None:
      raise ModelLoadError(f"model.pretrained: the hub repo {repo_id} has no weights for "
                           f"{component} (looked for "
                           f"{', '.join(_weight_candidates(component, variant))})")
    wanted += found
  # Exact names (escaped: allow_patterns are fnmatch patterns).
  return huggingface_hub.snapshot_download(repo_id, revision=revision,
                                           allow_patterns=[glob.escape(f) for f in wanted])


def _component_weights(directory: str, component: str, variant: str | None) -> str:
  component_dir = os.path.join(directory, component)
  try:
    return weights.find_weights(component_dir, weights.WEIGHT_FILES[component], variant)
  except WeightsError:
    flax_file = os.path.join(component_dir, _FLAX_FILES[component])
    if variant is None and os.path.isfile(flax_file):
      return flax_file
    raise ModelLoadError(f"model.pretrained: {component_dir} has no weights (looked for "
                         f"{', '.join(_weight_candidates(component, variant))})") from None


def check_pipeline_dir(directory: str, variant: str | None = None) -> None:
  """Fails with one line if a component folder, its config or its weights are missing (cheap:
  no weight is read)."""
  for component in COMPONENTS:
    config_file = "vocab.json" if component == "tokenizer" else _CONFIG_FILES[component]
    if component == "tokenizer" and os.path.isfile(
        os.path.join(directory, "tokenizer", "tokenizer.json")):
      config_file = "tokenizer.json"
    if not os.path.isfile(os.path.join(directory, component, config_file)):
      raise ModelLoadError(f"model.pretrained: {directory} is missing component {component!r} "
                           f"({component}/{config_file} not found)")
  for component in WEIGHTED:
    _component_weights(directory, component, variant)


def read_configs(directory: str) -> dict[str, dict[str, Any]]:
  configs = {}
  for component in ("unet", "vae", "text_encoder", "scheduler"):
    path = os.path.join(directory, component, _CONFIG_FILES[component])
    try:
      with open(path) as f:
        configs[component] = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
      raise ModelLoadError(f"model.pretrained: cannot read {path}: {e}") from None
  return configs


def architecture_configs(name: str) -> dict[str, dict[str, Any]]:
  """{unet, vae, text_encoder, scheduler} configs of a shipped architecture (sd15, sd21)."""
  try:
    return single_file.shipped_architecture(name)
  except ValueError as e:
    raise ModelLoadError(str(e)) from None


# --------------------------------------------------------------------------------------------
# Loading.

def load_flax_msgpack(path: str, reference: Any, unused: tuple[str, ...] = ()) -> Any:
  """A Flax msgpack checkpoint, checked against the reference shapes (top-level subtrees
  named in `unused` are dropped)."""
  with open(path, "rb") as f:
    params = flax.serialization.msgpack_restore(f.read())
  params = {k: v for k, v in params.items() if k not in unused}
  expected = traverse_util.flatten_dict(reference)
  found = traverse_util.flatten_dict(params)
  for key, shape in expected.items():
    if key not in found:
      raise ModelLoadError(f"model.pretrained: {path} lacks weight {'/'.join(key)}")
    if tuple(found[key].shape) != tuple(shape.shape):
      raise ModelLoadError(f"model.pretrained: {path}: {'/'.join(key)} has shape "
                           f"{tuple(found[key].shape)}, the model needs {tuple(shape.shape)}")
  extra = sorted(set(found) - set(expected))
  if extra:
    raise ModelLoadError(f"model.pretrained: {path} has weight {'/'.join(extra[0])}, which "
                         "the model does not have")
  return params


def _to_float32(params: Any) -> Any:
  return jax.tree.map(lambda x: np.asarray(x, np.float32), params)


def load_component_params(directory: str, component: str, reference: Any,
                          variant: str | None = None) -> Any:
  """float32 numpy params of one component, from whichever weight file the folder has."""
  path = _component_weights(directory, component, variant)
  if path.endswith(".msgpack"):
    return _to_float32(load_flax_msgpack(path, reference))
  try:
    return weights.torch_to_flax(weights.load_state_dict(path), reference, path, component)
  except WeightsError as e:
    raise ModelLoadError(f"model.pretrained: {e}") from None


def load_single_file(path: str, dtype: str = "float32", attention: str = "xla",
                     config_dir: str | None = None) -> tuple[Components, dict[str, Any]]:
  """A single-file SD 1.x / 2.x checkpoint: with the configs and tokenizer of the diffusers
  folder `config_dir` (as diffusers' from_single_file(config=...)), else with the shipped
  architecture of its family and a CLIP tokenizer folder beside the file."""
  configs = read_configs(config_dir) if config_dir else None
  try:
    family, state_dicts = single_file.read_single_file(
        path, {k: v for k, v in configs.items() if k != "scheduler"} if configs else None)
  except (ValueError, OSError) as e:
    raise ModelLoadError(f"model.pretrained: {path}: {e}") from None
  if family == "sdxl":
    raise ModelLoadError(f"model.pretrained: {path} is an SDXL checkpoint; SDXL training is not "
                         "supported yet (SD 1.x and 2.x single files are)")
  if config_dir:
    tokenizer = tokenizers.ClipTokenizer.from_directory(os.path.join(config_dir, "tokenizer"))
  else:
    configs = architecture_configs(single_file.FAMILY_ARCHITECTURES[family])
    tokenizer = _family_tokenizer(path)
  components = build_components(configs, tokenizer, dtype, attention, where=path)
  references = components.abstract_params()
  params = {}
  for name in WEIGHTED:
    try:
      params[name] = weights.torch_to_flax(state_dicts[name], references[name], path, name)
    except WeightsError as e:
      raise ModelLoadError(f"model.pretrained: {e}") from None
  return components, params


def _family_tokenizer(path: str) -> tokenizers.ClipTokenizer:
  """CLIP's BPE tokenizer for a single file (which holds none): a `tokenizer/` folder beside
  the file."""
  candidate = os.path.join(os.path.dirname(os.path.abspath(path)), "tokenizer")
  if os.path.isdir(candidate):
    return tokenizers.ClipTokenizer.from_directory(candidate)
  raise ModelLoadError(
      f"model.pretrained: {path} holds no tokenizer; put the model's CLIP tokenizer folder "
      f"(vocab.json, merges.txt) beside it as {os.path.dirname(os.path.abspath(path))}/tokenizer")


def configured_attention(model_config) -> str:
  """model.attention, with the older switch model.memory_efficient_attention=true → chunked."""
  return "chunked" if model_config.memory_efficient_attention else model_config.attention


# --------------------------------------------------------------------------------------------
# Exporting.

def torch_config(component: str, config: dict[str, Any]) -> dict[str, Any]:
  """A component's config as the PyTorch class reads it (Flax-era keys and class names off)."""
  clean = {k: v for k, v in config.items()
           if k not in _FLAX_ONLY_KEYS and not k.startswith("_")}
  if component == "text_encoder":
    return {**clean, "architectures": [type_name_of_text_encoder(config)],
            "model_type": "clip_text_model"}
  if component == "scheduler":
    name = config.get("_class_name", "DDIMScheduler")
    name = name[4:] if name.startswith("Flax") else name
    return {"_class_name": name, "_diffusers_version": DIFFUSERS_VERSION, **clean}
  return {"_class_name": _TORCH_CLASSES[component][1], "_diffusers_version": DIFFUSERS_VERSION,
          **clean}


def type_name_of_text_encoder(config: dict[str, Any]) -> str:
  return (config.get("architectures") or ["CLIPTextModel"])[0]


def model_index(components: Components) -> dict[str, Any]:
  scheduler = torch_config("scheduler", components.configs["scheduler"])["_class_name"]
  return {"_class_name": "StableDiffusionPipeline", "_diffusers_version": DIFFUSERS_VERSION,
          "feature_extractor": [None, None], "requires_safety_checker": False,
          "safety_checker": [None, None], "scheduler": ["diffusers", scheduler],
          "text_encoder": list(_TORCH_CLASSES["text_encoder"]),
          "tokenizer": list(_TORCH_CLASSES["tokenizer"]), "unet": list(_TORCH_CLASSES["unet"]),
          "vae": list(_TORCH_CLASSES["vae"])}


def _write_json(path: str, value: Any) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(value, f, indent=2, sort_keys=True)
    f.write("\n")


def write_pipeline_dir(components: Components, host_params: dict[str, Any], out_dir: str,
                       fp16_variant: bool = False) -> None:
  """Writes a diffusers PyTorch-layout pipeline into `out_dir` (no atomicity: see
  export_pipeline)."""
  _write_json(os.path.join(out_dir, "model_index.json"), model_index(components))
  for component in ("unet", "vae", "text_encoder", "scheduler"):
    _write_json(os.path.join(out_dir, component, _CONFIG_FILES[component]),
                torch_config(component, components.configs[component]))
  for component in WEIGHTED:
    component_dir = os.path.join(out_dir, component)
    weights.save_component(component_dir, component, host_params[component], "float32")
    if fp16_variant:
      weights.save_component(component_dir, component, host_params[component], "float16",
                             variant="fp16")
  components.tokenizer.save(os.path.join(out_dir, "tokenizer"))


def export_pipeline(components: Components, params: dict[str, Any], out_dir: str,
                    fp16_variant: bool = False, single_file_path: str | None = None) -> None:
  """Writes the diffusers pipeline folder (and the single file), atomically: a temporary
  folder renamed into place, so a crash never leaves half an export.

  Every process must call it (the weights are gathered from all hosts); process 0 writes.
  """
  host_params = sharding.to_host({k: params[k] for k in WEIGHTED})
  if jax.process_index() != 0:
    return
  tmp_dir = out_dir.rstrip("/") + ".tmp"
  shutil.rmtree(tmp_dir, ignore_errors=True)
  try:
    write_pipeline_dir(components, host_params, tmp_dir, fp16_variant)
    failpoints.at("export", 0)
  except BaseException:  # a full disk, Ctrl-C: no half-written folder is left behind
    shutil.rmtree(tmp_dir, ignore_errors=True)
    raise
  old_dir = out_dir.rstrip("/") + ".old"
  shutil.rmtree(old_dir, ignore_errors=True)
  if os.path.exists(out_dir):
    os.rename(out_dir, old_dir)
  os.rename(tmp_dir, out_dir)
  failpoints.trace("write", os.path.join(out_dir, "*"))
  shutil.rmtree(old_dir, ignore_errors=True)
  if single_file_path:
    write_single_file(components, host_params, single_file_path)
    failpoints.trace("write", single_file_path)


def family_of(components: Components) -> str:
  """sd1 or sd2, from the text encoder the UNet attends to (SD 2.x: OpenCLIP's GELU)."""
  return "sd2" if components.text_encoder.hidden_act == "gelu" else "sd1"


def write_single_file(components: Components, host_params: dict[str, Any], path: str,
                      dtype: str = "float16") -> None:
  """The original-layout single file ComfyUI / A1111 / from_single_file load (atomic)."""
  state_dicts = {name: weights.flax_to_torch(host_params[name], name) for name in WEIGHTED}
  configs = {name: torch_config(name, components.configs[name]) for name in WEIGHTED}
  single_file.write_single_file(path, state_dicts, family_of(components), configs, dtype)
