"""Files written whole or not at all: a temporary file, then a rename over the target."""

from __future__ import annotations

import json
import os
from typing import Any

from dreambooth_jax import failpoints


def write_text(path: str, text: str) -> None:
  """A killed process leaves the old file or the new one, never a torn mix."""
  tmp_path = f"{path}.tmp{os.getpid()}"
  with open(tmp_path, "w") as f:
    f.write(text)
  os.replace(tmp_path, path)
  failpoints.trace("write", path)


def write_json(path: str, value: Any, **dump_args) -> None:
  write_text(path, json.dumps(value, indent=2, **dump_args) + "\n")
