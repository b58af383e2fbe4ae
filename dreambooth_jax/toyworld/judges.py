"""Toy-world judges: a small CNN that knows the world, and the paper's metrics re-made with it.

Why: DreamBooth's metrics (arXiv 2208.12242, §4.1, §4.3) use DINO and CLIP, which know nothing
of 32x32 cartoons. Here one small convolutional trunk, trained on the world itself, has three
judging heads: object class (CLASSES), scene (SCENES) and subject-vs-not; and auxiliary heads
for colour, size, count and mean object position, trained so that its embedding encodes every
attribute the world varies. That embedding, centred and L2-normalised (`features`), plays the
role of a DINO/CLIP image embedding, the scene and class heads the role of CLIP's text match.
Every metric below is an *analogue*: the paper's formula, in a feature space that is small,
supervised and specific to this world (it separates exactly what the world varies, and was
taught that the subject is special; DINO was taught neither).

Training data (all 32x32): ordinary world pictures (`world.generate`); the subject in every
scene, place and size; and hard negatives: plain orange and plain teal balls (the subject's
colours, one at a time) and balls with the subject's stripes in other colour pairs, so that the
subject head keys on the orange-and-teal stripes together. Each batch is augmented the way a
small diffusion model's samples go wrong (`augment`): blur, down-and-up sampling, noise, colour
and brightness shifts, a shift by up to 2 px and a mirror flip.

  python -m dreambooth_jax.toyworld.judges --out=dreambooth_jax/toyworld/judges

trains (about 6 minutes on 2 CPU cores) and writes `judges.msgpack` (flax.serialization of
the params and the feature mean) and `judges.json` (architecture, the world's label names,
training settings, held-out scores on clean and on augmented pictures). `load_judges` reads the
committed files.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from collections.abc import Sequence
from typing import Any, NamedTuple, Union

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image

from dreambooth_jax import atomic_files
from dreambooth_jax.evaluation import metrics as eval_metrics
from dreambooth_jax.toyworld import world

JUDGE_SIZE = 32
DEFAULT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "judges")
WEIGHTS_FILE = "judges.msgpack"
REPORT_FILE = "judges.json"

Images = Union[np.ndarray, Sequence[np.ndarray]]


# --------------------------------------------------------------------------------------------
# The network.

class JudgeNet(nn.Module):
  """Conv trunk (strides 1,2,1,2,1), mean+max pooling, an embedding, linear heads.

  Besides the three judging heads (class, scene, subject), auxiliary heads for colour, size,
  count and mean object position make the embedding encode every attribute the world varies,
  which `div` and the feature similarities rely on.
  """
  widths: Sequence[int] = (16, 32, 32, 64, 64)
  embed_dim: int = 128

  @nn.compact
  def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
    for k, width in enumerate(self.widths):
      x = nn.relu(nn.Conv(width, (3, 3), strides=2 if k in (1, 3) else 1)(x))
    # Max pooling keeps a small striped ball visible that the mean would wash out.
    pooled = jnp.concatenate([x.mean(axis=(1, 2)), x.max(axis=(1, 2))], axis=-1)
    embedding = nn.Dense(self.embed_dim)(pooled)
    hidden = nn.relu(embedding)
    return {
        "embedding": embedding,
        "class": nn.Dense(len(world.CLASSES), name="class_head")(hidden),
        "scene": nn.Dense(len(world.SCENES), name="scene_head")(hidden),
        "subject": nn.Dense(1, name="subject_head")(hidden)[:, 0],
        "colour": nn.Dense(len(world.COLOURS), name="colour_head")(hidden),
        "size": nn.Dense(len(world.SIZES), name="size_head")(hidden),
        "count": nn.Dense(len(world.COUNTS), name="count_head")(hidden),
        "position": nn.Dense(2, name="position_head")(hidden),
    }


# --------------------------------------------------------------------------------------------
# Images in.

def preprocess(images: Images) -> np.ndarray:
  """[N, 32, 32, 3] float32 in [0, 1] from uint8 RGB images of any size (area-averaged)."""
  out = []
  for k, image in enumerate(images):
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
      raise ValueError(f"image {k}: expected uint8 [H, W, 3], got {image.dtype} "
                       f"{image.shape}")
    if image.shape[:2] != (JUDGE_SIZE, JUDGE_SIZE):
      image = np.asarray(Image.fromarray(image).resize((JUDGE_SIZE, JUDGE_SIZE),
                                                       Image.Resampling.BOX))
    out.append(image)
  if not out:
    raise ValueError("no images given")
  return np.stack(out).astype(np.float32) / 255.0


def _normalise(x: jax.Array) -> jax.Array:
  return x * 2.0 - 1.0


def _blur(x: jax.Array, sigma: jax.Array, radius: int = 3) -> jax.Array:
  """Separable Gaussian blur with one sigma per image (sigma ~0 leaves it unchanged)."""
  taps = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
  kernel = jnp.exp(-taps[None] ** 2 / (2 * jnp.maximum(sigma[:, None], 1e-3) ** 2))
  kernel = kernel / kernel.sum(axis=1, keepdims=True)  # [B, taps]
  size = x.shape[1]
  padded = jnp.pad(x, ((0, 0), (radius, radius), (0, 0), (0, 0)), mode="edge")
  x = sum(kernel[:, t, None, None, None] * padded[:, t:t + size] for t in range(len(taps)))
  padded = jnp.pad(x, ((0, 0), (0, 0), (radius, radius), (0, 0)), mode="edge")
  return sum(kernel[:, t, None, None, None] * padded[:, :, t:t + size]
             for t in range(len(taps)))


def augment(key: jax.Array, x: jax.Array) -> jax.Array:
  """Degrades [B, 32, 32, 3] images in [0, 1] like blurry diffusion samples (per image draws).

  Mirror flip; shift by up to 2 px (edges repeated); with probability 1/3 down-sampling to 16
  or 22 px and back; Gaussian blur, sigma in [0, 1.3] px; brightness +-0.08, contrast x0.8-1.2,
  per-channel gain x0.92-1.08; Gaussian noise with std in [0, 0.06].
  """
  return _augment(key, x)[0]


def _moved_positions(positions: jax.Array, flip: jax.Array, shifts: jax.Array,
                     size: int) -> jax.Array:
  """[B, 2] (x, y) fractions after `_augment`'s flip and shift (the position labels)."""
  x = jnp.where(flip.reshape(-1), 1.0 - positions[:, 0], positions[:, 0])
  return jnp.stack([x + (2 - shifts[:, 1]) / size, positions[:, 1] + (2 - shifts[:, 0]) / size],
                   axis=1)


