"""Loading, exporting and (for tests and the demo) building Stable Diffusion components.

Everything is loaded from a local directory in the diffusers layout; a hub id is first turned
into one by downloading only the files we need. Per component, Flax weights are used when
present, else PyTorch weights (safetensors or .bin) are converted on load, which needs torch
(`pip install -e ".[torch]"`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from typing import Any

from dreambooth_jax import quiet  # noqa: F401  (must precede diffusers/transformers)

import flax.linen as nn
import jax
import jax.numpy as jnp
from diffusers import (FlaxAutoencoderKL, FlaxDDIMScheduler, FlaxDDPMScheduler,
                       FlaxDPMSolverMultistepScheduler, FlaxEulerDiscreteScheduler,
                       FlaxLMSDiscreteScheduler, FlaxPNDMScheduler,
                       FlaxStableDiffusionPipeline, FlaxUNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTokenizer, FlaxCLIPTextModel

from dreambooth_jax import faults, sharding, toyworld

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
BUILTIN_PREFIX = "builtin:"
BUILTIN_TINY = "builtin:tiny-sd"
# The toy-world base model pretrained by `dreambooth_jax.toyworld.pretrain`, shipped in the
# package (the demo's model): it draws 32x32 pictures that follow their captions.
BUILTIN_TOYWORLD = "builtin:toyworld"
BUILTIN_MODELS = (BUILTIN_TINY, BUILTIN_TOYWORLD)

# Weight files per component, in order of preference (Flax first; PyTorch converted on load).
_DIFFUSERS_FLAX = "diffusion_flax_model.msgpack"
_DIFFUSERS_PT = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
_TRANSFORMERS_FLAX = "flax_model.msgpack"
_TRANSFORMERS_PT = ("model.safetensors", "pytorch_model.bin")

SAMPLING_SCHEDULERS = {
    "ddim": FlaxDDIMScheduler,
    "dpm": FlaxDPMSolverMultistepScheduler,
    "pndm": FlaxPNDMScheduler,
    "euler": FlaxEulerDiscreteScheduler,
    "lms": FlaxLMSDiscreteScheduler,
}


class ModelLoadError(ValueError):
  """A pretrained model that cannot be used; the message names the path and the part."""


@dataclasses.dataclass(frozen=True)
class Components:
  """The module definitions (no weights) of one Stable Diffusion pipeline."""
  tokenizer: CLIPTokenizer
  text_encoder: FlaxCLIPTextModel
  vae: FlaxAutoencoderKL
  unet: FlaxUNet2DConditionModel
  scheduler_config: dict[str, Any]

  @property
  def vae_scale_factor(self) -> int:
    return 2 ** (len(self.vae.config.block_out_channels) - 1)

  @property
  def prediction_type(self) -> str:
    return self.scheduler_config.get("prediction_type", "epsilon")

  def _scheduler(self, cls):
    """`cls` with the model's betas and prediction type (its config minus _class_name etc.)."""
    return cls.from_config({k: v for k, v in self.scheduler_config.items()
                            if not k.startswith("_")})

  def noise_scheduler(self) -> FlaxDDPMScheduler:
    """The training-time noise schedule."""
    return self._scheduler(FlaxDDPMScheduler)

  def sampling_scheduler(self, name: str):
    if name not in SAMPLING_SCHEDULERS:
      raise ValueError(f"unknown scheduler {name!r}; choose one of {sorted(SAMPLING_SCHEDULERS)}")
    return self._scheduler(SAMPLING_SCHEDULERS[name])


def cache_dir() -> str:
  return os.environ.get("DREAMBOOTH_JAX_CACHE",
                        os.path.join(os.path.expanduser("~"), ".cache", "dreambooth_jax"))


def resolve_pretrained(pretrained: str, revision: str | None = None) -> str:
  """Returns a local diffusers-layout directory for a hub id, a local path or a builtin name."""
  if pretrained.startswith(BUILTIN_PREFIX):
    _check_builtin(pretrained)
    if pretrained == BUILTIN_TOYWORLD:
      return toyworld.PRETRAINED_DIR
    path = os.path.join(cache_dir(), "tiny-sd")
    if not os.path.isfile(os.path.join(path, "model_index.json")):
      build_tiny_pipeline(path)
    return path
  return local_dir(pretrained, "model.pretrained") or _download_from_hub(pretrained, revision)


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


