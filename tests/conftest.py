"""Shared fixtures: 8 fake CPU devices, one tiny pipeline per session, a persistent jit cache."""

import json
import os
import pickle

# LLVM at -O1 instead of -O2: XLA's CPU compiles, single-threaded and most of the suite's time,
# take 35% less and the tiny models' steps run no slower (measured, issue 20).
TEST_XLA_FLAGS = "--xla_backend_optimization_level=1"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8 " + TEST_XLA_FLAGS).strip()
os.environ["HF_HUB_OFFLINE"] = "1"  # nothing at test time may reach the network
os.environ["JAX_PLATFORMS"] = "cpu"
# The builtin tiny model and drawn demo images are cached here once per machine, so that
# subprocess runs of the CLI reuse the same files.
os.environ.setdefault("DREAMBOOTH_JAX_CACHE",
                      os.path.join(os.path.expanduser("~"), ".cache", "dreambooth_jax_tests"))
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(os.environ["DREAMBOOTH_JAX_CACHE"], "jax_cache"))
# Every program is cached, however quickly it compiles: the suite's many small ones add up, in
# this process and in the CLI subprocesses (which inherit this environment).
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"

import filelock  # noqa: E402  pylint: disable=g-import-not-at-top
import jax  # noqa: E402  pylint: disable=g-import-not-at-top
import pytest  # noqa: E402  pylint: disable=g-import-not-at-top

jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])

from tests import suite_cost  # noqa: E402  pylint: disable=g-import-not-at-top
from configs import tiny as tiny_config  # noqa: E402  pylint: disable=g-import-not-at-top
from dreambooth_jax import models  # noqa: E402  pylint: disable=g-import-not-at-top
from dreambooth_jax.data import demo_data  # noqa: E402  pylint: disable=g-import-not-at-top


def pytest_configure(config):
  config.pluginmanager.register(suite_cost.Plugin(), "suite_cost")


@pytest.fixture(scope="session")
def tiny_dir() -> str:
  """The builtin tiny SD pipeline, saved like a hub repo (built once, then reused)."""
  return models.resolve_pretrained(models.BUILTIN_TINY)


@pytest.fixture(scope="session")
def tiny(tiny_dir):
  """(components, params) of the tiny pipeline."""
  return models.load_pretrained(tiny_dir)


@pytest.fixture(scope="session")
def instance_dir() -> str:
  return demo_data.resolve_instance_dir(demo_data.BUILTIN_DEMO_TOY)


def make_small_config(tiny_dir: str, instance_dir: str):
  """configs/tiny.py cut down to seconds: 6 steps, 2 class images, 2-step samplers."""
  config = tiny_config.get_config()
  config.model.pretrained = tiny_dir
  config.data.instance_dir = instance_dir
  config.data.num_class_images = 2
  config.class_images.num_inference_steps = 2
  config.train.steps = 6
  config.train.batch_size = 1
  config.train.warmup_steps = 2
  config.train.lr_schedule = "linear"
  config.checkpoint.every_steps = 3
  config.log.every_steps = 1
  config.sample.num_images = 2
  config.sample.num_inference_steps = 2
  config.eval.every_steps = 3  # validation grids at steps 3 and 6, same sampler as the samples
  config.eval.num_inference_steps = 2
  return config


@pytest.fixture
def small_config(tiny_dir, instance_dir):
  return make_small_config(tiny_dir, instance_dir)


@pytest.fixture(scope="session")
def straight_run(tmp_path_factory, worker_id, tiny_dir, instance_dir):
  """(workdir, final state) of one uninterrupted small run: what every resumed run must equal.

  Under pytest-xdist the first worker to ask trains it and the others read its workdir and
  pickled state (tests only read both).
  """
  from dreambooth_jax import train  # pylint: disable=g-import-not-at-top
  if worker_id == "master":  # no xdist
    workdir = str(tmp_path_factory.mktemp("straight"))
    return workdir, jax.device_get(
        train.train_and_evaluate(make_small_config(tiny_dir, instance_dir), workdir))
  shared = tmp_path_factory.getbasetemp().parent  # the same folder for every worker
  workdir, state_file = str(shared / "straight"), shared / "straight_state.pickle"
  with filelock.FileLock(str(shared / "straight.lock")):
    if not state_file.is_file():
      state = jax.device_get(
          train.train_and_evaluate(make_small_config(tiny_dir, instance_dir), workdir))
      state_file.write_bytes(pickle.dumps(state))
  return workdir, pickle.loads(state_file.read_bytes())


# The slowest files first (cold seconds, issue 20), so that pytest-xdist's two workers start on
# the long ones and finish together; test_faults and test_train go to the same worker, which
# trains the straight run they share. The rest keep pytest's order.
SLOW_FILES = ("test_faults.py", "training/test_step.py", "test_train.py",
              "test_speed_levers.py", "test_demo.py", "test_multihost.py", "test_plan.py",
              "test_mesh.py", "test_toyworld_pretrain.py", "test_toyworld_experiment.py",
              "models/test_unet.py", "models/test_pipeline.py", "test_bad_inputs.py",
              "data/test_frozen_cache.py")


def pytest_collection_modifyitems(items):
  def rank(item):
    path = item.nodeid.split("::")[0].removeprefix("tests/")
    return SLOW_FILES.index(path) if path in SLOW_FILES else len(SLOW_FILES)
  items.sort(key=rank)  # stable: each file's tests keep their order


def metric_rows(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]
