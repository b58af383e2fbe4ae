"""Model loading (Flax and PyTorch weights), the builtin tiny model, and export."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from dreambooth_jax import models


def test_tiny_pipeline_is_saved_like_a_hub_repo(tiny_dir):
  with open(os.path.join(tiny_dir, "model_index.json")) as f:
    index = json.load(f)
  assert index["unet"] == ["diffusers", "FlaxUNet2DConditionModel"]
  assert index["text_encoder"] == ["transformers", "FlaxCLIPTextModel"]
  for path in ("unet/diffusion_flax_model.msgpack", "vae/diffusion_flax_model.msgpack",
               "text_encoder/flax_model.msgpack", "tokenizer/vocab.json",
               "tokenizer/merges.txt", "scheduler/scheduler_config.json"):
    assert os.path.isfile(os.path.join(tiny_dir, path)), path


def test_tiny_pipeline_is_deterministic(tmp_path, tiny):
  _, params = tiny
  rebuilt = models.load_pretrained(models.build_tiny_pipeline(str(tmp_path / "again")))[1]
  jax.tree.map(np.testing.assert_array_equal, rebuilt, params)


def test_load_pretrained_components(tiny):
  components, params = tiny
  assert components.vae_scale_factor == 2
  assert components.prediction_type == "epsilon"
  assert components.noise_scheduler().config.num_train_timesteps == 1000
  assert set(params) == {"unet", "vae", "text_encoder"}
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(params))
  ids = components.tokenizer("a photo of sks toy").input_ids
  assert ids[0] == components.tokenizer.bos_token_id and ids[-1] == components.tokenizer.eos_token_id
  assert len(ids) == 7  # bos, 5 words of one token each in the tiny vocabulary, eos


def test_missing_component_and_weights_are_named(tmp_path, tiny_dir):
  broken = tmp_path / "broken"
  shutil.copytree(tiny_dir, broken)
  os.remove(broken / "vae" / "diffusion_flax_model.msgpack")
  with pytest.raises(models.ModelLoadError, match=r"vae has no weights"):
    models.load_pretrained(str(broken))
  shutil.rmtree(broken / "tokenizer")
  with pytest.raises(models.ModelLoadError, match=r"missing component 'tokenizer'"):
    models.load_pretrained(str(broken))
  with pytest.raises(models.ModelLoadError, match="unknown builtin"):
    models.resolve_pretrained("builtin:nope")
  with pytest.raises(models.ModelLoadError, match="neither a local directory nor a hub id"):
    models.resolve_pretrained(str(tmp_path / "does" / "not" / "exist"))


def test_v_prediction_is_read_from_the_scheduler_config(tmp_path, tiny_dir):
  copy = tmp_path / "v"
  shutil.copytree(tiny_dir, copy)
  config_path = copy / "scheduler" / "scheduler_config.json"
  config = json.loads(config_path.read_text())
  config_path.write_text(json.dumps(dict(config, prediction_type="v_prediction")))
  components, _ = models.load_pretrained(str(copy))
  assert components.prediction_type == "v_prediction"
  assert components.noise_scheduler().config.prediction_type == "v_prediction"


def test_pytorch_safetensors_are_converted_on_load(tmp_path, tiny_dir):
  """A PyTorch-only pipeline (safetensors) loads into Flax modules that compute the same."""
  import torch  # pylint: disable=g-import-not-at-top  (the test extra installs it)
  import diffusers  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  pt_dir = tmp_path / "pt"
  shutil.copytree(tiny_dir, pt_dir)
  torch.manual_seed(0)
  torch_models = {}
  for name, cls, weights in (
      ("unet", diffusers.UNet2DConditionModel, "diffusion_flax_model.msgpack"),
      ("vae", diffusers.AutoencoderKL, "diffusion_flax_model.msgpack"),
      ("text_encoder", transformers.CLIPTextModel, "flax_model.msgpack")):
    if name == "text_encoder":
      model = cls(transformers.CLIPTextConfig.from_pretrained(str(pt_dir / name)))
    else:
      model = cls.from_config(cls.load_config(str(pt_dir / name)))
    os.remove(pt_dir / name / weights)
    model.eval().save_pretrained(str(pt_dir / name), safe_serialization=True)
    torch_models[name] = model
  assert (pt_dir / "unet" / "diffusion_pytorch_model.safetensors").is_file()
  assert (pt_dir / "text_encoder" / "model.safetensors").is_file()

  components, params = models.load_pretrained(str(pt_dir))
  rng = np.random.default_rng(0)
  sample = rng.standard_normal((1, 4, 16, 16)).astype(np.float32)
  context = rng.standard_normal((1, 77, 32)).astype(np.float32)
  ids = np.asarray([components.tokenizer("a photo of sks toy", padding="max_length").input_ids])
  with torch.no_grad():
    unet_expected = torch_models["unet"](torch.from_numpy(sample), 10,
                                         torch.from_numpy(context)).sample.numpy()
    text_expected = torch_models["text_encoder"](torch.from_numpy(ids))[0].numpy()
  unet_got = components.unet.apply({"params": params["unet"]}, sample, jax.numpy.asarray([10]),
                                   context).sample
  text_got = components.text_encoder(ids, params=params["text_encoder"])[0]
  np.testing.assert_allclose(np.asarray(unet_got), unet_expected, atol=1e-4)
  np.testing.assert_allclose(np.asarray(text_got), text_expected, atol=1e-4)


def test_export_is_atomic_and_replaces_an_old_export(tmp_path, tiny):
  components, params = tiny
  out = tmp_path / "export"
  out.mkdir()
  (out / "stale.txt").write_text("from a killed export")
  # A tuned text encoder (train.train_text_encoder) is what the export must carry.
  params = dict(params, text_encoder=jax.tree.map(lambda x: x + 0.5, params["text_encoder"]))
  models.export_pipeline(components, params, str(out))
  assert sorted(os.listdir(out)) == ["model_index.json", "scheduler", "text_encoder",
                                     "tokenizer", "unet", "vae"]
  assert not os.path.exists(str(out) + ".tmp") and not os.path.exists(str(out) + ".old")
  _, reloaded = models.load_pretrained(str(out))
  jax.tree.map(np.testing.assert_array_equal, reloaded, params)
