"""Single-file (original LDM layout) checkpoints: diffusers' own from_single_file is the oracle.

Tiny random PyTorch models of each family are written with `write_single_file`; diffusers must
load that file (offline, configs from a local pipeline folder that holds no weights) into
exactly the weights we started from, and `read_single_file` must give them back bit for bit.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionPipeline,
                       StableDiffusionXLPipeline, UNet2DConditionModel)
from safetensors.torch import save_file as torch_save_file
from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection,
                          CLIPTokenizer)
from transformers.models.clip.tokenization_clip import bytes_to_unicode

from dreambooth_jax.models import single_file
from tests.models import tiny_configs as tiny

# diffusers tells SDXL's two text encoders apart in the file by their width (768 vs 1280 in the
# real model): with equal widths it would load CLIP-L's weights into text_encoder_2. So the
# OpenCLIP-bigG stand-in here is wider than the CLIP-L one (48 vs 32), and the UNet's context
# is their concatenation (32 + 48); the pooled projection stays 32 wide (projection_dim).
TEXT_SDXL_2 = dict(tiny.CLIP_TEXT_SDXL_2, hidden_size=48, intermediate_size=53)
UNET_SDXL = dict(tiny.UNET_SDXL, cross_attention_dim=32 + 48)

FAMILIES = {
    "sd1": dict(unet=tiny.UNET_SD1, vae=tiny.VAE, text_encoder=tiny.CLIP_TEXT_SD1,
                scheduler=tiny.SCHEDULER_EPS),
    "sd2": dict(unet=tiny.UNET_SD2, vae=tiny.VAE, text_encoder=tiny.CLIP_TEXT_SD2,
                scheduler=tiny.SCHEDULER_V),
    "sdxl": dict(unet=UNET_SDXL, vae=tiny.VAE_SDXL, text_encoder=tiny.CLIP_TEXT_SD1,
                 text_encoder_2=TEXT_SDXL_2, scheduler=tiny.SCHEDULER_EPS),
}


def _tokenizer(directory: str) -> CLIPTokenizer:
  """A byte-level CLIP BPE with no merges: 512 byte tokens and the two specials (< vocab 1000)."""
  byte_chars = list(bytes_to_unicode().values())
  vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["<|startoftext|>", "<|endoftext|>"]
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "vocab.json"), "w") as f:
    json.dump({token: i for i, token in enumerate(vocab)}, f)
  with open(os.path.join(directory, "merges.txt"), "w") as f:
    f.write("#version: 0.2\n")
  return CLIPTokenizer(os.path.join(directory, "vocab.json"),
                       os.path.join(directory, "merges.txt"))


def _randomized(model: torch.nn.Module, seed: int) -> torch.nn.Module:
  """Every tensor random, so no two weights (norm scales of ones, zero biases) coincide and a
  swapped mapping cannot pass unnoticed."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for value in model.state_dict().values():
      if value.is_floating_point():
        value.copy_(torch.randn(value.shape, generator=generator))
  return model.eval()


def _numpy_state(model: torch.nn.Module) -> dict[str, np.ndarray]:
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


class Case:
  """One family: its torch models, their numpy state dicts, configs and files on disk."""

  def __init__(self, family: str, directory: str):
    self.family = family
    spec = FAMILIES[family]
    self.configs = {k: v for k, v in spec.items() if k != "scheduler"}
    self.models = {"unet": _randomized(UNet2DConditionModel(**spec["unet"]), 1),
                   "vae": _randomized(AutoencoderKL(**spec["vae"]), 2),
                   "text_encoder": _randomized(CLIPTextModel(
                       CLIPTextConfig(**spec["text_encoder"])), 3)}
    if family == "sdxl":
      self.models["text_encoder_2"] = _randomized(CLIPTextModelWithProjection(
          CLIPTextConfig(**spec["text_encoder_2"])), 4)
    self.components = {k: _numpy_state(m) for k, m in self.models.items()}

    # The pipeline folder diffusers takes its configs from: weights removed, so that every
    # weight diffusers ends up with must have come from the single file.
    self.config_dir = os.path.join(directory, "pipeline")
    tokenizer = _tokenizer(os.path.join(directory, "tokenizer_files"))
    scheduler = DDIMScheduler(**spec["scheduler"])
    if family == "sdxl":
      pipeline = StableDiffusionXLPipeline(tokenizer=tokenizer, tokenizer_2=tokenizer,
                                           scheduler=scheduler, **self.models)
    else:
      pipeline = StableDiffusionPipeline(tokenizer=tokenizer, scheduler=scheduler,
                                         safety_checker=None, feature_extractor=None,
                                         requires_safety_checker=False, **self.models)
    pipeline.save_pretrained(self.config_dir)
    for root, _, files in os.walk(self.config_dir):
      for name in files:
        if name.endswith((".safetensors", ".bin")):
          os.remove(os.path.join(root, name))

    self.path = os.path.join(directory, f"{family}.safetensors")
    single_file.write_single_file(self.path, self.components, family, self.configs,
                                  dtype="float32")

  @property
  def text_configs(self) -> list[dict]:
    return [self.configs[k] for k in ("text_encoder", "text_encoder_2") if k in self.configs]

  def ldm_state(self) -> dict[str, np.ndarray]:
    return single_file.from_diffusers(self.components, self.family, self.configs["unet"],
                                      self.configs["vae"], self.text_configs)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def case(request, tmp_path_factory) -> Case:
  return Case(request.param, str(tmp_path_factory.mktemp(request.param)))


