"""The toy-world base model: its pretraining command end to end (test-sized) and the
committed pipeline (loads, tokenizes the world, follows captions)."""

import json
import os
import re

import numpy as np
import pytest

from dreambooth_jax import models, toyworld
from dreambooth_jax.data import demo_data, input_pipeline
from dreambooth_jax.toyworld import pretrain, world

# A pretraining run cut down to seconds: a few steps of each stage on a few pictures, with
# smaller (same-class) components so that it compiles fast.
TEST_ARCH = pretrain.Architecture(
    vae=dict(pretrain.VAE_CONFIG, block_out_channels=(16, 16, 16)),
    unet=dict(pretrain.UNET_CONFIG, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
              up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), block_out_channels=(32, 32),
              cross_attention_dim=32),
    text=dict(pretrain.TEXT_CONFIG, hidden_size=32, intermediate_size=64, num_hidden_layers=1))
TEST_SETTINGS = pretrain.Settings(
    vae_images=20, vae_steps=3, vae_batch_size=4, train_images=24, steps=3, batch_size=8,
    warmup_steps=1, eval_steps=2, eval_images_per_caption=1, eval_colours=("red",),
    grid_images=2, log_every=1)


@pytest.fixture(scope="module")
def committed():
  return models.load_pretrained(pretrain.DEFAULT_DIR)


def test_caption_table_matches_the_world_grammar():
  captions = pretrain.all_captions()
  assert captions[-1] == "" and len(set(captions)) == len(captions)
  assert {e.caption for e in world.generate(0, 300, size=8)} <= set(captions)
  # Drawn on device from the attributes: every part is kept, dropped or the whole caption
  # emptied, never anything else.
  data = pretrain.world_images(1, 64)
  attributes = {name: np.asarray(getattr(data, name))
                for name in ("classes", "colours", "scenes", "sizes", "counts")}
  import jax  # pylint: disable=g-import-not-at-top
  rows = np.asarray(pretrain.caption_index(jax.random.key(0), **attributes))
  for k, row in enumerate(rows):
    caption = captions[row]
    if not caption:
      continue
    colour = list(world.COLOURS)[attributes["colours"][k]]
    scene = world.SCENES[attributes["scenes"][k]]
    size = world.SIZES[attributes["sizes"][k]]
    allowed = {world.caption_for(world.CLASSES[attributes["classes"][k]],
                                 int(attributes["counts"][k]) + 1, colour=c, size=s, scene=sc)
               for c in (colour, None) for s in (size, None) for sc in (scene, None)}
    assert caption in allowed
  assert 0 < sum(c == "" for c in (captions[r] for r in rows)) < len(rows) / 2


def test_test_sized_pretraining_writes_a_loadable_pipeline(tmp_path):
  out_dir = str(tmp_path / "model")
  grid_path = str(tmp_path / "docs" / "grid.png")
  report = pretrain.pretrain(out_dir, TEST_SETTINGS, TEST_ARCH, grid_path=grid_path)
  assert sorted(os.listdir(tmp_path)) == ["docs", "model"]  # no staging or tmp dir left
  assert report["training"]["diffusion"]["steps"] == 3
  assert not report["training"]["diffusion"]["stopped_early"]
  with open(os.path.join(out_dir, pretrain.QUALITY_FILE)) as f:
    quality = json.load(f)
  assert quality["captions"] == len(world.CLASSES) * len(world.SCENES)
  for name in ("class_accuracy", "colour_accuracy", "scene_accuracy"):
    assert 0.0 <= quality[name] <= 1.0
  components, params = models.load_pretrained(out_dir)
  assert components.vae_scale_factor == 4
  assert components.vae.scaling_factor == pytest.approx(
      quality["training"]["autoencoder"]["scaling_factor"], rel=1e-4)
  assert components.tokenizer.model_max_length == pretrain.MAX_LENGTH
  images = pretrain.sample_prompts(components, params, ["a red ball on grass"], 2, seed=0,
                                   steps=2, guidance_scale=3.0)
  assert images.shape == (1, 2, 32, 32, 3) and images.dtype == np.uint8
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with Image.open(grid_path) as grid:
    assert grid.size[1] == len(pretrain.GRID_PROMPTS) * (2 * 32 + 2)


