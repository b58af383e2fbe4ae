"""The DreamBooth metrics on hand-computed cases, and the DINO / CLIP / LPIPS extractors.

The extractors are tiny random models saved like hub repos and loaded through the public
loaders: DINO from PyTorch-only weights (the from_pt path, checked against torch's own ViT),
CLIP from Flax weights, LPIPS from narrowed AlexNet / VGG16 PyTorch and safetensors files
(checked against a torch computation of the LPIPS formula). Nothing reaches the network.
"""

import importlib
import json
import math
import os
import types

import huggingface_hub
import jax
import numpy as np
import pytest
import safetensors.numpy
import torch
import torch.nn.functional as F
from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer,
                          FlaxCLIPModel, ViTConfig, ViTImageProcessor, ViTModel)
from transformers.modeling_flax_pytorch_utils import convert_pytorch_state_dict_to_flax
from transformers.models.clip.tokenization_clip import bytes_to_unicode

from dreambooth_jax.evaluation import features as eval_features, metrics as eval_metrics
from dreambooth_jax.models import ModelLoadError

RNG = np.random.default_rng(0)


def _images(*shapes):
  return [RNG.integers(0, 256, size=shape, dtype=np.uint8) for shape in shapes]


# --------------------------------------------------------------------------------------------
# Metrics, by hand.

def test_mean_pairwise_cosine_of_parallel_orthogonal_and_opposite_vectors():
  assert eval_metrics.mean_pairwise_cosine([[1.0, 0.0]], [[3.0, 0.0]]) == pytest.approx(1.0)
  assert eval_metrics.mean_pairwise_cosine([[1.0, 0.0]], [[0.0, 2.0]]) == pytest.approx(0.0)
  assert eval_metrics.mean_pairwise_cosine([[1.0, 1.0]], [[-2.0, -2.0]]) == pytest.approx(-1.0)


def test_dino_and_clip_i_average_every_generated_real_pair():
  generated = [[1.0, 0.0], [0.0, 1.0]]
  real = [[2.0, 0.0], [1.0, 1.0]]
  # cos: (g0,r0)=1, (g0,r1)=1/√2, (g1,r0)=0, (g1,r1)=1/√2 → (1 + √2) / 4.
  expected = (1 + math.sqrt(2)) / 4
  assert eval_metrics.dino(generated, real) == pytest.approx(expected)
  assert eval_metrics.clip_i(generated, real) == pytest.approx(expected)
  np.testing.assert_allclose(eval_metrics.cosine_matrix(generated, real),
                             [[1, 1 / math.sqrt(2)], [0, 1 / math.sqrt(2)]], atol=1e-12)


def test_clip_t_pairs_each_image_with_its_own_prompt():
  images = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]
  texts = [[1.0, 0.0], [1.0, 0.0], [0.0, 5.0]]
  # Row-wise only: cos = 1, 0, 1/√2 (not the 3×3 mean).
  assert eval_metrics.clip_t(images, texts) == pytest.approx((1 + 0 + 1 / math.sqrt(2)) / 3)
  # One prompt for every image.
  assert eval_metrics.clip_t(images, [2.0, 0.0]) == pytest.approx((1 + 0 + 1 / math.sqrt(2)) / 3)
  with pytest.raises(ValueError, match="3 images but 2 text"):
    eval_metrics.clip_t(images, texts[:2])


def test_pres_is_the_dino_formula_on_class_prompt_samples():
  class_samples = [[1.0, 0.0], [0.0, 1.0]]
  subject = [[1.0, 0.0]]
  assert eval_metrics.pres(class_samples, subject) == pytest.approx(0.5)
  # A drifted model whose "a dog" is always the subject scores the maximum.
  assert eval_metrics.pres([[1.0, 0.0], [2.0, 0.0]], subject) == pytest.approx(1.0)


