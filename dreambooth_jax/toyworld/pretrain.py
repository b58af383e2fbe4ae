"""A tiny Stable-Diffusion-shaped base model, pretrained from scratch on the toy world.

Why: DreamBooth fine-tunes a model that already knows its world: "a ball", "on the beach".
A random-init pipeline cannot show recontextualisation or prior preservation; this one, with
the same networks as Stable Diffusion (our AutoencoderKL, UNet2DConditionModel and CLIP text
encoder with a CLIP BPE tokenizer, a DDPM/DDIM schedule), draws 32x32 pictures that follow
their captions' class, colour and scene. Its weights are committed (`pretrained/`), so the
DreamBooth demo needs no pretraining.

  python -m dreambooth_jax.toyworld.pretrain --out=dreambooth_jax/toyworld/pretrained \
      --grid=docs/toyworld_pretrain.png [--minutes=75] [--seed=0]

Stage 1 trains the autoencoder (32x32 pixels <-> 8x8x4 latents: L1 reconstruction plus a small
KL term), then sets its `scaling_factor` to 1 / std of the training latents, as in SD. Stage 2
trains the UNet and the text encoder jointly from scratch with the ε-prediction diffusion loss
of `training/step.py` (min-SNR-5 weighted), on latents encoded once, with an exponential moving
average of both that is what gets exported. Each step re-draws every picture's caption from its
attributes: size, colour and scene each left out with probability 1/4, and 1 caption in 10
empty, for classifier-free guidance. The tokenizer keeps every world word, a few words a user
may type ("photo", "of") and a few rare identifiers whole; the rare ones ("sks" last, the
rarest) never occur in a caption, so they start out unbound, as DreamBooth wants (§3.2).

Everything is deterministic from --seed; --minutes is a wall-clock cap that stops stage 2 early
(and says so in quality.json) rather than a training length. The finished pipeline is sampled
(DDIM, guidance) on every class x colour x scene caption and scored by the judges; the scores
go to quality.json in the pipeline directory, written with the pipeline, atomically.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from configs import common
from dreambooth_jax import atomic_files, errors, models, sharding
from dreambooth_jax import toyworld
from dreambooth_jax.data import input_pipeline
from dreambooth_jax.models import builtin, pipeline, sampling
from dreambooth_jax.models import vae as vae_lib
from dreambooth_jax.models.tokenizer import ClipTokenizer
from dreambooth_jax.toyworld import judges as judges_lib
from dreambooth_jax.toyworld import world
from dreambooth_jax.training import step as train_step

DEFAULT_DIR = toyworld.PRETRAINED_DIR
QUALITY_FILE = "quality.json"
IMAGE_SIZE = 32
IDENTIFIER = "sks"
# Words kept whole besides the world's: some a user may put in a prompt (never in a caption,
# so their embeddings stay untrained) and rare identifiers, "sks" last: the highest merge id,
# which `identifiers` reads as the rarest token.
EXTRA_WORDS = ("an", "of", "photo", "picture", "with", "and", "toy")
RARE_TOKENS = ("zwx", "vkq", IDENTIFIER)
MAX_LENGTH = 16  # tokens per prompt: the longest caption has 9, "a photo of a sks ball ..." 11
EMPTY_CAPTION_PROB = 0.1
CAPTION_DROP_PROB = 0.25  # as world.sample_example: size, colour, scene each left out

# The autoencoder: 3 blocks, so a factor of 4 (32x32x3 -> 8x8x4). latent_channels must differ
# from the latent side, 8: the VAE's decode tells NCHW from NHWC by the last axis.
VAE_CONFIG = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                  up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(16, 32, 64),
                  latent_channels=4, layers_per_block=1, norm_num_groups=16,
                  sample_size=IMAGE_SIZE)
# The UNet on 8x8 latents: cross-attention at 4x4, 2x2 and in the middle block; none at 8x8,
# where it would double the step time. Channels are multiples of 32 (the Flax UNet's groups).
UNET_CONFIG = dict(sample_size=IMAGE_SIZE // 4, in_channels=4, out_channels=4,
                   down_block_types=("DownBlock2D", "CrossAttnDownBlock2D",
                                     "CrossAttnDownBlock2D"),
                   up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                   block_out_channels=(32, 64, 64), layers_per_block=1, attention_head_dim=4,
                   cross_attention_dim=64)
TEXT_CONFIG = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=3,
                   num_attention_heads=4)
SCHEDULER_CONFIG = dict(builtin.TINY_SCHEDULER)  # SD's scaled-linear betas, ε-prediction


@dataclasses.dataclass(frozen=True)
class Architecture:
  """Component configs; the tests shrink them, the committed model uses the defaults."""
  vae: dict[str, Any] = dataclasses.field(default_factory=lambda: dict(VAE_CONFIG))
  unet: dict[str, Any] = dataclasses.field(default_factory=lambda: dict(UNET_CONFIG))
  text: dict[str, Any] = dataclasses.field(default_factory=lambda: dict(TEXT_CONFIG))


@dataclasses.dataclass(frozen=True)
class Settings:
  """Everything a run depends on besides the architecture; the defaults made the committed
  model (about an hour on 2 CPU cores)."""
  seed: int = 0
  minutes: float = 75.0  # wall-clock cap on the whole run (stage 2 stops early past it)
  vae_images: int = 20000
  vae_steps: int = 3000
  vae_batch_size: int = 16
  vae_learning_rate: float = 1e-3
  kl_weight: float = 1e-4
  train_images: int = 50000
  steps: int = 10000
  batch_size: int = 64
  learning_rate: float = 1e-3
  warmup_steps: int = 500
  min_snr_gamma: float = 5.0
  ema_decay: float = 0.999
  eval_steps: int = 25  # DDIM steps for the quality check and the grid
  guidance_scale: float = 4.0
  eval_images_per_caption: int = 2
  eval_colours: tuple[str, ...] = tuple(world.COLOURS)
  grid_images: int = 8  # samples per GRID_PROMPTS row
  log_every: int = 100


# --------------------------------------------------------------------------------------------
# Tokenizer and components.

def tokenizer_words() -> tuple[str, ...]:
  """The words the tokenizer keeps whole, in merge order (the last is the rarest).

  Longest first: a shorter word's merges ("r e" of "red") would otherwise outrank the ones a
  longer word needs ("th r" of "three") and split it.
  """
  words = sorted(set(world.VOCABULARY) | set(EXTRA_WORDS), key=lambda w: (-len(w), w))
  return tuple(words) + RARE_TOKENS


def build_tokenizer() -> ClipTokenizer:
  """The world tokenizer; fails if a word of `tokenizer_words` would not be one token."""
  tokenizer = models.build_word_tokenizer(tokenizer_words(), MAX_LENGTH)
  split = [w for w in tokenizer_words() if len(tokenizer.tokenize(w)) != 1]
  if split:
    raise RuntimeError(f"the tokenizer splits {split}; reorder the word list")
  return tokenizer


def text_config(vocab_size: int, arch: Architecture) -> dict[str, Any]:
  return dict(architectures=["CLIPTextModel"], model_type="clip_text_model",
              vocab_size=vocab_size, max_position_embeddings=MAX_LENGTH, hidden_act="quick_gelu",
              bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
              pad_token_id=vocab_size - 1, **arch.text)


def component_configs(tokenizer: ClipTokenizer, arch: Architecture,
                      scaling_factor: float = 1.0) -> dict[str, dict[str, Any]]:
  return {"unet": dict(arch.unet), "vae": dict(arch.vae, scaling_factor=scaling_factor),
          "text_encoder": text_config(len(tokenizer), arch),
          "scheduler": dict(SCHEDULER_CONFIG)}


def build_components(tokenizer: ClipTokenizer, arch: Architecture, seed: int,
                     scaling_factor: float = 1.0) -> tuple[models.Components, dict[str, Any]]:
  """Random-init components and their params, deterministic from `seed`."""
  components = pipeline.build_components(component_configs(tokenizer, arch, scaling_factor),
                                         tokenizer)
  return components, components.init_params(seed)


def parameter_count(tree: Any) -> int:
  return int(sum(np.size(x) for x in jax.tree.leaves(tree)))


# --------------------------------------------------------------------------------------------
# Data.

@dataclasses.dataclass(frozen=True, eq=False)
class WorldImages:
  """uint8 [N, 32, 32, 3] world pictures and their attributes (indices into world's tuples)."""
  images: np.ndarray
  classes: np.ndarray
  colours: np.ndarray
  scenes: np.ndarray
  sizes: np.ndarray
  counts: np.ndarray  # count - 1


def world_images(seed: int, n: int) -> WorldImages:
  """The first n pictures of world stream `seed` at 32 px (never the subject)."""
  examples = world.generate(seed, n, size=IMAGE_SIZE)
  return WorldImages(
      images=np.stack([e.image for e in examples]),
      classes=np.array([world.CLASSES.index(e.class_name) for e in examples], np.int32),
      colours=np.array([list(world.COLOURS).index(e.colour) for e in examples], np.int32),
      scenes=np.array([world.SCENES.index(e.scene) for e in examples], np.int32),
      sizes=np.array([world.SIZES.index(e.size) for e in examples], np.int32),
      counts=np.array([e.count - 1 for e in examples], np.int32))


def striped_balls(seed: int, n: int) -> np.ndarray:
  """Balls striped in two colours that are not the subject's pair (autoencoder data only).

  The autoencoder is a generic image codec, as SD's is: it should reconstruct a striped ball
  so that DreamBooth can later teach the UNet one, though neither the UNet nor the text
  encoder ever sees stripes here.
  """
  rng = np.random.default_rng([seed, 5])
  names = list(world.COLOURS)
  pairs = [(a, b) for a in names for b in names
           if a != b and {a, b} != set(world.SUBJECT_COLOURS)]
  return np.stack([world.render_example(
      world.SUBJECT_CLASS, None, world.SCENES[rng.integers(len(world.SCENES))],
      world.SIZES[rng.integers(len(world.SIZES))], 1, int(rng.integers(2**31)), IMAGE_SIZE,
      stripes=pairs[rng.integers(len(pairs))]).image for _ in range(n)])


# Caption table: every caption of the grammar, indexed by (count, size, colour, class, scene),
# where index 0 of size, colour and scene means "left out"; the last row is the empty caption.
_CAPTION_AXES = (len(world.COUNTS), len(world.SIZES) + 1, len(world.COLOURS) + 1,
                 len(world.CLASSES), len(world.SCENES) + 1)


def all_captions() -> list[str]:
  """Every caption the grammar allows (in `caption_index` order), then ""."""
  captions = []
  for index in np.ndindex(*_CAPTION_AXES):
    count, size, colour, class_index, scene = index
    captions.append(world.caption_for(
        world.CLASSES[class_index], world.COUNTS[count],
        colour=list(world.COLOURS)[colour - 1] if colour else None,
        size=world.SIZES[size - 1] if size else None,
        scene=world.SCENES[scene - 1] if scene else None))
  return captions + [""]


def caption_index(key: jax.Array, classes, colours, scenes, sizes, counts) -> jax.Array:
  """Row of `all_captions` per picture: parts dropped at random, some captions empty."""
  keep_key, empty_key = jax.random.split(key)
  keep = jax.random.uniform(keep_key, (3,) + classes.shape) >= CAPTION_DROP_PROB
  size = jnp.where(keep[0], sizes + 1, 0)
  colour = jnp.where(keep[1], colours + 1, 0)
  scene = jnp.where(keep[2], scenes + 1, 0)
  index = jnp.ravel_multi_index((counts, size, colour, classes, scene), _CAPTION_AXES,
                                mode="clip")
  empty = jax.random.uniform(empty_key, classes.shape) < EMPTY_CAPTION_PROB
  return jnp.where(empty, int(np.prod(_CAPTION_AXES)), index)


def token_table(tokenizer: ClipTokenizer) -> np.ndarray:
  """int32 [len(all_captions()), MAX_LENGTH] token ids of every caption."""
  return np.stack([input_pipeline.tokenize(tokenizer, c) for c in all_captions()])


# --------------------------------------------------------------------------------------------
# Stage 1: the autoencoder.

def _to_pixels(images: jax.Array) -> jax.Array:
  """uint8 NHWC -> float NCHW in [-1, 1], as the pipeline's VAE takes them."""
  return jnp.transpose(images.astype(jnp.float32) / 127.5 - 1.0, (0, 3, 1, 2))


def train_vae(vae: vae_lib.AutoencoderKL, params: Any, images: np.ndarray, settings: Settings,
              deadline: float) -> tuple[Any, dict[str, float]]:
  """L1 reconstruction of a posterior sample + kl_weight x the mean KL per latent element."""
  s = settings
  optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(
      optax.warmup_cosine_decay_schedule(0.0, s.vae_learning_rate, min(200, s.vae_steps // 10),
                                         s.vae_steps, s.vae_learning_rate * 0.05)))
  opt_state = optimizer.init(params)
  data = jnp.asarray(images)

  def loss_fn(params, x, key):
    mean, std = vae.apply({"params": params}, x, method=vae.encode)
    z = mean + std * jax.random.normal(key, mean.shape)
    recon = vae.apply({"params": params}, z, method=vae.decode)
    l1 = jnp.mean(jnp.abs(recon - x))
    # KL(N(mean, std²) || N(0, 1)) summed over a latent, then averaged per element.
    kl_per_latent = 0.5 * jnp.sum(jnp.square(mean) + jnp.square(std) - 1.0
                                  - 2.0 * jnp.log(std), axis=(1, 2, 3))
    kl = jnp.mean(kl_per_latent) / np.prod(z.shape[1:])
    return l1 + s.kl_weight * kl, {"l1": l1, "kl": kl}

  @jax.jit
  def step(params, opt_state, step_index):
    key = jax.random.fold_in(jax.random.key(s.seed + 1), step_index)
    index_key, sample_key = jax.random.split(key)
    index = jax.random.randint(index_key, (s.vae_batch_size,), 0, len(images))
    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, _to_pixels(data[index]), sample_key)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, metrics

  metrics, done = {}, 0
  with tqdm(total=s.vae_steps, desc="stage 1: autoencoder", file=sys.stdout,
            mininterval=5) as bar:
    for done in range(1, s.vae_steps + 1):
      params, opt_state, metrics = step(params, opt_state, done - 1)
      if done % s.log_every == 0 or done == s.vae_steps:
        bar.update(done - bar.n)
        bar.set_postfix({k: f"{float(v):.4f}" for k, v in metrics.items()})
        if time.time() > deadline:
          break
  return params, {"steps": done, **{k: float(v) for k, v in metrics.items()}}


