"""Loading pipelines from what users have, and exports that the PyTorch world loads as they are.

Oracles: diffusers 0.39 and transformers 4.57 (PyTorch, CPU torch) from the test extra.
"""

import json
import os
import shutil
import types

import jax
import numpy as np
import pytest
import safetensors

from configs import tiny as tiny_config
from dreambooth_jax import models, sharding
from dreambooth_jax.models import pipeline, sampling, single_file, weights
from dreambooth_jax.training import checkpoints, step as train_step

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


def test_tiny_pipeline_takes_another_unet_for_benchmarks(tmp_path):
  channels = [32, 64, 64]
  directory = models.build_tiny_pipeline(
      str(tmp_path / "wider"), unet_overrides=dict(
          block_out_channels=channels, down_block_types=["CrossAttnDownBlock2D"] * 2
          + ["DownBlock2D"], up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 2))
  assert pipeline.read_configs(directory)["unet"]["block_out_channels"] == channels
  with safetensors.safe_open(os.path.join(directory, "unet", "diffusion_pytorch_model.safetensors"),
                             "np") as f:
    assert f.get_slice("down_blocks.2.resnets.0.conv1.weight").get_shape() == [64, 64, 3, 3]
    blocks = {".".join(key.split(".")[:3]) for key in f.keys() if key.startswith("down_blocks")}
  assert "down_blocks.1.attentions" in blocks and "down_blocks.2.attentions" not in blocks


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


def test_a_checkpoint_of_the_earlier_diffusers_flax_layer_restores(tmp_path, tiny):
  """Before our model layer (commit 23da177) the TrainState held diffusers 0.39's
  FlaxUNet2DConditionModel and transformers 4.57's FlaxCLIPTextModel parameter trees, with the
  same optimizer and state fields: such an Orbax checkpoint restores into today's state (laid
  out as train.py lays it out), every value as it was saved."""
  import diffusers  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  components, params = tiny
  key = jax.random.key(0)
  unet = diffusers.FlaxUNet2DConditionModel.from_config(
      pipeline.torch_config("unet", components.configs["unet"]))
  text = transformers.FlaxCLIPTextModel(transformers.CLIPTextConfig(
      **pipeline.torch_config("text_encoder", components.configs["text_encoder"])),
      _do_init=False)
  old_params = {"unet": jax.eval_shape(unet.init_weights, key),
                "text_encoder": jax.eval_shape(lambda k: text.init_weights(k, (1, 77)), key)}
  config = tiny_config.get_config().train
  config.train_text_encoder = True
  optimizer = train_step.make_optimizer(config)
  new_state = lambda p: train_step.create_train_state(p, optimizer, 0, True)
  # Every value of the old state drawn at random (in numpy: nothing to compile).
  rng = np.random.default_rng(0)
  old_state = jax.tree.map(
      lambda s: (rng.standard_normal(s.shape) if np.issubdtype(s.dtype, np.floating)
                 else rng.integers(1, 100, s.shape)).astype(s.dtype),
      jax.eval_shape(new_state, old_params))
  # Written as that code wrote it: the TrainState's own tree (today's packs the small leaves).
  manager = checkpoints.make_manager(str(tmp_path), max_to_keep=1)
  manager.save(int(old_state.step), args=checkpoints.ocp.args.StandardSave(old_state))
  manager.wait_until_finished()

  shapes = jax.eval_shape(new_state, params)
  mesh = sharding.make_mesh()
  target = jax.tree.map(lambda s, where: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=where),
                        shapes, sharding.state_shardings(shapes, mesh))
  restored = checkpoints.restore_latest(checkpoints.make_manager(str(tmp_path), 1), target)
  assert int(restored.step) == int(old_state.step)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b, strict=True),
               jax.device_get(restored), old_state)


_SHA = "0123456789abcdef0123456789abcdef01234567"


def _fake_hub(monkeypatch, tmp_path, repo_dir):
  """huggingface_hub's own snapshot_download over a repo that is a local folder: the listing
  and the file transfer are replaced, its filtering of allow_patterns is not. Returns the
  record of the calls: listed (repo, revision), fetched (file, revision)."""
  import huggingface_hub  # pylint: disable=g-import-not-at-top
  from huggingface_hub import _snapshot_download  # pylint: disable=g-import-not-at-top
  listing = sorted(os.path.relpath(os.path.join(root, name), repo_dir)
                   for root, _, names in os.walk(repo_dir) for name in names)
  calls = {"listed": [], "info": [], "fetched": []}

  def list_repo_files(repo_id, revision=None, **unused):
    calls["listed"].append((repo_id, revision))
    return listing

  def repo_info(self, repo_id, revision=None, **unused):
    calls["info"].append((repo_id, revision))
    return types.SimpleNamespace(sha=_SHA, siblings=[types.SimpleNamespace(rfilename=name)
                                                     for name in listing])

  def hf_hub_download(repo_id, filename, revision=None, cache_dir=None, **unused):
    calls["fetched"].append((filename, revision))
    path = os.path.join(cache_dir, "models--" + repo_id.replace("/", "--"), "snapshots",
                        revision, filename)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    shutil.copyfile(os.path.join(repo_dir, filename), path)
    return path

  monkeypatch.setattr(huggingface_hub, "list_repo_files", list_repo_files)
  monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", repo_info)
  monkeypatch.setattr(_snapshot_download, "hf_hub_download", hf_hub_download)
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub_cache"))
  return calls