def _download_from_hub(repo_id: str, revision: str | None) -> str:
  """Downloads configs, tokenizer files and one weight format per component."""
  import huggingface_hub  # pylint: disable=g-import-not-at-top
  files = set(huggingface_hub.list_repo_files(repo_id, revision=revision))
  patterns = ["model_index.json", "*/*.json", "*/*.txt"]
  for component in ("unet", "vae"):
    candidates = (_DIFFUSERS_FLAX,) + _DIFFUSERS_PT
    patterns += [f"{component}/{_first_present(files, component, candidates)}"]
  patterns += [f"text_encoder/{_first_present(files, 'text_encoder', (_TRANSFORMERS_FLAX,) + _TRANSFORMERS_PT)}"]
  return huggingface_hub.snapshot_download(repo_id, revision=revision, allow_patterns=patterns)


def _first_present(files: set[str], component: str, candidates: tuple[str, ...]) -> str:
  for name in candidates:
    if f"{component}/{name}" in files:
      return name
  raise ModelLoadError(f"model.pretrained: the hub repo has no weights for {component} "
                       f"(looked for {', '.join(candidates)})")


def _weights_file(directory: str, component: str, candidates: tuple[str, ...]) -> str:
  for name in candidates:
    if os.path.isfile(os.path.join(directory, component, name)):
      return os.path.join(directory, component, name)
  raise ModelLoadError(f"model.pretrained: {os.path.join(directory, component)} has no weights "
                       f"(looked for {', '.join(candidates)})")


def check_pipeline_dir(directory: str) -> None:
  """Fails with one line if a component folder or its config is missing (cheap, no weights)."""
  required = {"unet": "config.json", "vae": "config.json", "text_encoder": "config.json",
              "tokenizer": "vocab.json", "scheduler": "scheduler_config.json"}
  for component, config_file in required.items():
    if not os.path.isfile(os.path.join(directory, component, config_file)):
      raise ModelLoadError(f"model.pretrained: {directory} is missing component {component!r} "
                           f"({component}/{config_file} not found)")
  for component in ("unet", "vae"):
    _weights_file(directory, component, (_DIFFUSERS_FLAX,) + _DIFFUSERS_PT)
  _weights_file(directory, "text_encoder", (_TRANSFORMERS_FLAX,) + _TRANSFORMERS_PT)


def check_pretrained(pretrained: str) -> None:
  """The checks of `pretrained` that need no download: a builtin name or a local directory."""
  if pretrained.startswith(BUILTIN_PREFIX):
    _check_builtin(pretrained)
    return
  if os.path.exists(pretrained) or not is_hub_id(pretrained):
    check_pipeline_dir(resolve_pretrained(pretrained))


def _check_builtin(pretrained: str) -> None:
  if pretrained not in BUILTIN_MODELS:
    raise ModelLoadError(f"model.pretrained: unknown builtin model {pretrained!r}; "
                         f"choose one of {', '.join(BUILTIN_MODELS)}")


def is_hub_id(name: str) -> bool:
  return not name.startswith((".", "/", "~")) and name.count("/") == 1


def _require_torch(weights: str) -> None:
  try:
    import torch  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    raise ModelLoadError(f"model.pretrained: {weights} is PyTorch; converting it needs torch "
                         '(pip install -e ".[torch]")') from e


def _load_diffusers_model(cls, directory: str, component: str, dtype):
  weights = _weights_file(directory, component, (_DIFFUSERS_FLAX,) + _DIFFUSERS_PT)
  if weights.endswith(_DIFFUSERS_FLAX):
    return cls.from_pretrained(directory, subfolder=component, dtype=dtype, local_files_only=True)
  _require_torch(weights)
  from diffusers.models.model_loading_utils import load_state_dict  # pylint: disable=g-import-not-at-top
  from diffusers.models.modeling_flax_pytorch_utils import convert_pytorch_state_dict_to_flax  # pylint: disable=g-import-not-at-top
  model = cls.from_config(cls.load_config(os.path.join(directory, component)), dtype=dtype)
  params = convert_pytorch_state_dict_to_flax(load_state_dict(weights), model)
  return model, params


def _load_text_encoder(directory: str, dtype):
  weights = _weights_file(directory, "text_encoder", (_TRANSFORMERS_FLAX,) + _TRANSFORMERS_PT)
  from_pt = not weights.endswith(_TRANSFORMERS_FLAX)
  if from_pt:
    _require_torch(weights)
  model = FlaxCLIPTextModel.from_pretrained(os.path.join(directory, "text_encoder"), dtype=dtype,
                                            from_pt=from_pt, local_files_only=True)
  return model, model.params


