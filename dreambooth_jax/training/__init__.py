"""The training run's parts, above data/: config checks, the step, and what keeps a run safe.

config_check (config and workdir validated before heavy work); step (TrainState, the loss, the
jitted step); checkpoints; preemption (SIGTERM → checkpoint and exit 143); workdir_lock (one run
per workdir); metric_writer (metrics.jsonl and TensorBoard). train.py puts them together.
"""