def _add_files(repo_dir, names):
  for name in names:
    path = repo_dir / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"not to be downloaded")


# What SD 1.5's hub repo has beside the files a load needs: other formats and variants of each
# component, ONNX, the safety checker's weights, the original single files.
_EXTRA_FILES = [
    f"{component}/{name}" for component in ("unet", "vae")
    for name in ("diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.safetensors",
                 "diffusion_pytorch_model.fp16.bin", "diffusion_pytorch_model.non_ema.bin",
                 "diffusion_pytorch_model.non_ema.safetensors", "diffusion_flax_model.msgpack")
] + ["text_encoder/pytorch_model.bin", "text_encoder/model.fp16.safetensors",
     "text_encoder/flax_model.msgpack", "onnx/unet/model.onnx", "onnx/unet/weights.pb",
     "safety_checker/model.safetensors", "safety_checker/pytorch_model.bin",
     "v1-5-pruned-emaonly.safetensors", "v1-5-pruned.ckpt", "README.md", ".gitattributes"]


def test_a_hub_id_downloads_only_configs_tokenizer_and_one_weight_file_per_component(
    tmp_path, monkeypatch, tiny_dir, tiny):
  """model.pretrained=<hub id> with model.revision: the revision is what the hub is asked for,
  and of a repo like SD 1.5's only the configs, the tokenizer files and one weight file per
  component are fetched; they are enough to load the model."""
  repo = tmp_path / "repo"
  shutil.copytree(tiny_dir, repo)
  _add_files(repo, _EXTRA_FILES)
  (repo / "safety_checker" / "config.json").write_text("{}")
  (repo / "feature_extractor").mkdir()
  (repo / "feature_extractor" / "preprocessor_config.json").write_text("{}")
  calls = _fake_hub(monkeypatch, tmp_path, str(repo))
  config = tiny_config.get_config()
  config.model.pretrained, config.model.revision = "someone/tiny-sd", "v1.0"
  _, params = models.load_configured(config.model)
  assert calls["listed"] == [("someone/tiny-sd", "v1.0")]
  assert calls["info"] == [("someone/tiny-sd", "v1.0")]
  assert {revision for _, revision in calls["fetched"]} == {_SHA}  # what v1.0 resolved to
  assert sorted(name for name, _ in calls["fetched"]) == [
      "feature_extractor/preprocessor_config.json", "model_index.json",
      "safety_checker/config.json", "scheduler/scheduler_config.json",
      "text_encoder/config.json", "text_encoder/model.safetensors",
      "tokenizer/merges.txt", "tokenizer/special_tokens_map.json",
      "tokenizer/tokenizer_config.json", "tokenizer/vocab.json",
      "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
      "vae/config.json", "vae/diffusion_pytorch_model.safetensors"]
  _flat_equal(params, tiny[1])


def test_a_hub_variant_or_sharded_repo_downloads_one_weight_file_or_its_shards(
    tmp_path, monkeypatch):
  """model.variant=fp16: the .fp16 file (or its index and shards) and nothing of the float32
  ones; without a variant the float32 shards, and a .bin only where no safetensors exist."""
  repo = tmp_path / "repo"
  _add_files(repo, ["model_index.json", "unet/config.json", "vae/config.json",
                    "text_encoder/config.json", "tokenizer/vocab.json"] + [
      f"unet/diffusion_pytorch_model{variant}-0000{i}-of-00002.safetensors"
      for variant in ("", ".fp16") for i in (1, 2)] + [
      "unet/diffusion_pytorch_model.safetensors.index.json",
      "unet/diffusion_pytorch_model.safetensors.index.fp16.json",
      "unet/diffusion_pytorch_model.fp16.bin",
      "vae/diffusion_pytorch_model.bin", "vae/diffusion_pytorch_model.fp16.bin",
      "vae/diffusion_flax_model.msgpack", "text_encoder/model.safetensors",
      "text_encoder/model.fp16.safetensors", "text_encoder/pytorch_model.bin"])
  calls = _fake_hub(monkeypatch, tmp_path, str(repo))
  configs = ["model_index.json", "text_encoder/config.json", "tokenizer/vocab.json",
             "unet/config.json", "vae/config.json"]
  pipeline.download_from_hub("someone/big-sd", "main", "fp16")
  assert sorted(name for name, _ in calls["fetched"]) == sorted(configs + [
      "text_encoder/model.fp16.safetensors",
      "unet/diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
      "unet/diffusion_pytorch_model.fp16-00002-of-00002.safetensors",
      "unet/diffusion_pytorch_model.safetensors.index.fp16.json",
      "vae/diffusion_pytorch_model.fp16.bin"])
  calls["fetched"].clear()
  pipeline.download_from_hub("someone/big-sd", None)
  assert sorted(name for name, _ in calls["fetched"]) == sorted(configs + [
      "text_encoder/model.safetensors",
      "unet/diffusion_pytorch_model-00001-of-00002.safetensors",
      "unet/diffusion_pytorch_model-00002-of-00002.safetensors",
      "unet/diffusion_pytorch_model.safetensors.index.json",
      "vae/diffusion_pytorch_model.bin"])
  assert calls["listed"] == [("someone/big-sd", "main"), ("someone/big-sd", None)]


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
