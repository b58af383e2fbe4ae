"""Validation of a config and workdir before any heavy work: one line naming the field."""

from __future__ import annotations

import json
import os
import re

import ml_collections

from configs import common
from dreambooth_jax import models
from dreambooth_jax.data import demo_data, identifiers, input_pipeline
from dreambooth_jax.errors import ConfigError, DataError
from dreambooth_jax.models import attention, schedulers

DTYPES = ("float32", "bfloat16", "float16")
PARAM_DTYPES = ("float32", "bfloat16")
LR_SCHEDULES = ("constant", "linear", "cosine")


def _flatten(config: ml_collections.ConfigDict, prefix: str = "") -> dict[str, object]:
  flat = {}
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      flat.update(_flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def _require(condition: bool, field: str, message: str) -> None:
  if not condition:
    raise ConfigError(f"config.{field}: {message}")


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _check_prompt(field: str, prompt: str, allowed: tuple[str, ...]) -> None:
  """Only the allowed {placeholders}, well formed; {class} needs data.class_name."""
  try:
    names = identifiers.placeholder_names(prompt)
  except ValueError as e:
    raise ConfigError(f"config.{field}: {prompt!r} is not a valid template ({e})") from e
  unknown = sorted(names - set(allowed))
  _require(not unknown, field, f"{prompt!r} has unknown placeholder(s) "
           f"{', '.join('{' + name + '}' for name in unknown)}; allowed: "
           f"{', '.join('{' + name + '}' for name in allowed)}")


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError for unknown fields, wrong types and out-of-range values."""
  known = _flatten(common.get_config())
  given = _flatten(config)
  for field in given:
    _require(field in known, field, "unknown field (see configs/common.py for the fields)")
  for field, default in known.items():
    _require(field in given, field, "missing field")
    value = given[field]
    if isinstance(default, bool):
      _require(isinstance(value, bool), field, f"must be true or false, got {value!r}")
    elif _is_int(default):
      _require(_is_int(value), field, f"must be an integer, got {value!r}")
    elif isinstance(default, float):
      _require(isinstance(value, (int, float)) and not isinstance(value, bool), field,
               f"must be a number, got {value!r}")
    elif isinstance(default, str):
      _require(isinstance(value, str), field, f"must be a string, got {value!r}")

  _require(config.model.dtype in DTYPES, "model.dtype", f"must be one of {DTYPES}")
  _require(config.model.attention in attention.ATTENTION_IMPLEMENTATIONS, "model.attention",
           f"must be one of {attention.ATTENTION_IMPLEMENTATIONS}, got {config.model.attention!r}")
  _require(config.mesh.data >= 0, "mesh.data", f"must be >= 0 (0 = all), got {config.mesh.data}")
  _require(config.mesh.fsdp >= 1, "mesh.fsdp", f"must be >= 1, got {config.mesh.fsdp}")
  _require(bool(config.model.pretrained), "model.pretrained", "must be set")
  data, train = config.data, config.train
  _require(data.resolution >= 8 and data.resolution % 8 == 0, "data.resolution",
           f"must be a positive multiple of 8, got {data.resolution}")
  _require(bool(data.instance_prompt.strip()), "data.instance_prompt", "must not be empty")
  _require(bool(data.identifier.strip()) and " " not in data.identifier.strip(),
           "data.identifier", f"must be one word or {identifiers.AUTO!r}, got {data.identifier!r}")
  _check_prompt("data.instance_prompt", data.instance_prompt, ("identifier", "class"))
  named = "identifier" in identifiers.placeholder_names(data.instance_prompt) or (
      data.identifier != identifiers.AUTO and re.search(
          rf"(^|\W){re.escape(data.identifier)}(\W|$)", data.instance_prompt) is not None)
  _require(named, "data.instance_prompt",
           f"{data.instance_prompt!r} does not contain the identifier "
           f"{data.identifier!r} (or the placeholder {{identifier}})")
  _check_prompt("data.class_prompt", data.class_prompt, ("class",))
  for field in ("sample.prompts", "eval.prompts"):
    section, name = field.split(".")
    prompts = config[section][name]
    _require(isinstance(prompts, (tuple, list)) and all(isinstance(p, str) for p in prompts),
             field, "must be a tuple of strings")
    for prompt in prompts:
      _check_prompt(field, prompt, ("identifier", "class"))
  _require(train.steps >= 1, "train.steps", f"must be >= 1, got {train.steps}")
  _require(train.batch_size >= 1, "train.batch_size", f"must be >= 1, got {train.batch_size}")
  _require(train.learning_rate > 0, "train.learning_rate", "must be > 0")
  _require(train.lr_schedule in LR_SCHEDULES, "train.lr_schedule",
           f"must be one of {LR_SCHEDULES}, got {train.lr_schedule!r}")
  _require(0 <= train.warmup_steps <= train.steps, "train.warmup_steps",
           f"must be between 0 and train.steps ({train.steps}), got {train.warmup_steps}")
  _require(train.prior_loss_weight >= 0, "train.prior_loss_weight",
           f"must be >= 0, got {train.prior_loss_weight}")
  _require(train.max_grad_norm > 0, "train.max_grad_norm", "must be > 0")
  _require(train.text_encoder_learning_rate >= 0, "train.text_encoder_learning_rate",
           "must be >= 0 (0 = train.learning_rate)")
  _require(0 <= train.text_encoder_steps <= train.steps, "train.text_encoder_steps",
           f"must be between 0 (all steps) and train.steps ({train.steps}), got "
           f"{train.text_encoder_steps}")
  _require(train.min_snr_gamma >= 0, "train.min_snr_gamma", "must be >= 0 (0 = off)")
  _require(train.offset_noise >= 0, "train.offset_noise", "must be >= 0 (0 = off)")
  _require(train.param_dtype in PARAM_DTYPES, "train.param_dtype",
           f"must be one of {PARAM_DTYPES}, got {train.param_dtype!r}")
  _require(train.grad_accum_steps >= 1, "train.grad_accum_steps",
           f"must be >= 1, got {train.grad_accum_steps}")
  _require(train.prefetch_batches >= 0, "train.prefetch_batches",
           f"must be >= 0 (0 = off), got {train.prefetch_batches}")
  uses_class = any("class" in identifiers.placeholder_names(prompt) for prompt in (
      data.instance_prompt, data.class_prompt, *config.sample.prompts, *config.eval.prompts))
  _require(bool(data.class_name.strip()) or not uses_class, "data.class_name",
           "must be set: a prompt uses {class}")
  if train.with_prior_preservation:
    _require(bool(data.class_prompt.strip()), "data.class_prompt", "must not be empty")
    _require(data.num_class_images >= 1, "data.num_class_images",
             f"must be >= 1 with prior preservation, got {data.num_class_images}")
    _require(config.class_images.batch_size >= 1, "class_images.batch_size", "must be >= 1")
    _require(config.class_images.num_inference_steps >= 1, "class_images.num_inference_steps",
             "must be >= 1")
    _require(config.class_images.scheduler in schedulers.SAMPLERS,
             "class_images.scheduler", f"must be one of {sorted(schedulers.SAMPLERS)}")
  _require(config.sample.scheduler in schedulers.SAMPLERS, "sample.scheduler",
           f"must be one of {sorted(schedulers.SAMPLERS)}")
  _require(config.sample.num_images >= 1, "sample.num_images", "must be >= 1")
  _require(config.eval.every_steps >= 0, "eval.every_steps", "must be >= 0 (0 = never)")
  if config.eval.every_steps:
    _require(bool(config.eval.prompts or config.sample.prompts), "eval.prompts",
             "no validation prompts: set eval.prompts (or sample.prompts)")
    _require(config.eval.num_images >= 1, "eval.num_images", "must be >= 1")
    _require(config.eval.num_inference_steps >= 1, "eval.num_inference_steps", "must be >= 1")
    _require(config.eval.scheduler in schedulers.SAMPLERS, "eval.scheduler",
             f"must be one of {sorted(schedulers.SAMPLERS)}")
  _require(config.sample.num_inference_steps >= 1, "sample.num_inference_steps", "must be >= 1")
  _require(config.checkpoint.every_steps >= 1, "checkpoint.every_steps", "must be >= 1")
  _require(config.checkpoint.max_to_keep >= 1, "checkpoint.max_to_keep", "must be >= 1")
  _require(config.log.every_steps >= 1, "log.every_steps", "must be >= 1")
  if data.instance_dir not in demo_data.BUILTIN_INSTANCE_DIRS:
    try:
      paths = input_pipeline.list_images(data.instance_dir)
    except DataError as e:
      raise ConfigError(f"config.{e}") from e
    _require(bool(paths), "data.instance_dir",
             f"{data.instance_dir} holds no images ({', '.join(input_pipeline.IMAGE_EXTENSIONS)})")
  try:
    models.check_pretrained(config.model.pretrained)
    factor = models.local_vae_scale_factor(config.model.pretrained)
  except models.ModelLoadError as e:
    raise ConfigError(f"config.{e}") from e
  # A hub id's factor is known only after its download; train.py checks it then.
  _require(factor is None or data.resolution % factor == 0, "data.resolution",
           f"{data.resolution} is not a multiple of the VAE's downsampling factor {factor}")
  _check_attention(config.model)


def _check_attention(model: ml_collections.ConfigDict) -> None:
  """cuDNN's flash attention exists only on GPUs and only for half precision."""
  if model.attention != "cudnn":
    return
  import jax  # pylint: disable=g-import-not-at-top  (only here: the rest checks without jax)
  backend = jax.default_backend()
  _require(backend == "gpu", "model.attention",
           f'"cudnn" needs a GPU, but the backend is {backend!r}; use "xla" or "chunked"')
  _require(model.dtype in ("bfloat16", "float16"), "model.attention",
           f'"cudnn" takes bfloat16 or float16, but model.dtype is {model.dtype!r}; set '
           'model.dtype=bfloat16 or use "xla"')


def check_workdir(workdir: str) -> None:
  """The workdir must be (or be creatable as) a writable directory."""
  if not workdir:
    raise ConfigError("--workdir must be set")
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f"--workdir: {workdir} is a file, not a directory")
  parent = workdir
  while not os.path.exists(parent):
    parent = os.path.dirname(os.path.abspath(parent))
  if not os.access(parent, os.W_OK | os.X_OK):
    raise ConfigError(f"--workdir: {parent} is not writable")