def test_div_averages_pairs_within_each_prompt_then_over_prompts():
  i, j = eval_metrics.unordered_pairs(4)
  assert list(zip(i.tolist(), j.tolist())) == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
  # Prompt A: 3 images, pairs (0,1)=0.2 (0,2)=0.4 (1,2)=0.6 → 0.4; prompt B: 2 images → 0.8.
  matrix_a = np.array([[0, 0.2, 0.4], [0.2, 0, 0.6], [0.4, 0.6, 0]])
  assert eval_metrics.div([[0.2, 0.4, 0.6], [0.8]]) == pytest.approx(0.6)
  assert eval_metrics.div([matrix_a, [[0, 0.8], [0.8, 0]]]) == pytest.approx(0.6)
  with pytest.raises(ValueError, match="at least 2 images"):
    eval_metrics.div([[0.2], np.zeros((1, 1))])
  with pytest.raises(ValueError, match="zero embedding"):
    eval_metrics.dino([[0.0, 0.0]], [[1.0, 0.0]])


# --------------------------------------------------------------------------------------------
# DINO: a tiny PyTorch-only ViT checkpoint, converted on load.

@pytest.fixture(scope="session")
def dino_torch(tmp_path_factory):
  torch.manual_seed(0)
  config = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=37, image_size=32, patch_size=16)
  model = ViTModel(config).eval()
  directory = str(tmp_path_factory.mktemp("dino"))
  model.save_pretrained(directory)  # model.safetensors only: exercises from_pt
  return directory, model


@pytest.fixture(scope="session")
def dino(dino_torch):
  return eval_features.load_dino(dino_torch[0], batch_size=4)


def test_dino_cls_embedding_matches_torch_vit_on_any_image_size(dino_torch, dino):
  assert not os.path.exists(os.path.join(dino_torch[0], "flax_model.msgpack"))
  images = _images((40, 56, 3), (32, 32, 3), (64, 48, 3))
  emb = dino(images)
  assert emb.shape == (3, 32) and emb.dtype == np.float32
  with torch.no_grad():
    pixels = torch.from_numpy(eval_features.preprocess_dino(images, 32))
    expected = dino_torch[1](pixel_values=pixels).last_hidden_state[:, 0].numpy()
  np.testing.assert_allclose(emb, expected, atol=1e-4, rtol=1e-4)
  # A batch of one (another padding bucket) gives the same row; an NHWC array works too.
  np.testing.assert_allclose(dino(np.stack([images[1]])), emb[1:2], atol=1e-5)


def test_dino_preprocessing_is_a_vit_processor_with_imagenet_statistics():
  processor = ViTImageProcessor(size={"height": 32, "width": 32}, resample=2,
                                image_mean=eval_features.IMAGENET_MEAN.tolist(),
                                image_std=eval_features.IMAGENET_STD.tolist())
  images = _images((50, 70, 3), (90, 40, 3))
  np.testing.assert_allclose(eval_features.preprocess_dino(images, 32),
                             processor(images, return_tensors="np")["pixel_values"], atol=1e-5)


# --------------------------------------------------------------------------------------------
# CLIP: a tiny Flax checkpoint with a byte-level CLIP tokenizer.

@pytest.fixture(scope="session")
def clip_torch(tmp_path_factory):
  """(directory, torch CLIPModel): a tiny random CLIP, saved with Flax weights only."""
  directory = str(tmp_path_factory.mktemp("clip"))
  chars = list(bytes_to_unicode().values())  # a byte-level vocabulary without merges
  vocab = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
  with open(os.path.join(directory, "vocab.json"), "w") as f:
    json.dump({token: i for i, token in enumerate(vocab)}, f)
  with open(os.path.join(directory, "merges.txt"), "w") as f:
    f.write("#version: 0.2\n")
  CLIPTokenizer(os.path.join(directory, "vocab.json"), os.path.join(directory, "merges.txt"),
                model_max_length=77).save_pretrained(directory)
  n = len(vocab)
  config = CLIPConfig(
      text_config=dict(vocab_size=n, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                       num_attention_heads=4, max_position_embeddings=77, bos_token_id=n - 2,
                       eos_token_id=n - 1, pad_token_id=n - 1),
      vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                         num_attention_heads=4, image_size=32, patch_size=8),
      projection_dim=16)
  torch.manual_seed(0)
  model = CLIPModel(config).eval()
  # Its weights in Flax (transformers' own PyTorch→Flax conversion, against the parameter
  # shapes: a Flax random init would run op by op for seconds).
  flax_model = FlaxCLIPModel(config, _do_init=False)
  shapes = types.SimpleNamespace(params=flax_model.params_shape_tree,
                                 base_model_prefix=flax_model.base_model_prefix)
  params = convert_pytorch_state_dict_to_flax(dict(model.state_dict()), shapes)
  flax_model.save_pretrained(directory, params=params)  # flax_model.msgpack only
  return directory, model