def _augment(key: jax.Array, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`augment`, also returning each image's flip [B, 1, 1, 1] and crop offsets [B, 2]."""
  b, size = x.shape[0], x.shape[1]
  keys = jax.random.split(key, 9)
  flip = jax.random.bernoulli(keys[0], 0.5, (b, 1, 1, 1))
  x = jnp.where(flip, x[:, :, ::-1], x)
  shifts = jax.random.randint(keys[1], (b, 2), 0, 5)
  padded = jnp.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)), mode="edge")
  x = jax.vmap(lambda image, s: jax.lax.dynamic_slice(image, (s[0], s[1], 0), (size, size, 3)))(
      padded, shifts)
  resampled = [jax.image.resize(jax.image.resize(x, (b, low, low, 3), "linear"), x.shape,
                                "linear") for low in (16, 22)]
  mode = jax.random.randint(keys[2], (b, 1, 1, 1), 0, 6)  # 0: 16 px, 1: 22 px, else: none
  x = jnp.where(mode == 0, resampled[0], jnp.where(mode == 1, resampled[1], x))
  x = _blur(x, jax.random.uniform(keys[3], (b,), maxval=1.3))
  mean = x.mean(axis=(1, 2, 3), keepdims=True)
  contrast = jax.random.uniform(keys[4], (b, 1, 1, 1), minval=0.8, maxval=1.2)
  x = (x - mean) * contrast + mean
  x = x * jax.random.uniform(keys[5], (b, 1, 1, 3), minval=0.92, maxval=1.08)
  x = x + jax.random.uniform(keys[6], (b, 1, 1, 1), minval=-0.08, maxval=0.08)
  noise_std = jax.random.uniform(keys[7], (b, 1, 1, 1), maxval=0.06)
  x = x + noise_std * jax.random.normal(keys[8], x.shape)
  return jnp.clip(x, 0.0, 1.0), flip, shifts