def test_committed_pipeline_tokenizes_the_world_and_keeps_sks_unused(committed):
  components, params = committed
  tokenizer = components.tokenizer
  for word in world.VOCABULARY + pretrain.EXTRA_WORDS + pretrain.RARE_TOKENS:
    assert len(tokenizer.tokenize(word)) == 1, word
  sks = tokenizer.convert_tokens_to_ids(pretrain.IDENTIFIER + "</w>")
  assert sks == max(tokenizer.get_vocab().values()) - 2  # the last merge: the rarest word
  prompt = input_pipeline.tokenize(tokenizer, world.prompt_for("ball", "on the beach", "sks"))
  assert list(prompt[:6]) == [tokenizer.bos_token_id] + [
      tokenizer.convert_tokens_to_ids(w + "</w>") for w in ("a", "sks", "ball", "on")] + [
          tokenizer.convert_tokens_to_ids("the</w>")]
  # No caption the pretraining could draw holds a rare token, as a word or as a token id.
  rare_ids = {tokenizer.convert_tokens_to_ids(t + "</w>") for t in pretrain.RARE_TOKENS}
  table = pretrain.token_table(tokenizer)
  assert not rare_ids & set(table.ravel().tolist())
  assert not any(set(c.split()) & set(pretrain.RARE_TOKENS) for c in pretrain.all_captions())
  assert set(params) == {"unet", "vae", "text_encoder"}


def test_committed_pipeline_is_small():
  total = 0
  for root, _, files in os.walk(pretrain.DEFAULT_DIR):
    total += sum(os.path.getsize(os.path.join(root, name)) for name in files)
  assert total <= 20 * 2**20


def test_committed_quality_meets_the_targets():
  with open(os.path.join(pretrain.DEFAULT_DIR, pretrain.QUALITY_FILE)) as f:
    quality = json.load(f)
  assert quality["class_accuracy"] >= 0.7
  assert quality["scene_accuracy"] >= 0.8
  assert quality["captions"] == len(world.CLASSES) * len(world.COLOURS) * len(world.SCENES)


def test_committed_samples_follow_their_captions(committed):
  """Every class in every scene, in red, 2 samples each: the quality.json check in small (chance
  would be 1/4 for the class, 1/6 for the colour, 1/5 for the scene)."""
  components, params = committed
  captions = pretrain.quality_captions(("red",))
  images = pretrain.sample_prompts(components, params, [c[0] for c in captions], 2, seed=0,
                                   steps=25, guidance_scale=pretrain.Settings().guidance_scale)
  wanted = [[c[k] for c in captions for _ in range(2)] for k in (1, 2, 3)]
  scores = pretrain.judge_samples(images.reshape(-1, 32, 32, 3), *wanted)
  assert scores["class_accuracy"] >= 0.7, scores
  assert scores["colour_accuracy"] >= 0.9, scores
  assert scores["scene_accuracy"] >= 0.9, scores


def test_builtin_names_of_the_demo(tmp_path, monkeypatch):
  """builtin:toyworld is the committed pipeline; builtin:toyworld-subject its subject photos."""
  assert models.resolve_pretrained(models.BUILTIN_TOYWORLD) == toyworld.PRETRAINED_DIR
  models.check_pretrained(models.BUILTIN_TOYWORLD)  # no error
  with pytest.raises(models.ModelLoadError, match="builtin:tiny-sd, builtin:toyworld"):
    models.check_pretrained("builtin:toy")
  monkeypatch.setenv("DREAMBOOTH_JAX_CACHE", str(tmp_path))
  directory = demo_data.resolve_instance_dir(demo_data.BUILTIN_TOYWORLD_SUBJECT)
  assert os.path.dirname(directory) == str(tmp_path)
  assert re.fullmatch(r"toyworld-subject-[0-9a-f]{12}", os.path.basename(directory))
  names = sorted(os.listdir(directory))
  assert names == [f"subject_{k}.png" for k in range(4)]
  loaded = input_pipeline.load_images([os.path.join(directory, n) for n in names], 32)
  np.testing.assert_array_equal(np.stack(loaded), np.stack(world.subject_photos(32)))
