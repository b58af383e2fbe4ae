"""Where the suite's time goes: XLA compilations and subprocess starts per test file.

Printed at the end of every run (issue 20): a cold run shows which files compile most, a warm
one shows what the persistent cache saves. Subprocess compilations are not seen here; their
cost is in the file's wall time. Under pytest-xdist each worker counts its own files and the
controller adds the workers' counts up.
"""

import collections
import subprocess
import time

import jax
import pytest

_BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
_CACHE_HIT = "/jax/compilation_cache/cache_retrieval_time_sec"

_current_file = ["(collection)"]
compiles = collections.Counter()
compile_secs = collections.Counter()
cache_hits = collections.Counter()
subprocesses = collections.Counter()
wall_secs = collections.Counter()
_COUNTERS = {"compiles": compiles, "compile_secs": compile_secs, "cache_hits": cache_hits,
             "subprocesses": subprocesses, "wall_secs": wall_secs}


def _on_duration(event: str, duration: float, **_) -> None:
  if event == _BACKEND_COMPILE:
    compiles[_current_file[0]] += 1
    compile_secs[_current_file[0]] += duration
  elif event == _CACHE_HIT:
    cache_hits[_current_file[0]] += 1


jax.monitoring.register_event_duration_secs_listener(_on_duration)

_popen_init = subprocess.Popen.__init__


def _counting_popen_init(self, *args, **kwargs):
  subprocesses[_current_file[0]] += 1
  _popen_init(self, *args, **kwargs)


subprocess.Popen.__init__ = _counting_popen_init


class Plugin:
  """Attributes every compile and subprocess start to the test file running at that moment."""

  _start = None

  def pytest_runtest_protocol(self, item, nextitem):  # pylint: disable=unused-argument
    _current_file[0] = item.location[0]
    self._start = time.monotonic()

  def pytest_runtest_logfinish(self, nodeid, location):  # pylint: disable=unused-argument
    if self._start is not None:  # None in an xdist controller, which runs no test itself
      wall_secs[location[0]] += time.monotonic() - self._start

  def pytest_sessionfinish(self, session):
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:  # an xdist worker: hand the counts to the controller
      workeroutput["suite_cost"] = {name: dict(counter) for name, counter in _COUNTERS.items()}

  @pytest.hookimpl(optionalhook=True)
  def pytest_testnodedown(self, node, error):  # pylint: disable=unused-argument
    for name, counts in getattr(node, "workeroutput", {}).get("suite_cost", {}).items():
      _COUNTERS[name].update(counts)

  def pytest_terminal_summary(self, terminalreporter):
    files = sorted(set(wall_secs) | set(compiles), key=lambda f: -wall_secs[f])
    terminalreporter.section("suite cost per file")
    terminalreporter.write_line(
        f"{'file':42s} {'wall s':>8s} {'compiles':>8s} {'compile s':>9s} {'cache hits':>10s} "
        f"{'subprocs':>8s}")
    for f in files:
      terminalreporter.write_line(
          f"{f:42s} {wall_secs[f]:8.1f} {compiles[f]:8d} {compile_secs[f]:9.1f} "
          f"{cache_hits[f]:10d} {subprocesses[f]:8d}")
    terminalreporter.write_line(
        f"{'total':42s} {sum(wall_secs.values()):8.1f} {sum(compiles.values()):8d} "
        f"{sum(compile_secs.values()):9.1f} {sum(cache_hits.values()):10d} "
        f"{sum(subprocesses.values()):8d}")