# --------------------------------------------------------------------------------------------
# Training data.

@dataclasses.dataclass(frozen=True, eq=False)
class LabelledImages:
  """uint8 [N, 32, 32, 3] images and their labels (indices into the world's tuples)."""
  images: np.ndarray
  classes: np.ndarray
  scenes: np.ndarray
  subject: np.ndarray  # 1.0 for the subject
  colours: np.ndarray  # -1 for striped balls
  sizes: np.ndarray
  counts: np.ndarray  # count - 1
  positions: np.ndarray  # [N, 2] mean object centre (x, y), fractions of the side
  kind: np.ndarray  # 0 world, 1 subject, 2 hard negative

  def __len__(self) -> int:
    return len(self.images)


def _other_stripe_pairs() -> list[tuple[str, str]]:
  names = list(world.COLOURS)
  subject = set(world.SUBJECT_COLOURS)
  return [(a, b) for a in names for b in names if a != b and {a, b} != subject]


def build_dataset(seed: int, n_world: int, n_subject: int, n_hard: int) -> LabelledImages:
  """World pictures, subject pictures and hard negatives, all drawn from `seed` at 32 px."""
  rng = np.random.default_rng([seed, 3])
  examples = world.generate(int(rng.integers(2**31)), n_world, size=JUDGE_SIZE)
  kind = [0] * n_world
  pairs = _other_stripe_pairs()
  for k in range(n_subject + n_hard):
    scene = world.SCENES[rng.integers(len(world.SCENES))]
    size_word = world.SIZES[rng.integers(len(world.SIZES))]
    image_seed = int(rng.integers(2**31))
    colour, count, stripes = None, 1, None
    if k < n_subject:
      stripes = world.SUBJECT_COLOURS
    elif k % 2 == 0:  # a plain ball in one of the subject's colours
      colour = world.SUBJECT_COLOURS[rng.integers(2)]
      count = int(rng.choice(world.COUNTS, p=world.COUNT_PROBS))
    else:  # the subject's stripes in another colour pair
      stripes = pairs[rng.integers(len(pairs))]
    examples.append(world.render_example(world.SUBJECT_CLASS, colour, scene, size_word, count,
                                         image_seed, JUDGE_SIZE, stripes=stripes))
    kind.append(1 if k < n_subject else 2)
  colours = list(world.COLOURS)
  return LabelledImages(
      images=np.stack([e.image for e in examples]),
      classes=np.array([world.CLASSES.index(e.class_name) for e in examples], np.int32),
      scenes=np.array([world.SCENES.index(e.scene) for e in examples], np.int32),
      subject=np.array([e.stripes == world.SUBJECT_COLOURS for e in examples], np.float32),
      colours=np.array([-1 if e.colour is None else colours.index(e.colour)
                        for e in examples], np.int32),
      sizes=np.array([world.SIZES.index(e.size) for e in examples], np.int32),
      counts=np.array([e.count - 1 for e in examples], np.int32),
      positions=np.array([np.mean(e.positions, axis=0) for e in examples], np.float32),
      kind=np.array(kind, np.int32))


# --------------------------------------------------------------------------------------------
# Training.

_LABELS = ("classes", "scenes", "subject", "colours", "sizes", "counts", "positions")
_POSITION_WEIGHT = 10.0  # squared errors of fractions are small next to cross-entropies


