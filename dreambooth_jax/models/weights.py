"""PyTorch-layout (diffusers / transformers) weight files <-> our Flax parameter trees.

Hub repos and today's `save_pretrained` publish safetensors whose names and layouts follow the
PyTorch modules (`down_blocks.0.resnets.0.conv1.weight`, OIHW kernels, [out, in] linear
weights). Our Flax trees are those of diffusers' and transformers' Flax classes
(`down_blocks_0/resnets_0/conv1/kernel`, HWIO, [in, out]). This module maps one onto the other
with numpy and safetensors only, so loading a hub model or exporting one needs no torch.

The converter is driven by a reference tree of shapes (e.g. `jax.eval_shape` of the module's
init): every Flax leaf names the PyTorch key it must come from, so a missing, unexpected or
misshapen tensor is reported by name instead of surfacing later as a wrong picture.
"""

from __future__ import annotations

import itertools
import json
import os
import re
from collections.abc import Mapping
from typing import Any, Callable

# numpy learns the name "bfloat16" only once ml_dtypes is imported; safetensors' numpy backend
# (0.4 to 0.8 alike) needs that name to read or write BF16 tensors.
import ml_dtypes
import numpy as np
from flax import traverse_util
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file as _safetensors_save_file

from dreambooth_jax.errors import WeightsError

COMPONENTS = ("unet", "vae", "text_encoder")

# Weight files per component, in order of preference: what diffusers / transformers write.
WEIGHT_FILES = {
    "unet": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
    "vae": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
    "text_encoder": ("model.safetensors", "pytorch_model.bin"),
}

# Flax module names that PyTorch spells differently: Flax name -> today's PyTorch name, then
# older spellings still accepted on read. FlaxAutoencoderKL's mid-block attention kept the names
# of diffusers' old AttentionBlock, which is also how older hub repos (SD 1.5's original one)
# store it; today's diffusers writes the names of its shared Attention class.
_RENAMED = {
    "unet": {},
    "vae": {
        "query": ("to_q", "query"),
        "key": ("to_k", "key"),
        "value": ("to_v", "value"),
        "proj_attn": ("to_out.0", "proj_attn"),
    },
    "text_encoder": {},
    "plain": {},  # a transformers model with no renamed modules (the evaluation networks)
}
# Flax names ending in `_N` that are not entries of a PyTorch ModuleList but attribute names
# in both frameworks (diffusers' TimestepEmbedding, also SDXL's add_embedding).
_KEPT = {"unet": frozenset({"linear_1", "linear_2"}), "vae": frozenset(),
         "text_encoder": frozenset(), "plain": frozenset()}
# Buffers that some PyTorch files carry and Flax computes instead (transformers' CLIP
# position ids, saved by releases before they became non-persistent).
_IGNORED_SUFFIXES = (".position_ids",)

_LIST_ENTRY = re.compile(r"^(.*\D)_(\d+)$")  # Flax's name_N for PyTorch's name.N
_FLAX_TO_TORCH_LEAF = {"kernel": "weight", "scale": "weight", "embedding": "weight",
                       "bias": "bias"}
_SAVE_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


# ----------------------------------------------------------------------------------------------
# Names and layouts.


def _check_component(component: str) -> None:
  if component not in _RENAMED:
    raise ValueError(f"unknown component {component!r}; choose one of {', '.join(COMPONENTS)}")


def _torch_names(flax_path: tuple[str, ...], component: str | None) -> list[str]:
  """PyTorch keys a Flax leaf may be stored under: today's name first, then older spellings.

  With no component, every component's renames apply: they never collide (only the VAE has
  `query`, only the UNet `linear_1`).
  """
  components = COMPONENTS if component is None else (component,)
  renamed = {k: v for c in components for k, v in _RENAMED[c].items()}
  kept = frozenset().union(*(_KEPT[c] for c in components))
  *modules, leaf = flax_path
  spellings = []
  for name in modules:
    if name in renamed:
      spellings.append(renamed[name])
    elif name not in kept and (match := _LIST_ENTRY.match(name)):
      spellings.append((f"{match[1]}.{match[2]}",))
    else:
      spellings.append((name,))  # includes transformers' "0", "1" layer names
  # A raw parameter (ViT's cls_token, CLIP's class_embedding) keeps its own name.
  return [".".join(parts + (_FLAX_TO_TORCH_LEAF.get(leaf, leaf),))
          for parts in itertools.product(*spellings)]


