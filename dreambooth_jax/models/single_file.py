"""Single-file Stable Diffusion checkpoints in the original (CompVis/Stability "LDM") key layout.

ComfyUI, A1111 and Forge share models as one .safetensors file whose keys follow the original
training code (`model.diffusion_model.input_blocks.1.1...`, `first_stage_model.encoder...`,
`cond_stage_model...` or, for SDXL, `conditioner.embedders.N...`). This module converts such a
file to per-component state dicts in diffusers/transformers PyTorch naming (what
`UNet2DConditionModel.state_dict()`, `AutoencoderKL.state_dict()` and `CLIPTextModel.state_dict()`
hold) and back, on plain numpy arrays.

The key tables are generated from the components' diffusers config.json dicts rather than by
scanning the file, so a converted model always has exactly the tensors its config asks for: a
tensor the config needs and the file lacks is an error naming it, and tensors the file holds in a
component's namespace that the config has no place for are an error too (they mean the config
describes another architecture), while whole other namespaces (EMA copies, training buffers) are
ignored.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from dreambooth_jax.models import weights

FAMILIES = ("sd1", "sd2", "sdxl")

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
# CLIP ViT-L/14 is stored in transformers naming under these prefixes, OpenCLIP towers (ViT-H in
# SD 2.x, ViT-bigG as SDXL's second encoder) in open_clip's own naming under the others.
_CLIP_L_PREFIX = {"sd1": "cond_stage_model.transformer.",
                  "sdxl": "conditioner.embedders.0.transformer."}
_OPEN_CLIP_PREFIX = {"sd2": "cond_stage_model.model.", "sdxl": "conditioner.embedders.1.model."}
_TEXT_ENCODER_NAMES = ("text_encoder", "text_encoder_2")
ARCHITECTURES_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "architectures")

_SUPPORTED_DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
_SUPPORTED_UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")


# --------------------------------------------------------------------------------------------
# Key tables.


@dataclasses.dataclass(frozen=True)
class _Rename:
  """One tensor under its diffusers name and its LDM name.

  layout: "same"; "conv1x1" (LDM keeps a 1x1 conv [C, C, 1, 1] where diffusers has a Linear
  [C, C]: the VAE's mid attention); "transposed" (OpenCLIP's text_projection multiplies from the
  right, a torch Linear from the left).
  """
  diffusers: str
  ldm: str
  layout: str = "same"


@dataclasses.dataclass(frozen=True)
class _FusedQKV:
  """OpenCLIP's attention packs q, k and v along the output axis of one in_proj tensor."""
  diffusers: tuple[str, str, str]
  ldm: str


@dataclasses.dataclass(frozen=True)
class _Component:
  """One model of the pipeline: its rules and the file namespaces that belong to it."""
  name: str
  rules: list
  ldm_prefixes: tuple[str, ...]
  # LDM keys inside ldm_prefixes that carry nothing the diffusers model has (and so are skipped
  # on reading rather than refused).
  unused_ldm: tuple[str, ...] = ()
  # Non-parameter tensors written along with the weights for loaders that expect them.
  buffers: dict = dataclasses.field(default_factory=dict)


def _weight_and_bias(diffusers: str, ldm: str) -> list[_Rename]:
  return [_Rename(f"{diffusers}.{p}", f"{ldm}.{p}") for p in ("weight", "bias")]


def _as_list(value: Any, length: int) -> list:
  return list(value) if isinstance(value, (list, tuple)) else [value] * length


def _unet_resnet(diffusers: str, ldm: str, has_shortcut: bool) -> list[_Rename]:
  """diffusers' ResnetBlock2D vs LDM's ResBlock (Sequential in_layers/emb_layers/out_layers)."""
  parts = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
           ("norm2", "out_layers.0"), ("conv2", "out_layers.3")]
  if has_shortcut:
    parts.append(("conv_shortcut", "skip_connection"))
  return [r for d, l in parts for r in _weight_and_bias(f"{diffusers}.{d}", f"{ldm}.{l}")]