def _loss(params: Any, net: JudgeNet, x: jax.Array,
          labels: dict[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
  out = net.apply({"params": params}, _normalise(x))

  def cross_entropy(logits, targets):
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

  plain = (labels["colours"] >= 0).astype(jnp.float32)
  colour = optax.softmax_cross_entropy_with_integer_labels(
      out["colour"], jnp.maximum(labels["colours"], 0))
  losses = {
      "class": cross_entropy(out["class"], labels["classes"]),
      "scene": cross_entropy(out["scene"], labels["scenes"]),
      "subject": optax.sigmoid_binary_cross_entropy(out["subject"], labels["subject"]).mean(),
      "colour": jnp.sum(colour * plain) / jnp.maximum(plain.sum(), 1.0),
      "size": cross_entropy(out["size"], labels["sizes"]),
      "count": cross_entropy(out["count"], labels["counts"]),
      "position": _POSITION_WEIGHT * jnp.mean((out["position"] - labels["positions"]) ** 2),
  }
  return sum(losses.values()), losses


def _predict(params: Any, feature_mean: jax.Array, net: JudgeNet,
             x: jax.Array) -> dict[str, jax.Array]:
  """Every output for [B, 32, 32, 3] images in [0, 1]."""
  out = net.apply({"params": params}, _normalise(x))
  centred = out["embedding"] - feature_mean
  return {
      "features": centred / jnp.maximum(jnp.linalg.norm(centred, axis=-1, keepdims=True),
                                        1e-12),
      "class_probs": jax.nn.softmax(out["class"]),
      "scene_probs": jax.nn.softmax(out["scene"]),
      "subject_prob": jax.nn.sigmoid(out["subject"]),
      "colour_probs": jax.nn.softmax(out["colour"]),
      "size_probs": jax.nn.softmax(out["size"]),
      "count_probs": jax.nn.softmax(out["count"]),
      "position": out["position"],
  }


class Judges:
  """A trained judge; the public methods take uint8 RGB images ([N, H, W, 3] or a list).

  `features` are the embedding minus its mean over world pictures (`feature_mean`),
  L2-normalised: centred, so that cosine similarities spread over [-1, 1] instead of all
  sharing one dominant direction.
  """

  def __init__(self, net: JudgeNet, params: Any, feature_mean: np.ndarray,
               batch_size: int = 64):
    self.net = net
    self.params = params
    self.feature_mean = np.asarray(feature_mean, np.float32)
    self._batch_size = batch_size
    self._predict = jax.jit(functools.partial(_predict, net=net))

  def predict_floats(self, x: np.ndarray) -> dict[str, np.ndarray]:
    """Every output for [B, 32, 32, 3] float images in [0, 1] (one compile per batch size)."""
    return jax.device_get(self._predict(self.params, self.feature_mean, x=x))

  def outputs(self, images: Images) -> dict[str, np.ndarray]:
    """Every output at once (features, *_probs, subject_prob, position); identical images get
    bit-identical outputs (each is computed once)."""
    x = preprocess(images)
    unique, inverse = np.unique(x.reshape(len(x), -1), axis=0, return_inverse=True)
    unique = unique.reshape(-1, *x.shape[1:])
    outs = []
    for start in range(0, len(unique), self._batch_size):
      chunk = unique[start:start + self._batch_size]
      m = len(chunk)
      padded = np.concatenate([chunk, np.repeat(chunk[-1:], self._batch_size - m, axis=0)])
      outs.append({name: np.asarray(v)[:m] for name, v in self.predict_floats(padded).items()})
    return {name: np.concatenate([o[name] for o in outs])[inverse.reshape(-1)]
            for name in outs[0]}

  def class_probs(self, images: Images) -> np.ndarray:
    """[N, len(CLASSES)] class probabilities."""
    return self.outputs(images)["class_probs"]

  def scene_probs(self, images: Images) -> np.ndarray:
    """[N, len(SCENES)] scene probabilities."""
    return self.outputs(images)["scene_probs"]

  def subject_prob(self, images: Images) -> np.ndarray:
    """[N] probability that each image shows the subject."""
    return self.outputs(images)["subject_prob"]

  def features(self, images: Images) -> np.ndarray:
    """[N, D] centred, L2-normalised embeddings (the trunk's last layer before the heads)."""
    return self.outputs(images)["features"]

  def save(self, out_dir: str, report: dict[str, Any]) -> None:
    """Writes judges.msgpack (params, feature_mean) and judges.json (architecture, report)."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, WEIGHTS_FILE)
    tmp_path = f"{path}.tmp{os.getpid()}"
    with open(tmp_path, "wb") as f:
      f.write(flax.serialization.msgpack_serialize(
          {"params": jax.device_get(self.params), "feature_mean": self.feature_mean}))
    os.replace(tmp_path, path)
    atomic_files.write_json(os.path.join(out_dir, REPORT_FILE), {
        "architecture": {"widths": list(self.net.widths), "embed_dim": self.net.embed_dim},
        "classes": list(world.CLASSES), "scenes": list(world.SCENES),
        "colours": list(world.COLOURS), **report})


def train_judges(seed: int = 0, steps: int = 2000, batch_size: int = 128,
                 learning_rate: float = 2e-3, n_world: int = 8000, n_subject: int = 3000,
                 n_hard: int = 3000, log_every: int = 100,
                 net: JudgeNet | None = None) -> Judges:
  """Trains a judge on a freshly drawn dataset.

  Batches draw world pictures, subject pictures and hard negatives with weights 2:1:1, each
  batch augmented (`augment`). Adam with a cosine-decayed learning rate. The feature mean is
  then taken over the (clean) world pictures.
  """
  net = net or JudgeNet()
  data = build_dataset(seed, n_world, n_subject, n_hard)
  key = jax.random.key(seed)
  init_key, key = jax.random.split(key)
  params = net.init(init_key, jnp.zeros((1, JUDGE_SIZE, JUDGE_SIZE, 3)))["params"]
  optimizer = optax.adam(optax.warmup_cosine_decay_schedule(
      0.0, learning_rate, min(100, steps // 10), steps, learning_rate * 0.02))
  opt_state = optimizer.init(params)
  source_weight = np.array([2.0, 1.0, 1.0])[data.kind]
  sample_p = jnp.asarray(source_weight / source_weight.sum())
  images = jnp.asarray(data.images)
  all_labels = {name: jnp.asarray(getattr(data, name)) for name in _LABELS}

  @jax.jit
  def step(params, opt_state, key):
    index_key, augment_key = jax.random.split(key)
    index = jax.random.choice(index_key, len(data), (batch_size,), p=sample_p)
    labels = {name: value[index] for name, value in all_labels.items()}
    x, flip, shifts = _augment(augment_key, images[index].astype(jnp.float32) / 255.0)
    labels["positions"] = _moved_positions(labels["positions"], flip, shifts, JUDGE_SIZE)
    (_, losses), grads = jax.value_and_grad(_loss, has_aux=True)(params, net, x, labels)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, losses

  for k in range(steps):
    key, step_key = jax.random.split(key)
    params, opt_state, losses = step(params, opt_state, step_key)
    if log_every and (k + 1) % log_every == 0:
      print(f"step {k + 1}/{steps}: " +
            ", ".join(f"{name} {float(v):.4f}" for name, v in losses.items()), flush=True)
  params = jax.device_get(params)
  embed = jax.jit(lambda x: net.apply({"params": params}, _normalise(x))["embedding"])
  world_images = data.images[data.kind == 0]
  embeddings = [np.asarray(embed(world_images[i:i + 256].astype(np.float32) / 255.0))
                for i in range(0, len(world_images), 256)]
  return Judges(net, params, np.concatenate(embeddings).mean(axis=0))


def evaluate_judges(judges: Judges, data: LabelledImages,
                    augment_seed: int | None) -> dict[str, float]:
  """Accuracies on `data`, augmented with a fixed key (or clean when augment_seed is None).

  subject_accuracy is balanced: the mean of the true-positive rate on subject pictures and
  the true-negative rate on everything else; the hard-negative rate is reported on its own.
  colour_accuracy counts plain objects only; position_mae is the mean absolute error of the
  mean object centre, in fractions of the side.
  """
  outs, positions = [], []
  for start in range(0, len(data), 256):
    x = jnp.asarray(data.images[start:start + 256], jnp.float32) / 255.0
    target = jnp.asarray(data.positions[start:start + 256])
    if augment_seed is not None:
      x, flip, shifts = _augment(jax.random.fold_in(jax.random.key(augment_seed), start), x)
      target = _moved_positions(target, flip, shifts, JUDGE_SIZE)
    outs.append(judges.predict_floats(np.asarray(x)))
    positions.append(np.asarray(target))
  out = {name: np.concatenate([o[name] for o in outs]) for name in outs[0]}
  plain = data.colours >= 0
  said_subject = out["subject_prob"] > 0.5
  positives, hard = data.subject == 1, data.kind == 2
  tpr = float(said_subject[positives].mean())
  tnr = float((~said_subject[~positives]).mean())
  return {
      "class_accuracy": float((out["class_probs"].argmax(1) == data.classes).mean()),
      "scene_accuracy": float((out["scene_probs"].argmax(1) == data.scenes).mean()),
      "subject_accuracy": (tpr + tnr) / 2,
      "subject_true_positive_rate": tpr,
      "subject_true_negative_rate": tnr,
      "subject_true_negative_rate_hard": float((~said_subject[hard]).mean()),
      "colour_accuracy": float((out["colour_probs"].argmax(1) == data.colours)[plain].mean()),
      "size_accuracy": float((out["size_probs"].argmax(1) == data.sizes).mean()),
      "count_accuracy": float((out["count_probs"].argmax(1) == data.counts).mean()),
      "position_mae": float(np.abs(out["position"] - np.concatenate(positions)).mean()),
  }


# --------------------------------------------------------------------------------------------
# Loading and scoring.

@functools.cache
def load_judges(directory: str = DEFAULT_DIR) -> Judges:
  """The judge saved in `directory` (default: the committed one), loaded once per process."""
  with open(os.path.join(directory, REPORT_FILE)) as f:
    report = json.load(f)
  world_labels = {"classes": list(world.CLASSES), "scenes": list(world.SCENES),
                  "colours": list(world.COLOURS)}
  if any(report.get(name) != labels for name, labels in world_labels.items()):
    raise ValueError(f"{directory}: judges were trained for another world "
                     f"({ {name: report.get(name) for name in world_labels} }); retrain them")
  with open(os.path.join(directory, WEIGHTS_FILE), "rb") as f:
    state = flax.serialization.msgpack_restore(f.read())
  architecture = report["architecture"]
  net = JudgeNet(tuple(architecture["widths"]), architecture["embed_dim"])
  return Judges(net, state["params"], state["feature_mean"])


# --------------------------------------------------------------------------------------------
# The paper's metrics, toy versions.

class SubjectScores(NamedTuple):
  feature_similarity: float  # mean cosine similarity of judge features to the real photos
  subject_prob: float  # mean judge probability of "this is the subject"


class SceneScores(NamedTuple):
  scene_prob: float  # mean judge probability of the requested scene
  scene_accuracy: float  # fraction whose most likely scene is the requested one


class ClassScores(NamedTuple):
  class_prob: float
  class_accuracy: float


def _subject_scores(samples: Images, real_subject_photos: Images,
                    judges: Judges | None) -> SubjectScores:
  judges = judges or load_judges()
  out = judges.outputs(samples)
  real = judges.features(real_subject_photos)
  return SubjectScores(eval_metrics.mean_pairwise_cosine(out["features"], real),
                       float(np.mean(out["subject_prob"], dtype=np.float64)))


def subject_fidelity(samples: Images, real_subject_photos: Images,
                     judges: Judges | None = None) -> SubjectScores:
  """Subject fidelity, the analogue of DINO / CLIP-I (§4.1); higher is better.

  feature_similarity: the paper's formula, the mean cosine similarity over every (sample, real
  photo) pair, with the judge's centred features in place of DINO/CLIP embeddings (in [-1, 1];
  the photos against themselves score below 1 because they differ in place and size). The
  features encode class, scene, colour, size, count, place and subject-ness, so like DINO the
  score also rises with a shared background: the real photos are all in one room.
  subject_prob: the mean probability the subject head gives the samples, a direct "is it the
  orange-and-teal striped ball?" that has no counterpart in the paper.
  """
  return _subject_scores(samples, real_subject_photos, judges)


def _per_sample(requested: str | Sequence[str], n: int, allowed: Sequence[str],
                what: str) -> np.ndarray:
  names = [requested] * n if isinstance(requested, str) else list(requested)
  if len(names) != n:
    raise ValueError(f"{n} samples but {len(names)} requested {what}s")
  for name in names:
    if name not in allowed:
      raise ValueError(f"unknown {what} {name!r}; expected one of {list(allowed)}")
  return np.array([allowed.index(name) for name in names])


def prompt_fidelity(samples: Images, requested_scenes: str | Sequence[str],
                    judges: Judges | None = None) -> SceneScores:
  """Prompt fidelity, the analogue of CLIP-T (§4.1): is the requested scene there?

  CLIP-T compares each sample with its prompt's text embedding; here the prompt's only
  free part in recontextualisation is the scene, so we ask the scene head: the mean probability
  of the requested scene (one name for all samples, or one per sample), and how often it is
  the most likely scene. Higher is better.
  """
  judges = judges or load_judges()
  wanted = _per_sample(requested_scenes, len(samples), world.SCENES, "scene")
  return SceneScores(*_requested(judges.scene_probs(samples), wanted))


def class_fidelity(samples: Images, requested_classes: str | Sequence[str],
                   judges: Judges | None = None) -> ClassScores:
  """The class variant of `prompt_fidelity`: is the requested object class there?"""
  judges = judges or load_judges()
  wanted = _per_sample(requested_classes, len(samples), world.CLASSES, "class")
  return ClassScores(*_requested(judges.class_probs(samples), wanted))


def _requested(probs: np.ndarray, wanted: np.ndarray) -> tuple[float, float]:
  """(mean probability of each sample's requested label, how often it is the top label)."""
  picked = probs[np.arange(len(wanted)), wanted]
  return (float(np.mean(picked, dtype=np.float64)),
          float(np.mean(probs.argmax(1) == wanted)))


def pres(class_samples: Images, real_subject_photos: Images,
         judges: Judges | None = None) -> SubjectScores:
  """Prior preservation, the analogue of PRES (§4.3); lower is better.

  The `subject_fidelity` scores of the tuned model's samples of the bare class prompt ("a
  ball", no identifier). If fine-tuning drifted the class towards the subject, every ball is
  striped orange and teal and both numbers rise; a preserved prior gives plain balls of all
  colours, far from the subject in feature space and with a low subject probability.
  """
  return _subject_scores(class_samples, real_subject_photos, judges)


def div(samples_per_prompt: Sequence[Images], judges: Judges | None = None) -> float:
  """Diversity, the analogue of DIV (§4.3); higher = more diverse.

  The paper's formula with judge features in place of LPIPS: for each prompt, the mean over
  unordered pairs of its samples of the cosine distance 1 - cos(f_i, f_j) (in [0, 2]),
  computed as |f_i - f_j|^2 / 2 of the unit features so that identical images give exactly 0;
  then the mean over prompts. The judge sees class, colour, count, size, place and scene, not
  the texture detail LPIPS also weighs.
  """
  judges = judges or load_judges()
  distances = []
  for samples in samples_per_prompt:
    f = judges.features(samples).astype(np.float64)
    diff = f[:, None] - f[None]
    distances.append(np.sum(diff * diff, axis=-1) / 2)
  return eval_metrics.div(distances)


# --------------------------------------------------------------------------------------------
# Command line.

def main(argv: list[str] | None = None) -> None:
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(
      prog="python -m dreambooth_jax.toyworld.judges",
      description="Trains the toy-world judges and writes their weights and held-out scores.")
  parser.add_argument("--out", default=DEFAULT_DIR, help="directory for the two files")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--steps", type=int, default=2000)
  parser.add_argument("--batch_size", type=int, default=128)
  parser.add_argument("--learning_rate", type=float, default=2e-3)
  args = parser.parse_args(argv)
  start = time.perf_counter()
  judges = train_judges(args.seed, args.steps, args.batch_size, args.learning_rate)
  train_seconds = time.perf_counter() - start
  held_out = build_dataset(args.seed + 1000, n_world=1000, n_subject=300, n_hard=300)
  report = {
      "seed": args.seed, "steps": args.steps, "batch_size": args.batch_size,
      "learning_rate": args.learning_rate, "train_seconds": round(train_seconds, 1),
      "held_out_seed": args.seed + 1000,
      "held_out_sizes": {"world": 1000, "subject": 300, "hard_negatives": 300},
      "held_out_augmented": evaluate_judges(judges, held_out, augment_seed=1),
      "held_out_clean": evaluate_judges(judges, held_out, augment_seed=None),
  }
  judges.save(args.out, report)
  print(json.dumps(report, indent=2))


if __name__ == "__main__":
  main()