def _torch_shape(leaf: str, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
  if leaf == "kernel" and len(flax_shape) == 4:  # HWIO -> OIHW
    return (flax_shape[3], flax_shape[2], flax_shape[0], flax_shape[1])
  if leaf == "kernel" and len(flax_shape) == 2:  # [in, out] -> [out, in]
    return (flax_shape[1], flax_shape[0])
  return tuple(flax_shape)


def _to_flax_layout(leaf: str, tensor: np.ndarray) -> np.ndarray:
  if leaf == "kernel" and tensor.ndim == 4:
    return np.ascontiguousarray(tensor.transpose(2, 3, 1, 0))
  if leaf == "kernel" and tensor.ndim == 2:
    return np.ascontiguousarray(tensor.T)
  return tensor


def _to_torch_layout(leaf: str, array: np.ndarray) -> np.ndarray:
  if leaf == "kernel" and array.ndim == 4:
    return np.ascontiguousarray(array.transpose(3, 2, 0, 1))
  if leaf == "kernel" and array.ndim == 2:
    return np.ascontiguousarray(array.T)
  return np.require(array, requirements="C")  # (ascontiguousarray would make a scalar 1-d)


def _first_and_count(keys: list[str]) -> str:
  keys = sorted(keys)
  return keys[0] + (f" (and {len(keys) - 1} more)" if len(keys) > 1 else "")


def torch_to_flax(state_dict: Mapping[str, np.ndarray], reference: Any, what: str,
                  component: str | None = None) -> dict[str, Any]:
  """A Flax parameter tree shaped like `reference`, filled from a PyTorch-named state dict.

  Args:
    state_dict: PyTorch key -> array (any float dtype; kept as given).
    reference: the Flax tree the result must match; its leaves need only `.shape`.
    what: the file the state dict came from, for error messages.
    component: "unet", "vae" or "text_encoder"; None accepts every component's names.

  Raises:
    WeightsError: one line naming `what` and the first missing, unexpected or misshapen key.
  """
  if component is not None:
    _check_component(component)
  unused = {key for key in state_dict if not key.endswith(_IGNORED_SUFFIXES)}
  missing = []
  flat = {}
  for flax_path, ref_leaf in traverse_util.flatten_dict(reference).items():
    names = _torch_names(flax_path, component)
    present = [name for name in names if name in state_dict]
    if not present:
      missing.append(names[0])
      continue
    key = present[0]  # a second spelling of the same weight is left over: unexpected
    unused.discard(key)
    tensor = np.asarray(state_dict[key])
    leaf = flax_path[-1]
    expected = _torch_shape(leaf, tuple(ref_leaf.shape))
    if tensor.shape != expected:
      raise WeightsError(f"{what}: {key} has shape {tuple(tensor.shape)}, the model needs "
                         f"{expected}")
    flat[flax_path] = _to_flax_layout(leaf, tensor)
  if missing:
    raise WeightsError(f"{what}: missing weight {_first_and_count(missing)}")
  if unused:
    raise WeightsError(f"{what}: unexpected weight {_first_and_count(list(unused))} "
                       "(not in the model)")
  return traverse_util.unflatten_dict(flat)


def flax_to_torch(params: Any, component: str) -> dict[str, np.ndarray]:
  """The PyTorch state dict (today's diffusers / transformers names) of a Flax tree
  (component "plain": a transformers model with no renamed modules, e.g. the eval networks)."""
  _check_component(component)
  state_dict = {}
  for flax_path, value in traverse_util.flatten_dict(params).items():
    state_dict[_torch_names(flax_path, component)[0]] = _to_torch_layout(
        flax_path[-1], np.asarray(value))
  return state_dict


# ----------------------------------------------------------------------------------------------
# Files.


def _is_floating(dtype: np.dtype) -> bool:
  return np.issubdtype(dtype, np.floating) or dtype == ml_dtypes.bfloat16  # bf16 is kind "V"


def _cast(array: np.ndarray, dtype) -> np.ndarray:
  """Floating arrays as `dtype` (None: unchanged); integer buffers stay as they are."""
  if dtype is None or not _is_floating(array.dtype):
    return array
  return array.astype(dtype, copy=False)


def load_safetensors(path: str, dtype=np.float32) -> dict[str, np.ndarray]:
  """Tensors of a .safetensors file; floating ones (f16, bf16, ...) cast to `dtype` (None: kept)."""
  try:
    with safe_open(path, framework="np") as f:
      return {key: _cast(f.get_tensor(key), dtype) for key in f.keys()}
  except (OSError, SafetensorError) as e:
    raise WeightsError(f"{path}: not a readable safetensors file ({e})") from e


def save_safetensors(path: str, tensors: Mapping[str, np.ndarray],
                     dtype: str = "float32") -> None:
  """Writes what diffusers / transformers write, whole or not at all (temp file, then rename).

  Floating tensors are cast to `dtype` ("float32", "float16" or "bfloat16"); the metadata
  {"format": "pt"} is what PyTorch loaders expect of these files.
  """
  if dtype not in _SAVE_DTYPES:
    raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(_SAVE_DTYPES)}")
  arrays = {key: np.require(_cast(np.asarray(value), _SAVE_DTYPES[dtype]), requirements="C")
            for key, value in tensors.items()}
  tmp_path = f"{path}.tmp{os.getpid()}"
  try:
    _safetensors_save_file(arrays, tmp_path, metadata={"format": "pt"})
    os.chmod(tmp_path, 0o644)  # readable like any other file of the export
    os.replace(tmp_path, path)
  finally:
    if os.path.exists(tmp_path):
      os.remove(tmp_path)


