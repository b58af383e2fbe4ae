"""Keeps the command-line programs' output to what matters: orbax's per-save INFO lines and
jax's platform probing messages are dropped. Imported first by every entry point.
"""

import logging
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
logging.getLogger("jax._src.xla_bridge").setLevel(logging.ERROR)


def _drop_orbax_info(record) -> bool:
  """Orbax logs every save step at INFO through absl; keep its warnings and errors only.

  Also drops its warning that our single-host array handler (training/checkpoints.py) replaces
  its own.
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
