"""The core install needs neither diffusers, transformers nor torch: with the three made
unimportable (as on a machine without the test extra), every command module imports, and the
suite's full runs of the CLIs go through the same block (`without_oracles`): the demo
(tests/test_demo.py: builtin model loaded, 600 steps trained, exported to folders and a single
file, sampled), the sample CLI and evaluate (tests/test_evaluate.py)."""

import importlib.util
import subprocess
import sys

COMMAND_MODULES = ("main", "train", "sample", "evaluate", "convert", "plan", "benchmark",
                   "identifiers", "toyworld.pretrain", "toyworld.experiment", "toyworld.judges")

# A meta-path finder that refuses the oracles, as if they were not installed.
BLOCK = """
import sys
class Absent:
  def find_spec(self, name, path=None, target=None):
    if name.split('.')[0] in ('diffusers', 'transformers', 'torch'):
      raise ModuleNotFoundError(f'No module named {name!r}')
sys.meta_path.insert(0, Absent())
"""


def without_oracles(module: str, *args: str) -> list[str]:
  """The command line of `python -m dreambooth_jax.<module> args...`, run with the three
  oracles unimportable."""
  run = f"import runpy\nrunpy.run_module('dreambooth_jax.{module}', run_name='__main__')"
  return [sys.executable, "-c", f"{BLOCK}\n{run}", *args]


def test_every_command_module_imports_without_diffusers_transformers_or_torch():
  imports = "\n".join(f"import dreambooth_jax.{name}" for name in COMMAND_MODULES)
  result = subprocess.run([sys.executable, "-c", f"{BLOCK}\n{imports}\nprint('imported')"],
                          capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.strip() == "imported"


def test_no_command_module_imports_torch_even_where_it_is_installed():
  """tensorboardX would import torch (1.5 s of every run's start, and its CUDA libraries in a
  JAX process); metric_writer hides it during that import."""
  assert importlib.util.find_spec("torch") is not None  # the test extra installs it
  imports = "\n".join(f"import dreambooth_jax.{name}" for name in COMMAND_MODULES)
  check = "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))"
  result = subprocess.run([sys.executable, "-c", f"import sys\n{imports}\n{check}"],
                          capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.strip() == "[]"


def test_the_block_makes_each_oracle_unimportable():
  """The block `without_oracles` puts in front of the CLI runs does refuse the three."""
  for name in ("torch", "diffusers", "transformers"):
    probe = [sys.executable, "-c", f"{BLOCK}\nimport {name}"]
    result = subprocess.run(probe, capture_output=True, text=True, timeout=300, check=False)
    assert result.stderr.strip().splitlines()[-1] == (
        f"ModuleNotFoundError: No module named {name!r}")