def encode_latents(vae: vae_lib.AutoencoderKL, params: Any, images: np.ndarray,
                   batch_size: int = 500) -> tuple[np.ndarray, np.ndarray]:
  """The latent distribution (mean, std; float32 NHWC) of every image, encoded once."""
  @jax.jit
  def encode(x):
    return vae.apply({"params": params}, _to_pixels(x), method=vae.encode)

  means, stds = [], []
  for start in range(0, len(images), batch_size):
    mean, std = encode(jnp.asarray(images[start:start + batch_size]))
    means.append(np.asarray(mean))
    stds.append(np.asarray(std))
  return np.concatenate(means), np.concatenate(stds)


def reconstruction_error(vae: vae_lib.AutoencoderKL, params: Any, images: np.ndarray) -> float:
  """Mean absolute error in [0, 255] units of decode(encode(x).mean), a quality figure."""
  x = _to_pixels(jnp.asarray(images))
  mean, _ = vae.apply({"params": params}, x, method=vae.encode)
  recon = vae.apply({"params": params}, mean, method=vae.decode)
  return float(jnp.mean(jnp.abs(jnp.clip(recon, -1, 1) - x)) * 127.5)


# --------------------------------------------------------------------------------------------
# Stage 2: UNet and text encoder.

def diffusion_train_config(settings: Settings):
  """The project's train config (configs/common.py), set for pretraining from scratch."""
  config = common.get_config().train
  config.steps = settings.steps
  config.batch_size = settings.batch_size
  config.learning_rate = settings.learning_rate
  config.lr_schedule = "cosine"
  config.warmup_steps = min(settings.warmup_steps, settings.steps // 5)
  config.train_text_encoder = True
  config.with_prior_preservation = False
  config.prior_loss_weight = 0.0
  config.min_snr_gamma = settings.min_snr_gamma
  return config


def train_diffusion(components: models.Components, params: dict[str, Any],
                    data: WorldImages, latent_mean: np.ndarray, latent_std: np.ndarray,
                    settings: Settings, deadline: float
                    ) -> tuple[dict[str, Any], dict[str, Any]]:
  """Trains UNet + text encoder; returns their EMA params and a report."""
  s = settings
  config = diffusion_train_config(s)
  optimizer = train_step.make_optimizer(config)
  step_fn = train_step.make_train_step(components, optimizer, config)
  state = train_step.create_train_state(params, optimizer, s.seed + 2, True)
  tokens = jnp.asarray(token_table(components.tokenizer))
  attributes = {name: jnp.asarray(getattr(data, name))
                for name in ("classes", "colours", "scenes", "sizes", "counts")}
  mean, std = jnp.asarray(latent_mean), jnp.asarray(latent_std)
  num = len(latent_mean)

  def batch_for(step_index):
    key = jax.random.fold_in(jax.random.key(s.seed + 3), step_index)
    index_key, caption_key = jax.random.split(key)
    index = jax.random.randint(index_key, (s.batch_size,), 0, num)
    rows = caption_index(caption_key, **{k: v[index] for k, v in attributes.items()})
    return {"latent_mean": mean[index], "latent_std": std[index], "input_ids": tokens[rows],
            "example_id": step_index * s.batch_size + jnp.arange(s.batch_size),
            "instance_mask": jnp.ones(s.batch_size), "prior_mask": jnp.zeros(s.batch_size)}

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(state, ema):
    state, metrics = step_fn(state, {}, batch_for(state.step))
    decay = jnp.minimum(s.ema_decay, (1.0 + state.step) / (10.0 + state.step))
    ema = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, ema, state.params)
    return state, ema, metrics

  ema = jax.tree.map(jnp.copy, state.params)
  losses, done, start = [], 0, time.time()
  with tqdm(total=s.steps, desc="stage 2: unet + text encoder", file=sys.stdout,
            mininterval=5) as bar:
    for done in range(1, s.steps + 1):
      state, ema, metrics = step(state, ema)
      if done % s.log_every == 0 or done == s.steps:
        loss = float(metrics["loss"])
        if not np.isfinite(loss):
          raise errors.NonFiniteLossError(f"stage 2: loss {loss} at step {done}")
        losses.append(loss)
        bar.update(done - bar.n)
        bar.set_postfix(loss=f"{np.mean(losses[-10:]):.4f}")
        if time.time() > deadline:
          break
  report = {"steps": done, "stopped_early": done < s.steps,
            "seconds": round(time.time() - start, 1),
            "final_loss": round(float(np.mean(losses[-10:])), 5) if losses else None}
  return jax.device_get(ema), report