def _spatial_transformer(diffusers: str, ldm: str, depth: int) -> list[_Rename]:
  """Transformer2DModel and LDM's SpatialTransformer name their parameters alike."""
  leaves = [f"{m}.{p}" for m in ("norm", "proj_in", "proj_out") for p in ("weight", "bias")]
  for block in range(depth):
    b = f"transformer_blocks.{block}"
    for m in ("norm1", "norm2", "norm3", "attn1.to_out.0", "attn2.to_out.0", "ff.net.0.proj",
              "ff.net.2"):
      leaves += [f"{b}.{m}.weight", f"{b}.{m}.bias"]
    leaves += [f"{b}.{a}.{p}.weight" for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v")]
  return [_Rename(f"{diffusers}.{leaf}", f"{ldm}.{leaf}") for leaf in leaves]


def _unet_rules(config: Mapping[str, Any]) -> list[_Rename]:
  """The UNet2DConditionModel <-> openaimodel.UNetModel table.

  LDM numbers the down path as one flat list `input_blocks` (0 is conv_in, then every resnet,
  with its attention at sub-index 1, and every downsampler) and the up path as `output_blocks`
  (each resnet with its attention at 1 and the upsampler after it).
  """
  _check_unet_config(config)
  down_types = list(config["down_block_types"])
  up_types = list(config["up_block_types"])
  channels = list(config.get("block_out_channels", (320, 640, 1280, 1280)))
  n = len(down_types)
  layers = _as_list(config.get("layers_per_block", 2), n)
  depths = _as_list(config.get("transformer_layers_per_block", 1), n)
  up_depths = config.get("reverse_transformer_layers_per_block") or list(reversed(depths))

  rules = []
  for d, l in (("time_embedding.linear_1", "time_embed.0"),
               ("time_embedding.linear_2", "time_embed.2"), ("conv_in", "input_blocks.0.0"),
               ("conv_norm_out", "out.0"), ("conv_out", "out.2")):
    rules += _weight_and_bias(d, l)
  if config.get("addition_embed_type") == "text_time":
    rules += _weight_and_bias("add_embedding.linear_1", "label_emb.0.0")
    rules += _weight_and_bias("add_embedding.linear_2", "label_emb.0.2")

  ldm_block = 1
  out_channels = channels[0]
  for i, block_type in enumerate(down_types):
    in_channels, out_channels = out_channels, channels[i]
    block_depths = _as_list(depths[i], layers[i])
    for j in range(layers[i]):
      resnet_in = in_channels if j == 0 else out_channels
      rules += _unet_resnet(f"down_blocks.{i}.resnets.{j}", f"input_blocks.{ldm_block}.0",
                            resnet_in != out_channels)
      if block_type == "CrossAttnDownBlock2D":
        rules += _spatial_transformer(f"down_blocks.{i}.attentions.{j}",
                                      f"input_blocks.{ldm_block}.1", block_depths[j])
      ldm_block += 1
    if i < n - 1:
      rules += _weight_and_bias(f"down_blocks.{i}.downsamplers.0.conv",
                                f"input_blocks.{ldm_block}.0.op")
      ldm_block += 1

  rules += _unet_resnet("mid_block.resnets.0", "middle_block.0", False)
  rules += _spatial_transformer("mid_block.attentions.0", "middle_block.1",
                                _as_list(depths[-1], 1)[0])
  rules += _unet_resnet("mid_block.resnets.1", "middle_block.2", False)

  reversed_channels = list(reversed(channels))
  reversed_layers = list(reversed(layers))
  ldm_block = 0
  out_channels = reversed_channels[0]
  for i, block_type in enumerate(up_types):
    prev_channels, out_channels = out_channels, reversed_channels[i]
    skip_channels = reversed_channels[min(i + 1, n - 1)]
    num_layers = reversed_layers[i] + 1
    block_depths = _as_list(up_depths[i], num_layers)
    has_attention = block_type == "CrossAttnUpBlock2D"
    for j in range(num_layers):
      resnet_in = (prev_channels if j == 0 else out_channels) + (
          skip_channels if j == num_layers - 1 else out_channels)
      rules += _unet_resnet(f"up_blocks.{i}.resnets.{j}", f"output_blocks.{ldm_block}.0",
                            resnet_in != out_channels)
      if has_attention:
        rules += _spatial_transformer(f"up_blocks.{i}.attentions.{j}",
                                      f"output_blocks.{ldm_block}.1", block_depths[j])
      if j == num_layers - 1 and i < n - 1:
        rules += _weight_and_bias(f"up_blocks.{i}.upsamplers.0.conv",
                                  f"output_blocks.{ldm_block}.{2 if has_attention else 1}.conv")
      ldm_block += 1
  return rules


def _check_unet_config(config: Mapping[str, Any]) -> None:
  """Refuses the UNet variants whose LDM layout this table does not describe."""
  problems = [f"down block {t!r}" for t in config["down_block_types"]
              if t not in _SUPPORTED_DOWN_BLOCKS]
  problems += [f"up block {t!r}" for t in config["up_block_types"]
               if t not in _SUPPORTED_UP_BLOCKS]
  if config.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn":
    problems.append(f"mid_block_type {config['mid_block_type']!r}")
  if config.get("addition_embed_type") not in (None, "text_time"):
    problems.append(f"addition_embed_type {config['addition_embed_type']!r}")
  for field in ("class_embed_type", "num_class_embeds", "encoder_hid_dim", "time_cond_proj_dim"):
    if config.get(field) is not None:
      problems.append(f"{field} {config[field]!r}")
  if problems:
    raise ValueError(f"unsupported UNet config for the single-file layout: {', '.join(problems)}")


def _vae_resnet(diffusers: str, ldm: str, has_shortcut: bool) -> list[_Rename]:
  parts = [("norm1", "norm1"), ("conv1", "conv1"), ("norm2", "norm2"), ("conv2", "conv2")]
  if has_shortcut:
    parts.append(("conv_shortcut", "nin_shortcut"))
  return [r for d, l in parts for r in _weight_and_bias(f"{diffusers}.{d}", f"{ldm}.{l}")]


def _vae_mid_block(side: str) -> list[_Rename]:
  rules = _vae_resnet(f"{side}.mid_block.resnets.0", f"{side}.mid.block_1", False)
  rules += _vae_resnet(f"{side}.mid_block.resnets.1", f"{side}.mid.block_2", False)
  attention, ldm = f"{side}.mid_block.attentions.0", f"{side}.mid.attn_1"
  rules += _weight_and_bias(f"{attention}.group_norm", f"{ldm}.norm")
  for d, l in (("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")):
    rules += [_Rename(f"{attention}.{d}.weight", f"{ldm}.{l}.weight", "conv1x1"),
              _Rename(f"{attention}.{d}.bias", f"{ldm}.{l}.bias")]
  return rules


def _vae_rules(config: Mapping[str, Any]) -> list[_Rename]:
  """AutoencoderKL <-> LDM's AutoencoderKL; the decoder's `up` list runs lowest resolution last."""
  channels = list(config.get("block_out_channels", (64,)))
  layers = config.get("layers_per_block", 1)
  n = len(channels)
  rules = []
  for side in ("encoder", "decoder"):
    for d, l in (("conv_in", "conv_in"), ("conv_norm_out", "norm_out"), ("conv_out", "conv_out")):
      rules += _weight_and_bias(f"{side}.{d}", f"{side}.{l}")
    rules += _vae_mid_block(side)
  out_channels = channels[0]
  for i in range(n):
    in_channels, out_channels = out_channels, channels[i]
    for j in range(layers):
      rules += _vae_resnet(f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}",
                           (in_channels if j == 0 else out_channels) != out_channels)
    if i < n - 1:
      rules += _weight_and_bias(f"encoder.down_blocks.{i}.downsamplers.0.conv",
                                f"encoder.down.{i}.downsample.conv")
  reversed_channels = list(reversed(channels))
  out_channels = reversed_channels[0]
  for i in range(n):
    in_channels, out_channels = out_channels, reversed_channels[i]
    ldm_level = n - 1 - i
    for j in range(layers + 1):
      rules += _vae_resnet(f"decoder.up_blocks.{i}.resnets.{j}",
                           f"decoder.up.{ldm_level}.block.{j}",
                           (in_channels if j == 0 else out_channels) != out_channels)
    if i < n - 1:
      rules += _weight_and_bias(f"decoder.up_blocks.{i}.upsamplers.0.conv",
                                f"decoder.up.{ldm_level}.upsample.conv")
  if config.get("use_quant_conv", True):
    rules += _weight_and_bias("quant_conv", "quant_conv")
  if config.get("use_post_quant_conv", True):
    rules += _weight_and_bias("post_quant_conv", "post_quant_conv")
  return rules


