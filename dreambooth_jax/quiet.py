"""Silences the deprecation chatter of the last Flax-capable diffusers/transformers.

Imported first by every entry point: diffusers 0.39 and transformers 4.x warn on each Flax class
use that Flax support is going away; we pin those versions deliberately (see pyproject.toml).
"""

import logging
import os
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=DeprecationWarning)
warnings.filterwarnings("ignore", message=".*Flax.*")
warnings.filterwarnings("ignore", message=".*flax.*")

for _name in ("diffusers", "transformers", "jax._src.xla_bridge"):
  logging.getLogger(_name).setLevel(logging.ERROR)


def _drop_orbax_info(record) -> bool:
  """Orbax logs every save step at INFO through absl; keep its warnings and errors only.

  Also drops its warning that our single-host array handler (checkpoints.py) replaces its own.
  """
  if "/orbax/" not in record.pathname:
    return True
  if record.levelno < logging.WARNING:
    return False
  return "overriding jax.Array" not in record.getMessage()


def quiet_orbax() -> None:
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  absl_logging.get_absl_handler().addFilter(_drop_orbax_info)


quiet_orbax()