def load_pretrained(pretrained: str, revision: str | None = None, dtype: str = "float32",
                    memory_efficient_attention: bool = False
                    ) -> tuple[Components, dict[str, Any]]:
  """Returns the module definitions and float32 params {'unet', 'vae', 'text_encoder'}."""
  directory = resolve_pretrained(pretrained, revision)
  check_pipeline_dir(directory)
  compute_dtype = jnp.dtype(dtype)
  unet, unet_params = _load_diffusers_model(FlaxUNet2DConditionModel, directory, "unet",
                                            compute_dtype)
  vae, vae_params = _load_diffusers_model(FlaxAutoencoderKL, directory, "vae", compute_dtype)
  text_encoder, text_params = _load_text_encoder(directory, compute_dtype)
  tokenizer = CLIPTokenizer.from_pretrained(os.path.join(directory, "tokenizer"))
  with open(os.path.join(directory, "scheduler", "scheduler_config.json")) as f:
    scheduler_config = json.load(f)
  if memory_efficient_attention:
    unet = unet.clone(use_memory_efficient_attention=True)
  components = Components(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, unet=unet,
                          scheduler_config=scheduler_config)
  params = {"unet": unet_params, "vae": vae_params, "text_encoder": text_params}
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  return components, params


@contextlib.contextmanager
def unet_block_remat(enabled: bool = True):
  """While a UNet is traced inside, its ResNet and transformer blocks are rematerialized.

  diffusers' Flax UNet has no gradient-checkpointing option, and its blocks build their
  ResNets and transformers by these module-level names, so for the trace they name
  `nn.remat` versions: same parameters, activations recomputed in the backward pass.
  """
  if not enabled:
    yield
    return
  from diffusers.models.unets import unet_2d_blocks_flax as blocks  # pylint: disable=g-import-not-at-top
  originals = {name: getattr(blocks, name)
               for name in ("FlaxResnetBlock2D", "FlaxTransformer2DModel")}
  try:
    for name, module in originals.items():
      setattr(blocks, name, nn.remat(module))
    yield
  finally:
    for name, module in originals.items():
      setattr(blocks, name, module)


def load_configured(model_config) -> tuple[Components, dict[str, Any]]:
  """load_pretrained with a config's model.* fields."""
  return load_pretrained(model_config.pretrained, model_config.revision or None,
                         model_config.dtype, model_config.memory_efficient_attention)


def load_tokenizer(pretrained: str, revision: str | None = None) -> CLIPTokenizer:
  """Only the tokenizer of a pipeline (for a hub id, only its tokenizer files are downloaded)."""
  if pretrained.startswith(BUILTIN_PREFIX) or os.path.exists(pretrained):
    directory = resolve_pretrained(pretrained, revision)
  else:
    import huggingface_hub  # pylint: disable=g-import-not-at-top
    directory = huggingface_hub.snapshot_download(pretrained, revision=revision,
                                                  allow_patterns=["tokenizer/*"])
  if not os.path.isfile(os.path.join(directory, "tokenizer", "vocab.json")):
    raise ModelLoadError(f"model.pretrained: {directory} has no tokenizer/vocab.json")
  return CLIPTokenizer.from_pretrained(os.path.join(directory, "tokenizer"))