_CLIP_LAYER_MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                       "self_attn.out_proj", "layer_norm1", "mlp.fc1", "mlp.fc2", "layer_norm2")


def _clip_names(config: Mapping[str, Any], with_projection: bool) -> list[str]:
  """The parameter names of transformers' CLIPTextModel(WithProjection)."""
  names = ["text_model.embeddings.token_embedding.weight",
           "text_model.embeddings.position_embedding.weight"]
  for layer in range(config.get("num_hidden_layers", 12)):
    names += [f"text_model.encoder.layers.{layer}.{m}.{p}" for m in _CLIP_LAYER_MODULES
              for p in ("weight", "bias")]
  names += ["text_model.final_layer_norm.weight", "text_model.final_layer_norm.bias"]
  if with_projection:
    names.append("text_projection.weight")
  return names


def _clip_l_component(name: str, config: Mapping[str, Any], prefix: str) -> _Component:
  """CLIP ViT-L sits in the file in transformers naming, only prefixed."""
  rules = [_Rename(k, prefix + k) for k in _clip_names(config, with_projection=False)]
  position_ids = np.arange(config.get("max_position_embeddings", 77), dtype=np.int64)[None]
  return _Component(name, rules, (prefix,),
                    unused_ldm=(f"{prefix}text_model.embeddings.position_ids",
                                f"{prefix}text_projection.weight", f"{prefix}logit_scale"),
                    buffers={f"{prefix}text_model.embeddings.position_ids": position_ids})