@pytest.fixture(scope="session")
def clip(clip_torch):
  return eval_features.load_clip(clip_torch[0], batch_size=4)


def test_clip_embeddings_are_the_models_unit_projections(clip_torch, clip):
  assert not os.path.exists(os.path.join(clip_torch[0], "model.safetensors"))
  images = _images((40, 64, 3), (32, 32, 3), (70, 30, 3))
  prompts = ["a photo of sks dog", "a red cube", "a photo of sks dog"]
  image_emb, text_emb = clip.embed_images(images), clip.embed_texts(prompts)
  assert image_emb.shape == text_emb.shape == (3, 16)
  np.testing.assert_allclose(np.linalg.norm(image_emb, axis=1), 1, atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(text_emb, axis=1), 1, atol=1e-5)
  np.testing.assert_allclose(text_emb[0], text_emb[2], atol=1e-6)
  assert np.abs(text_emb[0] - text_emb[1]).max() > 1e-3
  tokens = CLIPTokenizer.from_pretrained(clip_torch[0])(
      prompts, padding="max_length", max_length=77, return_tensors="pt")
  with torch.no_grad():
    want_images = clip_torch[1].get_image_features(
        pixel_values=torch.from_numpy(eval_features.preprocess_clip(images, 32))).numpy()
    want_texts = clip_torch[1].get_text_features(**tokens).numpy()
  for got, want in ((image_emb, want_images), (text_emb, want_texts)):
    np.testing.assert_allclose(got, want / np.linalg.norm(want, axis=1, keepdims=True),
                               atol=1e-4)
  assert -1 <= eval_metrics.clip_t(image_emb, text_emb) <= 1


def test_clip_preprocessing_matches_the_clip_image_processor():
  processor = CLIPImageProcessor(size={"shortest_edge": 32},
                                 crop_size={"height": 32, "width": 32})
  images = _images((45, 80, 3), (77, 33, 3))
  np.testing.assert_allclose(eval_features.preprocess_clip(images, 32),
                             processor(images, return_tensors="np")["pixel_values"], atol=1e-5)


# --------------------------------------------------------------------------------------------
# LPIPS: narrowed torchvision-layout backbones and lpips-layout heads, against torch.

# torchvision `features` of each net: ("c", index, kernel, stride, padding), ("p", k, s), "t" = tap.
_ALEX = [("c", 0, 11, 4, 2), "t", ("p", 3, 2), ("c", 3, 5, 1, 2), "t", ("p", 3, 2),
         ("c", 6, 3, 1, 1), "t", ("c", 8, 3, 1, 1), "t", ("c", 10, 3, 1, 1), "t"]
_VGG = [("c", 0, 3, 1, 1), ("c", 2, 3, 1, 1), "t", ("p", 2, 2),
        ("c", 5, 3, 1, 1), ("c", 7, 3, 1, 1), "t", ("p", 2, 2),
        ("c", 10, 3, 1, 1), ("c", 12, 3, 1, 1), ("c", 14, 3, 1, 1), "t", ("p", 2, 2),
        ("c", 17, 3, 1, 1), ("c", 19, 3, 1, 1), ("c", 21, 3, 1, 1), "t", ("p", 2, 2),
        ("c", 24, 3, 1, 1), ("c", 26, 3, 1, 1), ("c", 28, 3, 1, 1), "t"]
_LAYERS = {"alex": _ALEX, "vgg": _VGG}