# --------------------------------------------------------------------------------------------
# Quality check and grid.

def quality_captions(colours: Sequence[str]) -> list[tuple[str, str, str, str]]:
  """(caption, class, colour, scene) for every class x colour x scene, one object."""
  return [(world.caption_for(c, 1, colour=colour, scene=scene), c, colour, scene)
          for c in world.CLASSES for colour in colours for scene in world.SCENES]


def sample_prompts(components: models.Components, params: dict[str, Any],
                   prompts: Sequence[str], num_images: int, seed: int, steps: int,
                   guidance_scale: float) -> np.ndarray:
  """uint8 [prompts, num_images, 32, 32, 3], DDIM with guidance, over all devices."""
  mesh = sharding.make_mesh()
  sampler = sampling.make_sampler(components, mesh, IMAGE_SIZE, "ddim", steps, guidance_scale)
  return sampling.sample_grid(sampler, sharding.put_replicated(params, mesh), mesh,
                              components.tokenizer, list(prompts), num_images, seed)


def judge_samples(images: np.ndarray, classes: Sequence[str], colours: Sequence[str],
                  scenes: Sequence[str]) -> dict[str, float]:
  """Accuracy of the judges' class, colour and scene heads against what was asked."""
  out = judges_lib.load_judges().outputs(images)
  def accuracy(probs, wanted, names):
    return float(np.mean(probs.argmax(1) == np.array([list(names).index(w) for w in wanted])))
  return {"class_accuracy": accuracy(out["class_probs"], classes, world.CLASSES),
          "colour_accuracy": accuracy(out["colour_probs"], colours, world.COLOURS),
          "scene_accuracy": accuracy(out["scene_probs"], scenes, world.SCENES)}