def _open_clip_component(name: str, config: Mapping[str, Any], prefix: str,
                         with_projection: bool, dropped_layer: bool) -> _Component:
  """An OpenCLIP text tower (open_clip's own naming) as a transformers CLIPTextModel.

  dropped_layer: SD 2.x conditions on the penultimate layer, so diffusers' text encoder stops one
  resblock short of the file's; that last resblock (and the unused projection) are skipped.
  """
  rules = [_Rename("text_model.embeddings.token_embedding.weight",
                   f"{prefix}token_embedding.weight"),
           _Rename("text_model.embeddings.position_embedding.weight",
                   f"{prefix}positional_embedding")]
  num_layers = config.get("num_hidden_layers", 12)
  for layer in range(num_layers):
    d, l = f"text_model.encoder.layers.{layer}", f"{prefix}transformer.resblocks.{layer}"
    for dm, lm in (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"),
                   ("mlp.fc2", "mlp.c_proj"), ("self_attn.out_proj", "attn.out_proj")):
      rules += _weight_and_bias(f"{d}.{dm}", f"{l}.{lm}")
    for p in ("weight", "bias"):
      rules.append(_FusedQKV(tuple(f"{d}.self_attn.{q}_proj.{p}" for q in "qkv"),
                             f"{l}.attn.in_proj_{p}"))
  rules += _weight_and_bias("text_model.final_layer_norm", f"{prefix}ln_final")
  unused = [f"{prefix}logit_scale", f"{prefix}attn_mask"]
  if with_projection:
    rules.append(_Rename("text_projection.weight", f"{prefix}text_projection", "transposed"))
  else:
    unused.append(f"{prefix}text_projection")
  if dropped_layer:
    unused.append(f"{prefix}transformer.resblocks.{num_layers}.")
  return _Component(name, rules, (prefix,), unused_ldm=tuple(unused))