def _random_lpips_weights(net, width=6, seed=0):
  """(backbone, heads) torch state dicts of a net whose convs all have `width` channels."""
  gen = torch.Generator().manual_seed(seed)
  backbone, heads, channels = {"classifier.1.weight": torch.zeros(2, 2)}, {}, 3
  for layer in _LAYERS[net]:
    if layer == "t":
      k = len(heads) // 2
      heads[f"lin{k}.model.1.weight"] = torch.rand(1, channels, 1, 1, generator=gen)
      heads[f"lins.{k}.model.1.weight"] = heads[f"lin{k}.model.1.weight"]
    elif layer[0] == "c":
      _, index, kernel, _, _ = layer
      std = math.sqrt(2 / (channels * kernel * kernel))
      backbone[f"features.{index}.weight"] = torch.randn(width, channels, kernel, kernel,
                                                         generator=gen) * std
      backbone[f"features.{index}.bias"] = torch.randn(width, generator=gen) * 0.1
      channels = width
  return backbone, heads


def _torch_lpips(net, backbone, heads, a, b):
  """LPIPS v0.1 written directly in torch (NCHW), the reference for our Flax version."""
  x = torch.from_numpy(np.concatenate([a, b])).permute(0, 3, 1, 2).float() / 127.5 - 1
  x = (x - torch.tensor([-.030, -.088, -.188]).view(1, 3, 1, 1)) / torch.tensor(
      [.458, .448, .450]).view(1, 3, 1, 1)
  taps = []
  for layer in _LAYERS[net]:
    if layer == "t":
      taps.append(x)
    elif layer[0] == "c":
      _, index, _, stride, padding = layer
      x = F.relu(F.conv2d(x, backbone[f"features.{index}.weight"],
                          backbone[f"features.{index}.bias"], stride=stride, padding=padding))
    else:
      x = F.max_pool2d(x, layer[1], layer[2])
  total, n = 0, len(a)
  for k, f in enumerate(taps):
    f = f / (torch.sqrt(torch.sum(f ** 2, dim=1, keepdim=True)) + 1e-10)
    total = total + F.conv2d((f[:n] - f[n:]) ** 2, heads[f"lin{k}.model.1.weight"]).mean((1, 2, 3))
  return total.numpy()


@pytest.fixture(scope="session")
def lpips_dirs(tmp_path_factory):
  """{net: (directory, backbone, heads)}: AlexNet as .pth files, VGG16's trunk as safetensors."""
  out = {}
  for net in ("alex", "vgg"):
    directory = str(tmp_path_factory.mktemp(f"lpips_{net}"))
    backbone, heads = _random_lpips_weights(net)
    if net == "alex":
      torch.save(backbone, os.path.join(directory, "alexnet-owt-7be5be79.pth"))
    else:
      safetensors.numpy.save_file({k: v.numpy() for k, v in backbone.items()},
                                  os.path.join(directory, "vgg16.safetensors"))
    torch.save(heads, os.path.join(directory, f"{net}.pth"))
    out[net] = (directory, backbone, heads)
  return out


@pytest.fixture(scope="session")
def lpips_alex(lpips_dirs):
  return eval_features.load_lpips(lpips_dirs["alex"][0], batch_size=4)


def test_lpips_is_zero_on_equal_images_symmetric_and_positive(lpips_alex):
  x = np.stack(_images(*[(64, 64, 3)] * 3))
  y = np.stack(_images(*[(64, 64, 3)] * 3))
  assert lpips_alex.net == "alex"
  # 0 up to float rounding (a conv's result can depend on the row's place in the batch).
  np.testing.assert_allclose(lpips_alex(x, x), np.zeros(3), atol=1e-9)
  d_xy, d_yx = lpips_alex(x, y), lpips_alex(y, x)
  assert d_xy.shape == (3,) and np.all(d_xy > 1e-3)
  np.testing.assert_allclose(d_xy, d_yx, rtol=1e-5)


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_lpips_matches_torch_reference(net, lpips_dirs, lpips_alex):
  directory, backbone, heads = lpips_dirs[net]
  lpips = lpips_alex if net == "alex" else eval_features.load_lpips(directory, batch_size=4)
  assert lpips.net == net  # a VGG directory is recognised by its heads file
  a, b = np.stack(_images(*[(64, 64, 3)] * 3)), np.stack(_images(*[(64, 64, 3)] * 3))
  np.testing.assert_allclose(lpips(a, b), _torch_lpips(net, backbone, heads, a, b),
                             rtol=1e-4, atol=1e-6)


