"""Loading pipelines from what users have, and exports that the PyTorch world loads as they are.

Oracles: diffusers 0.39 and transformers 4.57 (PyTorch, CPU torch) from the test extra.
"""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from dreambooth_jax import models, sharding
from dreambooth_jax.models import pipeline, sampling, single_file, weights

PROMPT = "a photo of sks toy"


def _flat_equal(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_tiny_pipeline_is_saved_like_a_hub_repo_of_today(tiny_dir):
  with open(os.path.join(tiny_dir, "model_index.json")) as f:
    index = json.load(f)
  assert index["_class_name"] == "StableDiffusionPipeline"
  assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
  assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
  for path in ("unet/diffusion_pytorch_model.safetensors",
               "vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
               "tokenizer/vocab.json", "tokenizer/merges.txt",
               "scheduler/scheduler_config.json"):
    assert os.path.isfile(os.path.join(tiny_dir, path)), path


def test_tiny_pipeline_is_deterministic(tmp_path, tiny):
  _, params = tiny
  rebuilt = models.load_pretrained(models.build_tiny_pipeline(str(tmp_path / "again")))[1]
  _flat_equal(rebuilt, params)


def test_load_pretrained_components(tiny):
  components, params = tiny
  assert components.vae_scale_factor == 2
  assert components.prediction_type == "epsilon"
  assert components.noise_schedule().num_train_timesteps == 1000
  assert set(params) == {"unet", "vae", "text_encoder"}
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(params))
  ids = components.tokenizer.encode([PROMPT])[0]
  assert ids[0] == components.tokenizer.bos_token_id
  assert ids[6] == components.tokenizer.eos_token_id  # 5 words of one token each, then eos
  assert list(ids[7:]) == [components.tokenizer.pad_token_id] * 70


def test_missing_component_and_weights_are_named(tmp_path, tiny_dir):
  broken = tmp_path / "broken"
  shutil.copytree(tiny_dir, broken)
  os.remove(broken / "vae" / "diffusion_pytorch_model.safetensors")
  with pytest.raises(models.ModelLoadError, match=r"vae has no weights"):
    models.load_pretrained(str(broken))
  shutil.rmtree(broken / "tokenizer")
  with pytest.raises(models.ModelLoadError, match=r"missing component 'tokenizer'"):
    models.load_pretrained(str(broken))
  with pytest.raises(models.ModelLoadError, match="unknown builtin"):
    models.resolve_pretrained("builtin:nope")
  with pytest.raises(models.ModelLoadError, match="neither a local directory nor a hub id"):
    models.resolve_pretrained(str(tmp_path / "does" / "not" / "exist"))


def test_a_config_we_cannot_honour_is_one_line_naming_it(tmp_path, tiny_dir):
  copy = tmp_path / "odd"
  shutil.copytree(tiny_dir, copy)
  config_path = copy / "unet" / "config.json"
  config_path.write_text(json.dumps(dict(json.loads(config_path.read_text()),
                                         class_embed_type="timestep")))
  with pytest.raises(models.ModelLoadError, match=r"^model.pretrained: .*class_embed_type"):
    models.load_pretrained(str(copy))


def test_v_prediction_is_read_from_the_scheduler_config(tmp_path, tiny_dir):
  copy = tmp_path / "v"
  shutil.copytree(tiny_dir, copy)
  config_path = copy / "scheduler" / "scheduler_config.json"
  config = json.loads(config_path.read_text())
  config_path.write_text(json.dumps(dict(config, prediction_type="v_prediction")))
  components, _ = models.load_pretrained(str(copy))
  assert components.prediction_type == "v_prediction"


@pytest.fixture(scope="module")
def torch_pipeline_dir(tmp_path_factory, tiny_dir):
  """The tiny pipeline as today's diffusers/transformers save_pretrained write it, from
  PyTorch models with random weights of their own (not ours)."""
  import torch  # pylint: disable=g-import-not-at-top  (the test extra installs it)
  import diffusers  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  out = tmp_path_factory.mktemp("torch") / "pipe"
  shutil.copytree(tiny_dir, out)
  torch.manual_seed(0)
  torch_models = {}
  for name, cls, weights_file in (
      ("unet", diffusers.UNet2DConditionModel, "diffusion_pytorch_model.safetensors"),
      ("vae", diffusers.AutoencoderKL, "diffusion_pytorch_model.safetensors"),
      ("text_encoder", transformers.CLIPTextModel, "model.safetensors")):
    if name == "text_encoder":
      model = cls(transformers.CLIPTextConfig.from_pretrained(str(out / name)))
    else:
      model = cls.from_config(cls.load_config(str(out / name)))
    with torch.no_grad():  # every tensor random, so that a misplaced one cannot hide
      for tensor in model.parameters():
        tensor.copy_(torch.randn_like(tensor) * 0.2)
    os.remove(out / name / weights_file)
    shutil.rmtree(out / name)
    model.eval().save_pretrained(str(out / name), safe_serialization=True)
    torch_models[name] = model
  return out, torch_models