def _prefixed(rules: list[_Rename], prefix: str) -> list[_Rename]:
  return [dataclasses.replace(r, ldm=prefix + r.ldm) for r in rules]


def _components(family: str, unet_config: Mapping[str, Any], vae_config: Mapping[str, Any],
                text_configs: Sequence[Mapping[str, Any]]) -> list[_Component]:
  if family not in FAMILIES:
    raise ValueError(f"unknown family {family!r}; expected one of {', '.join(FAMILIES)}")
  expected_text = 2 if family == "sdxl" else 1
  if len(text_configs) != expected_text:
    raise ValueError(f"{family} has {expected_text} text encoder(s); got {len(text_configs)} "
                     "text configs")
  components = [
      _Component("unet", _prefixed(_unet_rules(unet_config), UNET_PREFIX), (UNET_PREFIX,)),
      _Component("vae", _prefixed(_vae_rules(vae_config), VAE_PREFIX),
                 tuple(VAE_PREFIX + p for p in ("encoder.", "decoder.", "quant_conv.",
                                                "post_quant_conv."))),
  ]
  if family == "sd1":
    components.append(_clip_l_component("text_encoder", text_configs[0], _CLIP_L_PREFIX["sd1"]))
  elif family == "sd2":
    components.append(_open_clip_component("text_encoder", text_configs[0],
                                           _OPEN_CLIP_PREFIX["sd2"], with_projection=False,
                                           dropped_layer=True))
  else:
    components.append(_clip_l_component("text_encoder", text_configs[0], _CLIP_L_PREFIX["sdxl"]))
    components.append(_open_clip_component("text_encoder_2", text_configs[1],
                                           _OPEN_CLIP_PREFIX["sdxl"], with_projection=True,
                                           dropped_layer=False))
  return components


# --------------------------------------------------------------------------------------------
# Conversions.


def detect_family(keys: Iterable[str] | Mapping[str, Any]) -> str:
  """The family ("sd1", "sd2" or "sdxl") of a single file, from its keys (a dict of arrays also
  lends its shapes).

  The text encoders tell the families apart: CLIP-L alone is SD 1.x, OpenCLIP ViT-H SD 2.x, the
  `conditioner.embedders` pair SDXL. A file without text encoder falls back on the UNet's
  cross-attention width, which only the full-size models pin down.
  """
  shapes = keys if isinstance(keys, Mapping) else None
  names = list(keys)

  def has(prefix: str) -> bool:
    return any(k.startswith(prefix) for k in names)

  if not has(UNET_PREFIX + "input_blocks."):
    sample = ", ".join(repr(k) for k in sorted(names)[:3])
    raise ValueError("not a Stable Diffusion 1.x/2.x/XL single-file checkpoint (no "
                     f"{UNET_PREFIX}input_blocks.* keys); it has {len(names)} keys such as "
                     f"{sample or 'none'}")
  if has("conditioner.embedders."):
    if has(_CLIP_L_PREFIX["sdxl"]) and has(_OPEN_CLIP_PREFIX["sdxl"]):
      return "sdxl"
    raise ValueError("unsupported SGM-style checkpoint: conditioner.embedders without SDXL's "
                     "CLIP-L + OpenCLIP-bigG pair (an SDXL refiner, or SD 2.x in SGM layout?)")
  if has(_OPEN_CLIP_PREFIX["sd2"]):
    return "sd2"
  if has(_CLIP_L_PREFIX["sd1"]):
    return "sd1"
  context_to_family = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
  if shapes is not None:
    for k in names:
      if k.startswith(UNET_PREFIX) and k.endswith(".attn2.to_k.weight"):
        context = int(np.shape(shapes[k])[-1])
        if context in context_to_family:
          return context_to_family[context]
        raise ValueError(f"a UNet without text encoder and a context width of {context}: cannot "
                         "tell SD 1.x, 2.x and XL apart")
  raise ValueError("a UNet without text encoder: cannot tell SD 1.x, 2.x and XL apart from its "
                   "keys alone")