# Fields that may differ between a run and its resumption: they change neither the math of
# the steps already taken nor the data they used.
CHANGEABLE_ON_RESUME = ("resume_ignore_changes", "train.steps", "checkpoint.", "log.", "sample.",
                        "class_images.batch_size", "train.cache_latents",
                        "train.cache_text_embeddings", "train.grad_accum_steps", "train.remat",
                        "train.prefetch_batches", "model.memory_efficient_attention",
                        "model.attention", "mesh.", "distributed.", "export.")


def changed_fields(previous: dict, config: ml_collections.ConfigDict) -> list[str]:
  """'field: old → new' for each field (beyond CHANGEABLE_ON_RESUME) that differs.

  A field the old run's config.json lacks (written before the field existed) had its default.
  """
  old = {**_flatten(common.get_config()), **_flatten(ml_collections.ConfigDict(previous))}
  new = _flatten(ml_collections.ConfigDict(json.loads(config.to_json_best_effort())))
  changes = []
  for field in sorted(set(old) | set(new)):
    if field.startswith(CHANGEABLE_ON_RESUME) or field in CHANGEABLE_ON_RESUME:
      continue
    if old.get(field, "<unset>") != new.get(field, "<unset>"):
      changes.append(f"{field}: {old.get(field, '<unset>')!r} → {new.get(field, '<unset>')!r}")
  return changes


def check_resume(previous: dict, config: ml_collections.ConfigDict) -> list[str]:
  """Raises ConfigError if resuming would silently change the math; returns accepted changes."""
  changes = changed_fields(previous, config)
  if changes and not config.resume_ignore_changes:
    raise ConfigError(
        f"config differs from the run this workdir holds ({'; '.join(changes)}); use the old "
        "values, another --workdir, or --config.resume_ignore_changes=true")
  return changes