def test_pytorch_pipeline_of_todays_writers_loads_and_computes_the_same(torch_pipeline_dir):
  import torch  # pylint: disable=g-import-not-at-top
  out, torch_models = torch_pipeline_dir
  components, params = models.load_pretrained(str(out))
  rng = np.random.default_rng(0)
  sample = rng.standard_normal((1, 4, 16, 16)).astype(np.float32)
  context = rng.standard_normal((1, 77, 32)).astype(np.float32)
  ids = components.tokenizer.encode([PROMPT])
  with torch.no_grad():
    unet_expected = torch_models["unet"](torch.from_numpy(sample), 10,
                                         torch.from_numpy(context)).sample.numpy()
    text_expected = torch_models["text_encoder"](torch.from_numpy(ids.astype(np.int64)))[0]
  unet_got = components.predict(params["unet"], sample, np.asarray([10]), context)
  text_got = components.encode_text(params["text_encoder"], ids)
  np.testing.assert_allclose(np.asarray(unet_got), unet_expected, atol=1e-5)
  np.testing.assert_allclose(np.asarray(text_got), text_expected.numpy(), atol=1e-5)


def test_an_earlier_flax_export_still_loads(tmp_path, tiny):
  """This project's exports before the model layer were diffusers' Flax pipelines (msgpack);
  written here by diffusers' own FlaxStableDiffusionPipeline, they load with the same weights."""
  import diffusers  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  components, params = tiny
  flax_dir = tmp_path / "flax_export"
  unet = diffusers.FlaxUNet2DConditionModel.from_config(
      pipeline.torch_config("unet", components.configs["unet"]))
  vae = diffusers.FlaxAutoencoderKL.from_config(
      pipeline.torch_config("vae", components.configs["vae"]))
  text = transformers.FlaxCLIPTextModel(transformers.CLIPTextConfig(
      **pipeline.torch_config("text_encoder", components.configs["text_encoder"])), _do_init=False)
  tokenizer = transformers.CLIPTokenizer.from_pretrained(
      os.path.join(models.resolve_pretrained(models.BUILTIN_TINY), "tokenizer"))
  flax_pipeline = diffusers.FlaxStableDiffusionPipeline(
      vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
      scheduler=diffusers.FlaxDDIMScheduler.from_config(components.scheduler_config),
      safety_checker=None, feature_extractor=None)
  flax_pipeline.save_pretrained(str(flax_dir), params=jax.device_get(params))
  assert (flax_dir / "unet" / "diffusion_flax_model.msgpack").is_file()
  _, loaded = models.load_pretrained(str(flax_dir))
  _flat_equal(loaded, params)


@pytest.fixture(scope="module")
def export(tmp_path_factory, tiny):
  """The tiny pipeline with a tuned text encoder, exported with the fp16 variant and the
  single file (what train.py writes with export.fp16_variant and export.single_file)."""
  components, params = tiny
  params = dict(params, text_encoder=jax.tree.map(lambda x: x + 0.01, params["text_encoder"]))
  out = tmp_path_factory.mktemp("export") / "export"
  out.mkdir()
  (out / "stale.txt").write_text("from a killed export")
  single = tmp_path_factory.mktemp("single") / "model.safetensors"
  models.export_pipeline(components, params, str(out), fp16_variant=True,
                         single_file_path=str(single))
  return out, single, params


