"""Models that need no download: the tiny random pipeline (tests, benchmarks), the committed
toy-world model (the demo) and random weights of a shipped architecture (speed and memory
measurements at real sizes).

Each is a diffusers-layout folder of PyTorch safetensors, exactly as a hub repo holds one, so
the code that loads them is the code that loads a user's model. That code starts here: this
module resolves any model.pretrained (builtin name, local folder, hub id, single file) and loads
it through pipeline.py, which knows no builtin names (so the two import one way).
"""

from __future__ import annotations

import functools
import importlib
import os
from typing import Any

from dreambooth_jax import build_cache, toyworld
from dreambooth_jax.errors import ModelLoadError
from dreambooth_jax.models import pipeline, tokenizer as tokenizers, vae as vae_lib

PREFIX = "builtin:"
TINY = "builtin:tiny-sd"
TOYWORLD = "builtin:toyworld"
# Random weights of a shipped architecture (dreambooth_jax/architectures/<name>.json), with a
# small word tokenizer: what the benchmark times at Stable Diffusion's real sizes.
RANDOM_PREFIX = "builtin:random-"
MODELS = (TINY, TOYWORLD, RANDOM_PREFIX + "sd15", RANDOM_PREFIX + "sd21")

TINY_WORDS = (
    "a an the of on in at with and photo picture image painting drawing rendering sks toy dog "
    "cat car bag bowl can boot backpack sunglasses teapot vase clock candle shoe beach snow "
    "grass night city forest water table floor mountain street red blue green yellow orange "
    "purple pink black white brown gray small big wet cube ball sphere box checkered striped "
    "top front view close up shiny colorful old new sitting lying floating cute").split()

TINY_UNET = dict(_class_name="UNet2DConditionModel", sample_size=16, in_channels=4,
                 out_channels=4, down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                 up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
                 block_out_channels=[32, 64], layers_per_block=1, attention_head_dim=8,
                 cross_attention_dim=32)
TINY_VAE = dict(_class_name="AutoencoderKL", in_channels=3, out_channels=3,
                down_block_types=["DownEncoderBlock2D"] * 2,
                up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[32, 64],
                latent_channels=4, layers_per_block=1, sample_size=32, scaling_factor=0.18215)
TINY_SCHEDULER = dict(_class_name="DDIMScheduler", beta_start=0.00085, beta_end=0.012,
                      beta_schedule="scaled_linear", num_train_timesteps=1000,
                      clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                      prediction_type="epsilon")


def tiny_text_config(vocab_size: int, max_positions: int = 77) -> dict:
  return dict(architectures=["CLIPTextModel"], model_type="clip_text_model",
              vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, max_position_embeddings=max_positions,
              hidden_act="quick_gelu", layer_norm_eps=1e-5, bos_token_id=vocab_size - 2,
              eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1, projection_dim=32)


def check(pretrained: str) -> None:
  if pretrained not in MODELS:
    raise ModelLoadError(f"model.pretrained: unknown builtin model {pretrained!r}; "
                                  f"choose one of {', '.join(MODELS)}")


def resolve_pretrained(pretrained: str, revision: str | None = None,
                       variant: str | None = None) -> str:
  """A local diffusers-layout directory for a builtin name, a local path or a hub id."""
  if pretrained.startswith(PREFIX):
    check(pretrained)
    if pretrained == TOYWORLD:
      return toyworld.PRETRAINED_DIR
    if pretrained == TINY:
      build = build_tiny_pipeline
    else:
      build = functools.partial(build_random_pipeline, pretrained[len(RANDOM_PREFIX):])
    # Keyed by the model layer's source: its init and file writers decide what is built.
    return build_cache.built_dir(pretrained[len(PREFIX):], build,
                                 importlib.import_module("dreambooth_jax.models"))
  return (pipeline.local_dir(pretrained, "model.pretrained")
          or pipeline.download_from_hub(pretrained, revision, variant))


def check_pretrained(pretrained: str) -> None:
  """The checks of `pretrained` that need no download: a builtin name, a single file or a
  local directory."""
  if pretrained.startswith(PREFIX):
    check(pretrained)
  elif pretrained.endswith(".safetensors") and os.path.exists(pretrained):
    if not os.path.isfile(pretrained):
      raise ModelLoadError(f"model.pretrained: {pretrained} is not a file")
  elif os.path.exists(pretrained) or not pipeline.is_hub_id(pretrained):
    pipeline.check_pipeline_dir(resolve_pretrained(pretrained))


