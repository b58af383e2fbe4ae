"""The next batches built and put on the devices while the current step runs."""

from __future__ import annotations

import collections
import concurrent.futures
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")


def prefetched(make: Callable[[int], T], steps: Iterable[int], ahead: int) -> Iterator[T]:
  """make(step) for each step, computed up to `ahead` steps early on one background thread.

  ahead=0 computes each in the caller's thread when it is needed. An exception raised by
  make() reaches the caller at the step it belongs to.
  """
  steps = iter(steps)
  if ahead <= 0:
    for step in steps:
      yield make(step)
    return
  with concurrent.futures.ThreadPoolExecutor(max_workers=1,
                                             thread_name_prefix="prefetch") as pool:
    pending = collections.deque()
    try:
      for step in steps:
        pending.append(pool.submit(make, step))
        if len(pending) > ahead:
          yield pending.popleft().result()
      while pending:
        yield pending.popleft().result()
    finally:  # the caller stopped early: drop what was not started
      for future in pending:
        future.cancel()