def _take(state: Mapping[str, np.ndarray], key: str, component: str, family: str) -> np.ndarray:
  if key not in state:
    raise ValueError(f"the single file lacks {key!r}, which the {component} config needs (is it "
                     f"really an {family} checkpoint with this architecture?)")
  return np.asarray(state[key])


def _rule_diffusers_keys(rule: _Rename | _FusedQKV) -> tuple[str, ...]:
  return rule.diffusers if isinstance(rule, _FusedQKV) else (rule.diffusers,)


def to_diffusers(ldm_state: Mapping[str, np.ndarray], unet_config: Mapping[str, Any],
                 vae_config: Mapping[str, Any], text_configs: Sequence[Mapping[str, Any]],
                 family: str | None = None) -> dict[str, dict[str, np.ndarray]]:
  """Splits a single-file state dict into diffusers/transformers component state dicts.

  Returns {"unet", "vae", "text_encoder"[, "text_encoder_2"]}, each keyed by PyTorch parameter
  name. Arrays keep their dtype; renamed tensors are the file's own arrays (no copy).
  """
  family = family or detect_family(ldm_state)
  out = {}
  for component in _components(family, unet_config, vae_config, text_configs):
    state = {}
    used = set()
    for rule in component.rules:
      value = _take(ldm_state, rule.ldm, component.name, family)
      used.add(rule.ldm)
      if isinstance(rule, _FusedQKV):
        if value.shape[0] % 3:
          raise ValueError(f"{rule.ldm!r} has shape {value.shape}: not three stacked projections")
        for key, part in zip(rule.diffusers, np.split(value, 3, axis=0)):
          state[key] = part
      elif rule.layout == "conv1x1":
        state[rule.diffusers] = value.reshape(value.shape[:2]) if value.ndim == 4 else value
      elif rule.layout == "transposed":
        state[rule.diffusers] = value.T
      else:
        state[rule.diffusers] = value
    _refuse_leftovers(ldm_state, used, component)
    out[component.name] = state
  return out


def _refuse_leftovers(ldm_state: Mapping[str, np.ndarray], used: set[str],
                      component: _Component) -> None:
  """Tensors in a component's namespace that its config has no place for mean a wrong config."""
  leftovers = sorted(
      k for k in ldm_state
      if k not in used and k.startswith(component.ldm_prefixes)
      and not any(k == u or (u.endswith(".") and k.startswith(u)) for u in component.unused_ldm))
  if leftovers:
    raise ValueError(f"{len(leftovers)} tensor(s) of the single file's {component.name} do not fit "
                     f"its config, e.g. {leftovers[0]!r} (config of another architecture?)")