def local_vae_scale_factor(pretrained: str) -> int | None:
  """The VAE's pixels per latent of a builtin or local pipeline folder, read from its config
  (no weights); None for a hub id or a single file."""
  if not (pretrained.startswith(PREFIX) or os.path.isdir(pretrained)):
    return None
  vae_config = pipeline.read_configs(resolve_pretrained(pretrained))["vae"]
  return vae_lib.scale_factor(vae_config["block_out_channels"])


def load_pretrained(pretrained: str, revision: str | None = None, dtype: str = "float32",
                    attention: str = "xla", variant: str | None = None,
                    single_file_config: str | None = None
                    ) -> tuple[pipeline.Components, dict[str, Any]]:
  """Returns our modules and float32 params {'unet', 'vae', 'text_encoder'} of a builtin name,
  a local diffusers folder, a hub id or a single-file checkpoint (whose architecture is the
  shipped one of its family, or that of the diffusers folder `single_file_config`)."""
  if pipeline.is_single_file(pretrained):
    return pipeline.load_single_file(pretrained, dtype, attention, single_file_config)
  directory = resolve_pretrained(pretrained, revision, variant)
  pipeline.check_pipeline_dir(directory, variant)
  try:
    tokenizer = tokenizers.ClipTokenizer.from_directory(os.path.join(directory, "tokenizer"))
  except (OSError, ValueError) as e:
    raise ModelLoadError(f"model.pretrained: {directory}/tokenizer: {e}") from None
  components = pipeline.build_components(pipeline.read_configs(directory), tokenizer, dtype,
                                         attention)
  references = components.abstract_params()
  params = {name: pipeline.load_component_params(directory, name, references[name], variant)
            for name in pipeline.WEIGHTED}
  return components, params


def load_configured(model_config) -> tuple[pipeline.Components, dict[str, Any]]:
  """load_pretrained with a config's model.* fields."""
  return load_pretrained(model_config.pretrained, model_config.revision or None,
                         model_config.dtype, pipeline.configured_attention(model_config),
                         model_config.variant or None,
                         model_config.single_file_config or None)


def load_tokenizer(pretrained: str, revision: str | None = None) -> tokenizers.ClipTokenizer:
  """Only the tokenizer of a pipeline (for a hub id, only its tokenizer files are downloaded)."""
  if pretrained.startswith(PREFIX) or os.path.exists(pretrained):
    directory = resolve_pretrained(pretrained, revision)
  else:
    import huggingface_hub  # pylint: disable=g-import-not-at-top
    directory = huggingface_hub.snapshot_download(pretrained, revision=revision,
                                                  allow_patterns=["tokenizer/*"])
  tokenizer_dir = os.path.join(directory, "tokenizer")
  if not any(os.path.isfile(os.path.join(tokenizer_dir, f))
             for f in ("vocab.json", "tokenizer.json")):
    raise ModelLoadError(f"model.pretrained: {directory} has no tokenizer/vocab.json")
  return tokenizers.ClipTokenizer.from_directory(tokenizer_dir)


def _save_random(configs: dict, tokenizer: tokenizers.ClipTokenizer, out_dir: str,
                 seed: int) -> str:
  """Random weights for `configs`, saved like a hub repo."""
  components = pipeline.build_components(configs, tokenizer)
  pipeline.write_pipeline_dir(components, components.init_params(seed), out_dir)
  return out_dir


def build_tiny_pipeline(out_dir: str, seed: int = 0, prediction_type: str = "epsilon",
                        unet_overrides: dict[str, Any] | None = None) -> str:
  """A random-init SD-shaped pipeline (32 px images), deterministic from `seed`; benchmarks
  swap in a larger UNet with `unet_overrides` (fields of TINY_UNET)."""
  tokenizer = tokenizers.build_word_tokenizer(TINY_WORDS, model_max_length=77)
  configs = {"unet": dict(TINY_UNET, **(unet_overrides or {})), "vae": TINY_VAE,
             "text_encoder": tiny_text_config(len(tokenizer)),
             "scheduler": dict(TINY_SCHEDULER, prediction_type=prediction_type)}
  return _save_random(configs, tokenizer, out_dir, seed)


def build_random_pipeline(architecture: str, out_dir: str, seed: int = 0) -> str:
  """Random weights of a shipped architecture, with the tiny word tokenizer (its ids fit any
  CLIP vocabulary)."""
  configs = pipeline.architecture_configs(architecture)
  tokenizer = tokenizers.build_word_tokenizer(
      TINY_WORDS, model_max_length=configs["text_encoder"]["max_position_embeddings"])
  return _save_random(configs, tokenizer, out_dir, seed)
