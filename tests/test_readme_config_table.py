"""The README's config reference lists every field of configs/common.py with its true default."""

import os
import re

import pytest

from configs import common
from dreambooth_jax.training import config_check

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def _rows():
  """{field: default as written} from the table under '## Config reference'."""
  with open(README) as f:
    text = f.read()
  section = text.split("## Config reference", 1)[1].split("\n## ", 1)[0]
  rows = {}
  for line in section.splitlines():
    if not line.startswith("| `"):
      continue
    fields_cell, default_cell = [cell.strip() for cell in line.strip("|").split("|")[:2]]
    names = re.findall(r"`([^`]+)`", fields_cell)
    separator = " / " if " / " in default_cell else ", "
    defaults = default_cell.split(separator) if len(names) > 1 else [default_cell]
    assert len(defaults) == len(names), line
    section_name = names[0].rsplit(".", 1)[0] if "." in names[0] else ""
    for name, default in zip(names, defaults):
      if name.startswith("."):  # `eval.num_images` / `.scheduler`: the same section
        name = section_name + name
      elif "." not in name and section_name:  # `train.adam_b1`, `adam_b2`
        name = f"{section_name}.{name}"
      rows[name] = default.strip()
  return rows


def _as_written(value) -> str:
  if isinstance(value, bool):
    return "true" if value else "false"
  if value == "":
    return '`""`'
  if isinstance(value, (tuple, list)) and not value:
    return "`()`"
  return str(value)


def _same(written: str, value) -> bool:
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    return float(written) == float(value)
  return written.strip("`") == _as_written(value).strip("`") or written == _as_written(value)


def test_every_field_is_documented_once_and_nothing_else():
  documented = set(_rows())
  fields = set(config_check._flatten(common.get_config()))  # pylint: disable=protected-access
  assert documented == fields, (sorted(fields - documented), sorted(documented - fields))


@pytest.mark.parametrize("field", sorted(_rows()))
def test_the_documented_default_is_the_default(field):
  value = common.get_config()
  for part in field.split("."):
    value = value[part]
  assert _same(_rows()[field], value), (field, _rows()[field], value)