def with_variant(filename: str, variant: str | None) -> str:
  """diffusers' and transformers' spelling: the variant goes before the last extension."""
  if variant is None:
    return filename
  stem, extension = filename.rsplit(".", 1)
  return f"{stem}.{variant}.{extension}"


def weight_files(filename: str, variant: str | None) -> tuple[str, str]:
  """(the single file, the index of its shards) that hold `filename`'s weights, named as
  diffusers / transformers name them (`diffusion_pytorch_model.fp16.safetensors`,
  `model.safetensors.index.fp16.json`)."""
  return with_variant(filename, variant), with_variant(f"{filename}.index.json", variant)


def first_weights(filenames: tuple[str, ...], variant: str | None,
                  exists: Callable[[str], bool]) -> tuple[str, str] | None:
  """(filename, the file to read) for the first of `filenames` whose single file or shard index
  (`weight_files`) `exists`; None if none does. Shared by a folder's loader and the hub
  download, so that both pick the same file."""
  for filename in filenames:
    for candidate in weight_files(filename, variant):
      if exists(candidate):
        return filename, candidate
  return None


def find_weights(component_dir: str, filenames: tuple[str, ...],
                 variant: str | None = None) -> str:
  """The weights file of a component folder, or the index of its shards.

  Looks for each of `filenames` in turn (e.g. `diffusion_pytorch_model.safetensors`, then
  `.bin`), as a single file or as the index of its shards (`first_weights`).
  """
  found = first_weights(filenames, variant,
                        lambda name: os.path.isfile(os.path.join(component_dir, name)))
  if found is None:
    looked_for = [name for filename in filenames for name in weight_files(filename, variant)]
    raise WeightsError(f"{component_dir}: no weights found (looked for {', '.join(looked_for)})")
  return os.path.join(component_dir, found[1])


def _load_torch_pickle(path: str, dtype) -> dict[str, np.ndarray]:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise WeightsError(f"{path}: PyTorch pickle weights need torch to read "
                       '(pip install -e ".[torch]"), or use a .safetensors file') from e
  state_dict = torch.load(path, map_location="cpu", weights_only=True)
  arrays = {}
  for key, tensor in state_dict.items():
    if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16 of torch's kind; f32 is exact
      tensor = tensor.float()
    arrays[key] = _cast(tensor.numpy(), dtype)
  return arrays


def load_state_dict(path: str, dtype=np.float32) -> dict[str, np.ndarray]:
  """Tensors of a .safetensors or .bin file, or of every shard an `*.index.json` lists."""
  if path.endswith(".json"):
    with open(path) as f:
      weight_map = json.load(f).get("weight_map")
    if not isinstance(weight_map, dict):
      raise WeightsError(f"{path}: a shard index needs a weight_map")
    state_dict = {}
    for shard in sorted(set(weight_map.values())):
      shard_path = os.path.join(os.path.dirname(path), shard)
      if not os.path.isfile(shard_path):
        raise WeightsError(f"{path}: shard {shard} is missing")
      for key, value in load_state_dict(shard_path, dtype).items():
        if key in state_dict:
          raise WeightsError(f"{shard_path}: {key} is also in another shard")
        state_dict[key] = value
    return state_dict
  if path.endswith(".bin"):
    return _load_torch_pickle(path, dtype)
  return load_safetensors(path, dtype)


def load_component(component_dir: str, component: str, reference: Any,
                   variant: str | None = None) -> dict[str, Any]:
  """The float32 Flax parameters of one component folder of a diffusers-layout model."""
  _check_component(component)
  path = find_weights(component_dir, WEIGHT_FILES[component], variant)
  return torch_to_flax(load_state_dict(path), reference, path, component)


def save_component(component_dir: str, component: str, params: Any, dtype: str = "float32",
                   variant: str | None = None) -> str:
  """Writes `params` as diffusers / transformers would (their file name); returns the path.

  The component's config.json is the caller's business.
  """
  _check_component(component)
  os.makedirs(component_dir, exist_ok=True)
  path = os.path.join(component_dir, with_variant(WEIGHT_FILES[component][0], variant))
  save_safetensors(path, flax_to_torch(params, component), dtype)
  return path
