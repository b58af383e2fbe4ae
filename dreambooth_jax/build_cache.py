"""Files built on first use (the builtin models, the demo photos, the tiny judges).

Each lives in a folder named after a fingerprint of the code that builds it, so a machine
that ran an older version never reads what that version wrote: a changed builder gets a new
folder, and folders no run has used for a day are removed (not at once: two checkouts of
different versions on one machine each keep theirs). A folder appears whole or not at all.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
import shutil
import time
import types
from typing import Callable

STALE_AFTER_SECS = 24 * 3600  # a sibling folder unused this long is removed


def root() -> str:
  """$DREAMBOOTH_JAX_CACHE, else ~/.cache/dreambooth_jax."""
  return os.environ.get("DREAMBOOTH_JAX_CACHE",
                        os.path.join(os.path.expanduser("~"), ".cache", "dreambooth_jax"))


def _source_files(module: types.ModuleType) -> list[str]:
  if hasattr(module, "__path__"):  # a package: every Python file below it
    return sorted(glob.glob(os.path.join(module.__path__[0], "**", "*.py"), recursive=True))
  return [module.__file__]


def code_fingerprint(*modules: types.ModuleType) -> str:
  """12 hex digits that change whenever the source of any of `modules` changes."""
  digest = hashlib.sha256()
  for module in modules:
    for path in _source_files(module):
      with open(path, "rb") as f:
        digest.update(f.read())
  return digest.hexdigest()[:12]


def built_dir(name: str, build: Callable[[str], None], *modules: types.ModuleType) -> str:
  """<root>/<name>-<fingerprint of modules>, made by `build(directory)` if it is not there."""
  path = os.path.join(root(), f"{name}-{code_fingerprint(*modules)}")
  if os.path.isdir(path):
    os.utime(path)  # its last use, which keeps it from being pruned as stale
    return path
  tmp_dir = f"{path}.tmp{os.getpid()}"
  shutil.rmtree(tmp_dir, ignore_errors=True)
  try:
    build(tmp_dir)
  except BaseException:
    shutil.rmtree(tmp_dir, ignore_errors=True)
    raise
  try:
    os.rename(tmp_dir, path)
  except OSError:  # another process finished the same build first: keep its copy
    if not os.path.isdir(path):
      raise
    shutil.rmtree(tmp_dir, ignore_errors=True)
  for other in glob.glob(os.path.join(root(), f"{name}-*")):
    if (other != path and re.fullmatch(re.escape(name) + r"-[0-9a-f]{12}", os.path.basename(other))
        and time.time() - os.path.getmtime(other) > STALE_AFTER_SECS):
      shutil.rmtree(other, ignore_errors=True)
  return path
