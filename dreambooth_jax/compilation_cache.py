"""JAX's persistent compilation cache for the command-line programs.

A resumed or repeated run loads its compiled programs from disk instead of compiling them
again (the train step of SD 1.5 takes minutes to compile on a TPU host).
"""

from __future__ import annotations

import os

import jax

from dreambooth_jax import build_cache

MIN_COMPILE_SECONDS = 1.0  # programs that compile faster are not worth a disk entry


def enable(directory: str | None = None) -> str:
  """Turns the cache on: `directory`, else $JAX_COMPILATION_CACHE_DIR, else
  <dreambooth_jax cache>/jax_cache. Returns the directory."""
  directory = (directory or os.environ.get("JAX_COMPILATION_CACHE_DIR") or
               os.path.join(build_cache.root(), "jax_cache"))
  jax.config.update("jax_compilation_cache_dir", directory)
  # $JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS, jax's own variable, overrides the threshold
  # (the tests set 0: their many small programs are worth caching across processes).
  if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
  return directory