def from_diffusers(components: Mapping[str, Mapping[str, np.ndarray]], family: str,
                   unet_config: Mapping[str, Any], vae_config: Mapping[str, Any],
                   text_configs: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
  """The single-file (LDM) state dict of diffusers/transformers component state dicts.

  Written the way ComfyUI and A1111 expect: OpenCLIP q/k/v re-fused into in_proj, its text
  projection as the [hidden, projection] matrix open_clip multiplies by, the VAE's mid
  attention as 1x1 convs, CLIP-L's position_ids buffer included. An SD 2.x file gets the 23
  resblocks diffusers keeps (the 24th, unused by SD 2.x's penultimate-layer conditioning, is
  absent; diffusers and ComfyUI load such files, ComfyUI noting the missing keys).
  """
  out = {}
  for component in _components(family, unet_config, vae_config, text_configs):
    if component.name not in components:
      raise ValueError(f"no {component.name!r} state dict among the components "
                       f"({', '.join(components) or 'none'})")
    state = components[component.name]
    used = set()
    for rule in component.rules:
      keys = _rule_diffusers_keys(rule)
      for key in keys:
        if key not in state:
          raise ValueError(f"the {component.name} state dict lacks {key!r}, which its config "
                           "needs")
      used.update(keys)
      values = [np.asarray(state[k]) for k in keys]
      if isinstance(rule, _FusedQKV):
        out[rule.ldm] = np.concatenate(values, axis=0)
      elif rule.layout == "conv1x1":
        out[rule.ldm] = values[0].reshape(values[0].shape + (1,) * (4 - values[0].ndim))
      elif rule.layout == "transposed":
        out[rule.ldm] = values[0].T
      else:
        out[rule.ldm] = values[0]
    extra = sorted(k for k in state if k not in used and not k.endswith("position_ids"))
    if extra:
      raise ValueError(f"the {component.name} state dict has {len(extra)} tensor(s) the {family} "
                       f"single-file layout has no place for, e.g. {extra[0]!r}")
    out.update(component.buffers)
  return out


# --------------------------------------------------------------------------------------------
# Files.


# Each family's shipped full-size architecture (dreambooth_jax/architectures/<name>.json).
FAMILY_ARCHITECTURES = {"sd1": "sd15", "sd2": "sd21"}


def architecture_configs(family: str) -> dict[str, dict[str, Any]]:
  """The full-size configs the project ships for a family (dreambooth_jax/architectures)."""
  if family not in FAMILY_ARCHITECTURES:
    raise ValueError(f"no shipped architecture for {family!r}: pass the unet, vae and text "
                     "encoder configs explicitly")
  return shipped_architecture(FAMILY_ARCHITECTURES[family])


def shipped_architecture(name: str) -> dict[str, dict[str, Any]]:
  """{unet, vae, text_encoder, scheduler} configs of a shipped architecture (sd15, sd21)."""
  path = os.path.join(ARCHITECTURES_DIR, f"{name}.json")
  if not os.path.isfile(path):
    shipped = sorted(f[:-5] for f in os.listdir(ARCHITECTURES_DIR) if f.endswith(".json"))
    raise ValueError(f"unknown architecture {name!r}; shipped: {', '.join(shipped)}")
  with open(path) as f:
    return json.load(f)


def _text_configs(configs: Mapping[str, Any], family: str) -> list[Mapping[str, Any]]:
  names = _TEXT_ENCODER_NAMES[:2 if family == "sdxl" else 1]
  missing = [n for n in names if n not in configs]
  if missing:
    raise ValueError(f"{family} needs configs for {', '.join(names)}; missing {', '.join(missing)}")
  return [configs[n] for n in names]


load_safetensors = weights.load_safetensors  # fp16/bf16 read as float32


def read_single_file(path: str, configs: Mapping[str, Mapping[str, Any]] | None = None
                     ) -> tuple[str, dict[str, dict[str, np.ndarray]]]:
  """(family, component state dicts) of a single-file checkpoint, in float32.

  configs: {"unet", "vae", "text_encoder"[, "text_encoder_2"]: diffusers config dicts}; by
  default the shipped full-size SD 1.5 / SD 2.1 architectures (SDXL needs them passed).
  """
  state = load_safetensors(path)
  family = detect_family(state)
  configs = configs if configs is not None else architecture_configs(family)
  return family, to_diffusers(state, configs["unet"], configs["vae"],
                              _text_configs(configs, family), family)


def write_single_file(path: str, components: Mapping[str, Mapping[str, np.ndarray]], family: str,
                      configs: Mapping[str, Mapping[str, Any]], dtype: str = "float16") -> None:
  """Writes components as one LDM-layout .safetensors file, whole or not at all.

  dtype ("float16" or "float32") applies to the floating point tensors; the file goes to a
  temporary name first and is renamed over `path`, so a crash never leaves a torn file.
  """
  if dtype not in ("float16", "float32"):
    raise ValueError(f"dtype must be 'float16' or 'float32', not {dtype!r}")
  state = from_diffusers(components, family, configs["unet"], configs["vae"],
                         _text_configs(configs, family))
  weights.save_safetensors(path, state, dtype)