def evaluate_quality(components: models.Components, params: dict[str, Any],
                     settings: Settings) -> dict[str, Any]:
  """Samples every quality caption and scores the samples with the judges."""
  captions = quality_captions(settings.eval_colours)
  n = settings.eval_images_per_caption
  images = sample_prompts(components, params, [c[0] for c in captions], n, settings.seed,
                          settings.eval_steps, settings.guidance_scale)
  repeat = lambda values: [v for v in values for _ in range(n)]
  scores = judge_samples(images.reshape(-1, *images.shape[2:]),
                         *(repeat([c[k] for c in captions]) for k in (1, 2, 3)))
  return {**scores, "captions": len(captions), "images_per_caption": n,
          "sampler": {"scheduler": "ddim", "steps": settings.eval_steps,
                      "guidance_scale": settings.guidance_scale, "seed": settings.seed}}


GRID_PROMPTS = ("a red ball on grass", "a blue box in the snow", "a yellow tree at night",
                "a purple cup on the beach", "a teal ball in a room", "a orange box on the beach",
                "two big yellow trees in the snow", "three small red cups on grass",
                "a ball", "a sks ball")


# --------------------------------------------------------------------------------------------
# The whole run.

def _swap_in(staging: str, out_dir: str) -> None:
  """Replaces out_dir by the finished staging directory (old one kept until the rename)."""
  out_dir = out_dir.rstrip("/")
  old_dir = out_dir + ".old"
  shutil.rmtree(old_dir, ignore_errors=True)
  if os.path.exists(out_dir):
    os.rename(out_dir, old_dir)
  os.rename(staging, out_dir)
  shutil.rmtree(old_dir, ignore_errors=True)


