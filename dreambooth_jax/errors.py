"""Every exception the package raises on purpose, in one module that imports nothing of ours.

At the bottom of the layers, so any module can raise them and the commands can map them to
exit statuses (cli_errors.py) without importing the modules that raise them.
"""

# Inputs to fix (the CLIs exit with status 2).


class ConfigError(ValueError):
  """A config value or workdir that cannot work; the message names the field."""


class DataError(ValueError):
  """Unusable input data; the message names the file or directory."""


class DreamBoothDataError(DataError):
  """The local copy of the dataset is missing or unusable; the message names the path."""


class ModelLoadError(ValueError):
  """A pretrained model that cannot be used; the message names the path and the part."""


class WeightsError(ValueError):
  """A weights file that does not fit the model; the one-line message names the file and key."""


class MeshError(ValueError):
  """A mesh shape that does not match the devices; the message names the config fields."""


# Runs that failed (status 1).


class NonFiniteLossError(RuntimeError):
  """A step's loss or gradient was NaN or Inf and train.skip_nonfinite_steps is off."""


class CheckpointError(RuntimeError):
  """A checkpoint could not be written; the message names the step and the kept checkpoint."""


class WorkdirLockedError(RuntimeError):
  """Another live process is running in this workdir."""


# Stopped on request (status 143).


class Preempted(Exception):
  """The run stopped early on request; its state is saved and it resumes when rerun."""
