"""Turns the errors a user can fix (bad config, data, model path) into one line and exit 2."""

import contextlib
import sys

from dreambooth_jax import config_check, input_pipeline, models


@contextlib.contextmanager
def one_line_errors():
  try:
    yield
  except (config_check.ConfigError, input_pipeline.DataError, models.ModelLoadError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