def test_a_single_file_without_config_uses_its_familys_architecture_and_tokenizer_beside(
    export, tmp_path, monkeypatch):
  """model.pretrained=<file> alone: the shipped architecture of the family its keys show (here
  a stand-in sd15.json of the tiny model's configs: the real one needs a 4 GB file) and the
  CLIP tokenizer folder placed beside the file as tokenizer/."""
  out, single, params = export
  shipped = tmp_path / "architectures"
  shipped.mkdir()
  (shipped / "sd15.json").write_text(json.dumps(pipeline.read_configs(str(out))))
  monkeypatch.setattr(single_file, "ARCHITECTURES_DIR", str(shipped))
  model_dir = tmp_path / "community"
  model_dir.mkdir()
  path = str(model_dir / "model.safetensors")
  shutil.copy(single, path)
  with pytest.raises(models.ModelLoadError, match=(
      f"^model.pretrained: {path} holds no tokenizer; put the model's CLIP tokenizer folder "
      rf"\(vocab.json, merges.txt\) beside it as {model_dir}/tokenizer$")):
    models.load_pretrained(path)
  shutil.copytree(out / "tokenizer", model_dir / "tokenizer")
  components, loaded = models.load_pretrained(path)
  assert components.configs["unet"] == pipeline.read_configs(str(out))["unet"]
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, np.float16(b).astype(np.float32)),
               loaded, params)
  assert components.tokenizer.encode("a photo of sks toy").tolist() == (
      models.load_tokenizer(str(out)).encode("a photo of sks toy").tolist())


def test_export_is_atomic_and_replaces_an_old_export(export):
  out, _, params = export
  assert sorted(os.listdir(out)) == ["model_index.json", "scheduler", "text_encoder",
                                     "tokenizer", "unet", "vae"]
  assert sorted(os.listdir(out / "unet")) == ["config.json",
                                              "diffusion_pytorch_model.fp16.safetensors",
                                              "diffusion_pytorch_model.safetensors"]
  assert not os.path.exists(str(out) + ".tmp") and not os.path.exists(str(out) + ".old")
  _, reloaded = models.load_pretrained(str(out))
  _flat_equal(reloaded, params)
  _, half = models.load_pretrained(str(out), variant="fp16")
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, np.float16(b).astype(np.float32)),
               half, params)


def test_export_loads_in_diffusers_with_a_plain_from_pretrained_and_samples_our_image(
    export, tiny):
  """StableDiffusionPipeline.from_pretrained(export) with no extra argument; from the same
  initial latents, its DDIM image equals our sampler's to 1e-3."""
  import diffusers  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  out, _, params = export
  components = tiny[0]
  torch_pipeline = diffusers.StableDiffusionPipeline.from_pretrained(str(out))
  assert type(torch_pipeline.scheduler).__name__ == "DDIMScheduler"
  state = torch_pipeline.unet.state_dict()
  np.testing.assert_array_equal(state["conv_in.weight"].numpy(),
                                weights.flax_to_torch(params["unet"], "unet")["conv_in.weight"])

  mesh = sharding.make_mesh(jax.devices()[:1])
  sampler = sampling.make_sampler(components, mesh, 32, "ddim", 3, guidance_scale=3.0,
                                  as_uint8=False)
  ids = components.tokenizer.encode([PROMPT])
  ours = np.asarray(sampler(params, ids, np.asarray([0]), 7))
  latents = np.asarray(sampling.initial_noise(sampling.image_keys(7, np.asarray([0])),
                                              (4, 16, 16)))
  theirs = torch_pipeline(PROMPT, num_inference_steps=3, guidance_scale=3.0, height=32,
                          width=32, latents=torch.from_numpy(latents),
                          output_type="np").images
  assert theirs.shape == ours.shape == (1, 32, 32, 3)
  np.testing.assert_allclose(ours, theirs, atol=1e-3)
  fp16 = diffusers.StableDiffusionPipeline.from_pretrained(str(out), variant="fp16",
                                                           torch_dtype=torch.float16)
  assert fp16.unet.conv_in.weight.dtype == torch.float16


def test_single_file_loads_in_diffusers_and_back_in_ours(export, tiny):
  """export.safetensors in the original layout: diffusers' from_single_file (ComfyUI and A1111
  read the same layout) gets every weight, and model.pretrained=<file> loads it."""
  import diffusers  # pylint: disable=g-import-not-at-top
  out, single, params = export
  torch_pipeline = diffusers.StableDiffusionPipeline.from_single_file(
      str(single), config=str(out), local_files_only=True)
  for name in ("unet", "vae", "text_encoder"):
    expected = weights.flax_to_torch(params[name], name)
    got = getattr(torch_pipeline, name).state_dict()
    for key, value in expected.items():
      np.testing.assert_array_equal(got[key].float().numpy(),
                                    np.float16(value).astype(np.float32), err_msg=key)
  _, loaded = models.load_pretrained(str(single), single_file_config=str(out))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, np.float16(b).astype(np.float32)),
               loaded, params)
  # Without a config folder the shipped SD 1.5 architecture is assumed: one line says why the
  # tiny file does not fit it.
  with pytest.raises(models.ModelLoadError, match=r"^model.pretrained: .*model.safetensors: "
                     r"the single file lacks .* which the unet config needs"):
    models.load_pretrained(str(single))
