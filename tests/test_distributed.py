"""How a process finds the others: config.distributed.* or the JAX_* environment variables.

jax.distributed.initialize is replaced by a recorder: these tests check what it is given, not
the join itself (tests/test_multihost.py joins two real processes through the flags).
"""

import jax
import pytest

from configs import common
from dreambooth_jax import distributed

ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "TPU_WORKER_HOSTNAMES")


@pytest.fixture
def joins(monkeypatch):
  """The arguments of every jax.distributed.initialize call; a clean environment."""
  for name in ENV:
    monkeypatch.delenv(name, raising=False)
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize",
                      lambda *args, **kwargs: calls.append((args, kwargs)))
  monkeypatch.setattr(jax.config, "update", lambda *args: None)  # keeps the CPU collectives
  return calls


def test_the_environment_variables_name_the_coordinator_count_and_id(joins, monkeypatch):
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
  monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
  monkeypatch.setenv("JAX_PROCESS_ID", "2")
  distributed.initialize(common.get_config().distributed)
  assert joins == [(("10.0.0.1:1234",), {"num_processes": 4, "process_id": 2})]


def test_the_flags_win_over_the_environment(joins, monkeypatch):
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
  monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
  monkeypatch.setenv("JAX_PROCESS_ID", "2")
  config = common.get_config().distributed
  config.coordinator_address, config.num_processes, config.process_id = "h:1", 2, 0
  distributed.initialize(config)
  assert joins == [(("h:1",), {"num_processes": 2, "process_id": 0})]


def test_one_host_joins_nothing_and_a_tpu_pod_slice_finds_the_others_itself(joins, monkeypatch):
  distributed.initialize(common.get_config().distributed)
  assert not joins
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "w0,w1")
  distributed.initialize(common.get_config().distributed)
  assert joins == [((), {})]