def export_pipeline(components: Components, params: dict[str, Any], out_dir: str) -> None:
  """Writes a complete FlaxStableDiffusionPipeline directory, atomically (tmp dir + rename).

  Every process must call it (the weights are gathered from all hosts); process 0 writes.
  """
  host_params = sharding.to_host({k: params[k] for k in ("unet", "vae", "text_encoder")})
  if jax.process_index() != 0:
    return
  tmp_dir = out_dir.rstrip("/") + ".tmp"
  shutil.rmtree(tmp_dir, ignore_errors=True)
  pipeline = FlaxStableDiffusionPipeline(
      vae=components.vae, text_encoder=components.text_encoder, tokenizer=components.tokenizer,
      unet=components.unet, scheduler=components.sampling_scheduler("ddim"),
      safety_checker=None, feature_extractor=None)
  pipeline.save_pretrained(tmp_dir, params=host_params)
  faults.at("export", 0)
  old_dir = out_dir.rstrip("/") + ".old"
  shutil.rmtree(old_dir, ignore_errors=True)
  if os.path.exists(out_dir):
    os.rename(out_dir, old_dir)
  os.rename(tmp_dir, out_dir)
  shutil.rmtree(old_dir, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# The tiny Stable-Diffusion-shaped pipeline used by the demo and the tests.

TINY_WORDS = (
    "a an the of on in at with and photo picture image painting drawing rendering sks toy dog "
    "cat car bag bowl can boot backpack sunglasses teapot vase clock candle shoe beach snow "
    "grass night city forest water table floor mountain street red blue green yellow orange "
    "purple pink black white brown gray small big wet cube ball sphere box checkered striped "
    "top front view close up shiny colorful old new sitting lying floating cute").split()


def _write_word_tokenizer_files(directory: str, words: Sequence[str]) -> None:
  """vocab.json and merges.txt of a CLIP byte-level BPE that keeps each of `words` whole.

  Each word's merges join its characters left to right, in the order of `words` (a later word
  gets higher merge ids: rarer, to `identifiers`); every byte keeps a token, so any text
  tokenizes.
  """
  from transformers.models.clip.tokenization_clip import bytes_to_unicode  # pylint: disable=g-import-not-at-top
  byte_chars = list(bytes_to_unicode().values())
  vocab = byte_chars + [c + "</w>" for c in byte_chars]
  merges = []
  for word in words:
    symbols = list(word[:-1]) + [word[-1] + "</w>"]
    while len(symbols) > 1:
      merged = symbols[0] + symbols[1]
      merge = f"{symbols[0]} {symbols[1]}"
      if merge not in merges:
        merges.append(merge)
        vocab.append(merged)
      symbols = [merged] + symbols[2:]
  vocab += ["<|startoftext|>", "<|endoftext|>"]
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "vocab.json"), "w") as f:
    json.dump({token: i for i, token in enumerate(vocab)}, f)
  with open(os.path.join(directory, "merges.txt"), "w") as f:
    f.write("#version: 0.2\n" + "\n".join(merges) + "\n")


def build_word_tokenizer(words: Sequence[str], model_max_length: int) -> CLIPTokenizer:
  """A CLIPTokenizer that keeps each of `words` whole (its files are written to a scratch
  directory, read, and removed)."""
  with tempfile.TemporaryDirectory() as scratch:
    _write_word_tokenizer_files(scratch, words)
    return CLIPTokenizer(os.path.join(scratch, "vocab.json"), os.path.join(scratch, "merges.txt"),
                         model_max_length=model_max_length)


TINY_UNET = dict(sample_size=16, in_channels=4, out_channels=4,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                 block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=8,
                 cross_attention_dim=32)
TINY_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64),
                latent_channels=4, layers_per_block=1, sample_size=32)
TINY_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=False,
                      steps_offset=1, prediction_type="epsilon")


def tiny_text_config(vocab_size: int) -> CLIPTextConfig:
  return CLIPTextConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                        bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
                        pad_token_id=vocab_size - 1)


def build_tiny_pipeline(out_dir: str, seed: int = 0, prediction_type: str = "epsilon") -> str:
  """Builds a random-init SD-shaped pipeline (32 px images) and saves it like a hub repo.

  Deterministic from `seed`; written to a temporary directory first so a crash never leaves a
  half-built model behind.
  """
  tmp_dir = out_dir.rstrip("/") + f".tmp{os.getpid()}"
  shutil.rmtree(tmp_dir, ignore_errors=True)
  tokenizer = build_word_tokenizer(TINY_WORDS, model_max_length=77)
  rng_unet, rng_vae = jax.random.split(jax.random.key(seed))
  unet = FlaxUNet2DConditionModel(**TINY_UNET)
  vae = FlaxAutoencoderKL(**TINY_VAE)
  text_encoder = FlaxCLIPTextModel(tiny_text_config(len(tokenizer)), seed=seed)
  scheduler = FlaxDDIMScheduler.from_config(dict(TINY_SCHEDULER, prediction_type=prediction_type))
  pipeline = FlaxStableDiffusionPipeline(
      vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
      safety_checker=None, feature_extractor=None)
  params = {"unet": unet.init_weights(rng_unet), "vae": vae.init_weights(rng_vae),
            "text_encoder": text_encoder.params}
  pipeline.save_pretrained(tmp_dir, params=params)
  shutil.rmtree(out_dir, ignore_errors=True)
  os.makedirs(os.path.dirname(os.path.abspath(out_dir)), exist_ok=True)
  os.rename(tmp_dir, out_dir)
  return out_dir