def _assert_same_states(got: dict[str, dict], want: dict[str, dict]) -> None:
  assert sorted(got) == sorted(want)
  for name in want:
    assert sorted(got[name]) == sorted(want[name]), name
    for key, value in want[name].items():
      np.testing.assert_array_equal(np.asarray(got[name][key]), value, err_msg=f"{name}.{key}")


def test_diffusers_from_single_file_loads_every_weight_exactly(case, monkeypatch):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  pipeline_class = (StableDiffusionXLPipeline if case.family == "sdxl"
                    else StableDiffusionPipeline)
  extra = {} if case.family == "sdxl" else dict(safety_checker=None, feature_extractor=None)
  pipeline = pipeline_class.from_single_file(case.path, config=case.config_dir,
                                             local_files_only=True, **extra)
  loaded = {name: _numpy_state(getattr(pipeline, name)) for name in case.components}
  _assert_same_states(loaded, case.components)


def test_read_single_file_gives_back_the_state_dicts(case):
  family, components = single_file.read_single_file(case.path, case.configs)
  assert family == case.family
  _assert_same_states(components, case.components)
  assert all(v.dtype == np.float32 for c in components.values() for v in c.values())


def test_ldm_layout_names(case):
  """Spot checks of the names ComfyUI/A1111 look for (the loaders' model-detection keys)."""
  state = case.ldm_state()
  assert single_file.detect_family(state) == case.family
  assert "model.diffusion_model.input_blocks.0.0.weight" in state
  assert state["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)
  if case.family == "sd1":
    assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in state
    np.testing.assert_array_equal(
        state["cond_stage_model.transformer.text_model.embeddings.position_ids"],
        np.arange(77)[None])
  elif case.family == "sd2":
    assert state["cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight"].shape == (
        96, 32)
    assert not any(k.startswith("cond_stage_model.model.transformer.resblocks.2.") for k in state)
  else:
    te2 = case.components["text_encoder_2"]
    np.testing.assert_array_equal(state["conditioner.embedders.1.model.text_projection"],
                                  te2["text_projection.weight"].T)  # [hidden 48, projection 32]
    np.testing.assert_array_equal(
        state["conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_bias"],
        np.concatenate([te2[f"text_model.encoder.layers.0.self_attn.{p}_proj.bias"]
                        for p in "qkv"]))
    np.testing.assert_array_equal(state["model.diffusion_model.label_emb.0.2.bias"],
                                  case.components["unet"]["add_embedding.linear_2.bias"])


def test_real_file_extras_are_ignored(case):
  """What full checkpoints carry besides the weights: EMA copies, schedule buffers, OpenCLIP's
  logit_scale, SD 2.x's 24th resblock (diffusers keeps 23, see from_diffusers) and projection."""
  state = case.ldm_state()
  state["model_ema.decay"] = np.float32(0.9999)
  state["model_ema.diffusion_modelinput_blocks00weight"] = np.zeros((1,), np.float32)
  state["alphas_cumprod"] = np.ones((1000,), np.float32)
  if case.family == "sd2":
    prefix = "cond_stage_model.model."
    for key in [k for k in state if k.startswith(prefix + "transformer.resblocks.1.")]:
      state[key.replace("resblocks.1.", "resblocks.2.")] = state[key] + 1
    state[prefix + "text_projection"] = np.ones((32, 32), np.float32)
    state[prefix + "logit_scale"] = np.float32(4.6)
  if case.family == "sdxl":
    state["conditioner.embedders.1.model.logit_scale"] = np.float32(4.6)
  got = single_file.to_diffusers(state, case.configs["unet"], case.configs["vae"],
                                 case.text_configs)
  _assert_same_states(got, case.components)


def test_float16_file(case, tmp_path):
  path = str(tmp_path / "half.safetensors")
  single_file.write_single_file(path, case.components, case.family, case.configs)
  assert all(v["dtype"] in ("F16", "I64") for k, v in _header(path).items()
             if k != "__metadata__")
  _, components = single_file.read_single_file(path, case.configs)
  _assert_same_states(components, {
      name: {k: v.astype(np.float16).astype(np.float32) for k, v in state.items()}
      for name, state in case.components.items()})


def test_bfloat16_file_reads_as_float32(case, tmp_path):
  path = str(tmp_path / "bf16.safetensors")
  torch_save_file({k: torch.from_numpy(np.ascontiguousarray(v)).to(torch.bfloat16)
                   if v.dtype == np.float32 else torch.from_numpy(v)
                   for k, v in case.ldm_state().items()}, path)
  _, components = single_file.read_single_file(path, case.configs)
  _assert_same_states(components, {
      name: {k: torch.from_numpy(v).to(torch.bfloat16).float().numpy() for k, v in state.items()}
      for name, state in case.components.items()})


def _header(path: str) -> dict:
  with open(path, "rb") as f:
    return json.loads(f.read(int.from_bytes(f.read(8), "little")))


# --------------------------------------------------------------------------------------------
# Refusals: each a one-line ValueError that names what was wrong.


def _one_line_error(function, *args) -> str:
  with pytest.raises(ValueError) as error:
    function(*args)
  message = str(error.value)
  assert "\n" not in message
  return message


def test_missing_key_is_named(case):
  state = case.ldm_state()
  for key in ("model.diffusion_model.output_blocks.2.0.skip_connection.weight",
              "first_stage_model.decoder.up.0.block.1.conv2.bias"):
    damaged = {k: v for k, v in state.items() if k != key}
    message = _one_line_error(single_file.to_diffusers, damaged, case.configs["unet"],
                              case.configs["vae"], case.text_configs)
    assert key in message


def test_config_of_another_architecture_is_refused(case):
  """A text config one layer short would silently drop a layer: refused instead."""
  text_configs = [dict(c, num_hidden_layers=1) for c in case.text_configs]
  if case.family == "sd2":  # one layer beyond the config is SD 2.x's unused 24th: two beyond
    text_configs = [dict(c, num_hidden_layers=0) for c in case.text_configs]
  message = _one_line_error(single_file.to_diffusers, case.ldm_state(), case.configs["unet"],
                            case.configs["vae"], text_configs)
  assert "do not fit" in message
  assert ("text_model.encoder.layers.1." in message
          or "model.transformer.resblocks.1." in message), message


def test_from_diffusers_refuses_incomplete_and_extra_components(case):
  components = {name: dict(state) for name, state in case.components.items()}
  del components["unet"]["conv_in.bias"]
  message = _one_line_error(single_file.from_diffusers, components, case.family,
                            case.configs["unet"], case.configs["vae"], case.text_configs)
  assert "'conv_in.bias'" in message
  components = {name: dict(state) for name, state in case.components.items()}
  components["vae"]["encoder.extra.weight"] = np.zeros(1, np.float32)
  message = _one_line_error(single_file.from_diffusers, components, case.family,
                            case.configs["unet"], case.configs["vae"], case.text_configs)
  assert "'encoder.extra.weight'" in message


@pytest.mark.parametrize("keys, named", [
    (["lora_unet_down_blocks_0_attentions_0_proj_in.alpha",
      "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight",
      "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"], "lora_te_text_model"),
    (["model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias",
      "text_encoders.clip_g.transformer.text_model.final_layer_norm.weight"], "joint_blocks"),
    ([], "0 keys"),
])
def test_not_stable_diffusion_is_refused(keys, named):
  message = _one_line_error(single_file.detect_family, keys)
  assert "not a Stable Diffusion" in message and named in message


def test_detect_family_edge_cases():
  unet_key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
  # A UNet without text encoder: the real models' context width decides, when shapes are known.
  for width, family in ((768, "sd1"), (1024, "sd2"), (2048, "sdxl")):
    assert single_file.detect_family({unet_key: np.zeros((320, width), np.float16)}) == family
  _one_line_error(single_file.detect_family, [unet_key])
  refiner = [unet_key, "conditioner.embedders.0.model.transformer.resblocks.0.ln_1.weight"]
  assert "refiner" in _one_line_error(single_file.detect_family, refiner)


def test_shipped_architectures_match_full_size_models():
  """The tables for the full-size SD 1.5 and 2.1 configs name exactly the parameters of the
  real-size diffusers/transformers models (built on the meta device: no memory, no weights)."""
  for family in ("sd1", "sd2"):
    configs = single_file.architecture_configs(family)
    with torch.device("meta"):
      models = {"unet": UNet2DConditionModel.from_config(configs["unet"]),
                "vae": AutoencoderKL.from_config(configs["vae"]),
                "text_encoder": CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))}
    # from_diffusers needs every name its tables list and refuses any other: the key sets of
    # tables and models are equal.
    components = {name: {k: np.zeros((1,), np.float32) for k in m.state_dict()}
                  for name, m in models.items()}
    ldm = single_file.from_diffusers(components, family, configs["unet"], configs["vae"],
                                     [configs["text_encoder"]])
    # The keys diffusers itself probes to recognise each family (single_file_utils).
    probe = {"sd1": "model.diffusion_model.output_blocks.11.0.skip_connection.weight",
             "sd2": "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight"}
    assert probe[family] in ldm
    assert single_file.detect_family(ldm) == family
