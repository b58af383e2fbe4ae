"""Built-on-first-use folders are keyed by their builder's source, so stale ones are never read."""

import os
import time
import types

import pytest

from dreambooth_jax import build_cache


def _module(tmp_path, source):
  path = tmp_path / "builder.py"
  path.write_text(source)
  module = types.ModuleType("builder")
  module.__file__ = str(path)
  return module


def _write(text):
  def build(directory):
    os.makedirs(directory)
    with open(os.path.join(directory, "model.txt"), "w") as f:
      f.write(text)
  return build


def test_a_changed_builder_gets_a_new_folder_and_stale_ones_are_removed(tmp_path, monkeypatch):
  monkeypatch.setenv("DREAMBOOTH_JAX_CACHE", str(tmp_path / "cache"))
  old = build_cache.built_dir("tiny-sd", _write("old"), _module(tmp_path, "VERSION = 1\n"))
  assert open(os.path.join(old, "model.txt")).read() == "old"
  # Built once: a second call with the same code does not call the builder.
  assert build_cache.built_dir("tiny-sd", None, _module(tmp_path, "VERSION = 1\n")) == old
  unrelated = tmp_path / "cache" / "tiny-sd-extra"
  unrelated.mkdir()
  new = build_cache.built_dir("tiny-sd", _write("new"), _module(tmp_path, "VERSION = 2\n"))
  assert new != old
  assert open(os.path.join(new, "model.txt")).read() == "new"
  # Used a moment ago (another checkout on this machine may be using it): kept.
  assert open(os.path.join(old, "model.txt")).read() == "old"
  # Unused for longer than a day: removed by the next build.
  day_ago = time.time() - build_cache.STALE_AFTER_SECS - 60
  os.utime(old, (day_ago, day_ago))
  os.utime(unrelated, (day_ago, day_ago))
  newest = build_cache.built_dir("tiny-sd", _write("3"), _module(tmp_path, "VERSION = 3\n"))
  assert not os.path.exists(old)
  assert os.path.isdir(new) and os.path.isdir(newest)
  assert unrelated.is_dir()  # another name's folder is left alone
  # A hit marks the folder used now.
  os.utime(new, (day_ago, day_ago))
  assert build_cache.built_dir("tiny-sd", None, _module(tmp_path, "VERSION = 2\n")) == new
  assert time.time() - os.path.getmtime(new) < 60


def test_a_failed_build_leaves_nothing_behind(tmp_path, monkeypatch):
  monkeypatch.setenv("DREAMBOOTH_JAX_CACHE", str(tmp_path))
  def crash(directory):
    os.makedirs(directory)
    raise RuntimeError("disk full")
  with pytest.raises(RuntimeError, match="disk full"):
    build_cache.built_dir("demo-toy", crash, build_cache)
  assert not os.listdir(tmp_path)
  path = build_cache.built_dir("demo-toy", _write("whole"), build_cache)
  assert os.listdir(tmp_path) == [os.path.basename(path)]  # no half-built folder either
  assert open(os.path.join(path, "model.txt")).read() == "whole"