def pretrain(out_dir: str, settings: Settings = Settings(),
             arch: Architecture = Architecture(), grid_path: str | None = None
             ) -> dict[str, Any]:
  """Runs both stages, exports the pipeline with quality.json into out_dir; returns the report.

  The pipeline is written to `<out_dir>.staging` and renamed over out_dir only when it is
  complete, scored and its quality.json written.
  """
  s = settings
  start = time.time()
  deadline = start + s.minutes * 60 - 60  # a minute for encoding, export and the check
  staging = out_dir.rstrip("/") + ".staging"
  shutil.rmtree(staging, ignore_errors=True)
  os.makedirs(os.path.dirname(os.path.abspath(out_dir)), exist_ok=True)
  tokenizer = build_tokenizer()
  components, params = build_components(tokenizer, arch, s.seed)

  print(f"drawing {s.vae_images} autoencoder and {s.train_images} training pictures",
        flush=True)
  vae_images = np.concatenate([world_images(s.seed + 10, s.vae_images * 9 // 10).images,
                               striped_balls(s.seed + 11, s.vae_images - s.vae_images * 9 // 10)])
  params["vae"], vae_report = train_vae(components.vae, params["vae"], vae_images, s, deadline)
  del vae_images
  data = world_images(s.seed + 20, s.train_images)
  latent_mean, latent_std = encode_latents(components.vae, params["vae"], data.images)
  scaling_factor = float(1.0 / np.std(latent_mean))
  components = pipeline.build_components(
      component_configs(tokenizer, arch, scaling_factor), tokenizer)
  held_out = world_images(s.seed + 30, 200).images
  vae_report.update(
      scaling_factor=round(scaling_factor, 5),
      world_mae=round(reconstruction_error(components.vae, params["vae"], held_out), 3),
      subject_mae=round(reconstruction_error(components.vae, params["vae"],
                                             np.stack(world.subject_photos(IMAGE_SIZE))), 3))
  print(f"autoencoder: {vae_report}", flush=True)

  trained, diffusion_report = train_diffusion(components, params, data, latent_mean,
                                              latent_std, s, deadline)
  params.update(trained)
  models.export_pipeline(components, params, staging)
  components, params = models.load_pretrained(staging)  # what a user gets
  quality = evaluate_quality(components, params, s)
  report = {
      **quality,
      "targets": {"class_accuracy": 0.7, "scene_accuracy": 0.8},
      "training": {
          "settings": {k: list(v) if isinstance(v, tuple) else v
                       for k, v in dataclasses.asdict(s).items()},
          "autoencoder": vae_report, "diffusion": diffusion_report,
          "parameters": {name: parameter_count(params[name]) for name in params},
          "total_minutes": round((time.time() - start) / 60, 1)},
  }
  atomic_files.write_json(os.path.join(staging, QUALITY_FILE), report)
  _swap_in(staging, out_dir)
  if grid_path:
    images = sample_prompts(components, params, GRID_PROMPTS, s.grid_images, s.seed, s.eval_steps,
                            s.guidance_scale)
    os.makedirs(os.path.dirname(os.path.abspath(grid_path)), exist_ok=True)
    sampling.write_png(sampling.labelled_grid(images, GRID_PROMPTS), grid_path)
  return report


# --------------------------------------------------------------------------------------------
# Command line.

def define_flags() -> None:
  """Defined only when run as a program, so that importing this module adds no flags."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  defaults = Settings()
  flags.DEFINE_string("out", DEFAULT_DIR, "Pipeline directory to write (replaced atomically).")
  flags.DEFINE_string("grid", "", "Also write a labelled sample grid PNG here (e.g. "
                      "docs/toyworld_pretrain.png).")
  flags.DEFINE_integer("seed", defaults.seed, "Seed of every draw: data, init, noise.")
  flags.DEFINE_float("minutes", defaults.minutes, "Wall-clock cap; stage 2 stops early past it.")
  flags.DEFINE_integer("vae_steps", defaults.vae_steps, "Stage 1 (autoencoder) steps.")
  flags.DEFINE_integer("steps", defaults.steps, "Stage 2 (UNet + text encoder) steps.")
  flags.DEFINE_integer("batch_size", defaults.batch_size, "Stage 2 batch size.")
  flags.DEFINE_float("learning_rate", defaults.learning_rate, "Stage 2 peak learning rate.")
  flags.DEFINE_integer("train_images", defaults.train_images, "Stage 2 pictures, encoded once.")


def main(argv: list[str]) -> None:
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  from dreambooth_jax import compilation_cache  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  f = flags.FLAGS
  for name in ("vae_steps", "steps", "batch_size", "train_images"):
    if f[name].value < 1:
      raise app.UsageError(f"--{name} must be >= 1")
  compilation_cache.enable()
  settings = Settings(seed=f.seed, minutes=f.minutes, vae_steps=f.vae_steps, steps=f.steps,
                      batch_size=f.batch_size, learning_rate=f.learning_rate,
                      train_images=f.train_images)
  report = pretrain(f.out, settings, grid_path=f.grid or None)
  print(json.dumps({k: report[k] for k in ("class_accuracy", "colour_accuracy",
                                           "scene_accuracy")}, indent=2))
  print(f"wrote {f.out}" + (f" and {f.grid}" if f.grid else ""), file=sys.stderr)


if __name__ == "__main__":
  from absl import app as _app  # pylint: disable=g-import-not-at-top
  define_flags()
  _app.run(main)