def test_lpips_within_groups_gives_every_unordered_pair_for_div(lpips_alex):
  group_a = _images(*[(64, 64, 3)] * 3)
  group_b = _images(*[(64, 64, 3)] * 2)
  distances = lpips_alex.within_groups([group_a, group_b])
  assert [d.shape for d in distances] == [(3,), (1,)]
  i, j = eval_metrics.unordered_pairs(3)
  np.testing.assert_allclose(distances[0], lpips_alex(np.stack(group_a)[i], np.stack(group_a)[j]),
                             rtol=1e-5)
  expected = (distances[0].mean() + distances[1][0]) / 2
  assert eval_metrics.div(distances) == pytest.approx(float(expected), rel=1e-6)


def test_lpips_default_source_is_torch_hub_cache_and_lpips_package(tmp_path, monkeypatch,
                                                                    lpips_dirs, lpips_alex):
  directory = lpips_dirs["alex"][0]
  monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
  with pytest.raises(ModelLoadError, match="alexnet-owt-7be5be79.pth not found") as error:
    eval_features.load_lpips("alex")
  assert "\n" not in str(error.value)
  checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
  checkpoints.mkdir(parents=True)
  os.symlink(os.path.join(directory, "alexnet-owt-7be5be79.pth"),
             checkpoints / "alexnet-owt-7be5be79.pth")
  (tmp_path / "site").mkdir()
  monkeypatch.syspath_prepend(str(tmp_path / "site"))  # no lpips package there yet
  if importlib.util.find_spec("lpips") is None:
    with pytest.raises(ModelLoadError, match=r"lpips/weights/v0.1/alex.pth.*pip install"):
      eval_features.load_lpips("alex")
  # A stand-in lpips package holding the heads, where the real one keeps them.
  weights = tmp_path / "site" / "lpips" / "weights" / "v0.1"
  weights.mkdir(parents=True)
  (tmp_path / "site" / "lpips" / "__init__.py").write_text("")
  os.symlink(os.path.join(directory, "alex.pth"), weights / "alex.pth")
  importlib.invalidate_caches()
  loaded = eval_features.load_lpips("alex")
  assert loaded.module.channels == lpips_alex.module.channels == (6, 6, 6, 6, 6)
  for got, want in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(lpips_alex.params)):
    np.testing.assert_array_equal(got, want)


# --------------------------------------------------------------------------------------------
# Offline and bad inputs: one line naming what is missing.

@pytest.mark.parametrize("loader,name", [
    (eval_features.load_dino, "facebook/dino-vits16"),
    (eval_features.load_clip, "openai/clip-vit-large-patch14"),
    (eval_features.load_lpips, "someone/lpips-weights"),
])
def test_offline_hub_id_not_in_cache_names_the_id(loader, name, tmp_path, monkeypatch):
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
  with pytest.raises(ModelLoadError, match=name) as error:
    loader(name)
  assert "offline" in str(error.value) and "\n" not in str(error.value)


def test_missing_or_incomplete_directories_are_named(tmp_path, clip_torch, lpips_dirs):
  missing = str(tmp_path / "nowhere")
  with pytest.raises(ModelLoadError, match=f"{missing} is neither a local directory"):
    eval_features.load_dino(missing)
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / "config.json").write_text('{"model_type": "vit"}')
  with pytest.raises(ModelLoadError, match=r"empty has no weights \(looked for model.safetensors, flax_model"):
    eval_features.load_dino(str(tmp_path / "empty"))
  with pytest.raises(ModelLoadError, match="is a 'clip' model, not 'vit'"):
    eval_features.load_dino(clip_torch[0])
  with pytest.raises(ModelLoadError, match="has no alexnet.safetensors or alexnet.pth"):
    eval_features.load_lpips(str(tmp_path / "empty"), net="alex")
  with pytest.raises(ModelLoadError, match="has no vgg16.safetensors or vgg16.pth"):
    eval_features.load_lpips(lpips_dirs["alex"][0], net="vgg")
