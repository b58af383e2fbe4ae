"""train_and_evaluate(config, workdir): a whole DreamBooth run, top to bottom.

check config and images → lock the workdir → load models → class images → sharded batches →
jitted steps → checkpoints and metrics → export → samples. Running it again on the same workdir
resumes from the newest checkpoint and ends exactly where an uninterrupted run would.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time

import jax
import ml_collections
from absl import logging
from tqdm import tqdm

from dreambooth_jax import atomic_files, distributed, errors, failpoints, models, sharding
from dreambooth_jax.data import (class_images, demo_data, frozen_cache, identifiers, input_pipeline,
                                 prefetch)
from dreambooth_jax.models import sampling
from dreambooth_jax.training import (checkpoints, config_check, metric_writer, preemption,
                                     step as train_step, workdir_lock)


def record_config(config: ml_collections.ConfigDict, workdir: str, write: bool = True) -> None:
  """Writes workdir/config.json, after refusing a resume whose config changes the math."""
  path = os.path.join(workdir, "config.json")
  if os.path.exists(path) and _holds_results(workdir):
    with open(path) as f:
      previous = json.load(f)
    for change in config_check.check_resume(previous, config):
      logging.warning("Resuming with a changed config (resume_ignore_changes): %s", change)
  if write:
    atomic_files.write_text(path, config.to_json_best_effort(indent=2, sort_keys=True) + "\n")


def _holds_results(workdir: str) -> bool:
  """Whether an earlier run left checkpoints or class images that the config produced."""
  return any(os.path.isdir(os.path.join(workdir, name)) and os.listdir(os.path.join(workdir, name))
             for name in ("checkpoints", "class_images"))


def stop_if_nonfinite(state: train_step.TrainState, train_config,
                      manager: checkpoints.ocp.CheckpointManager) -> None:
  """Raises NonFiniteLossError once a step was NaN/Inf, unless such steps are to be skipped."""
  if train_config.skip_nonfinite_steps:
    return
  count, first = jax.device_get((state.nonfinite_steps, state.first_nonfinite_step))
  if count:
    kept = manager.latest_step()
    raise errors.NonFiniteLossError(
        f"non-finite loss or gradient at step {int(first)}; stopped without saving it. Newest "
        f"good checkpoint: {'step ' + str(kept) if kept is not None else 'none'}. Lower "
        "train.learning_rate, or set train.skip_nonfinite_steps=true to skip such steps")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> train_step.TrainState:
  config_check.check_config(config)
  config_check.check_workdir(workdir)
  data_config, train_config = config.data, config.train
  instance_dir = demo_data.resolve_instance_dir(data_config.instance_dir)
  instance_images = input_pipeline.load_images(input_pipeline.list_images(instance_dir),
                                               data_config.resolution)
  # Every input is valid: from here on the workdir is written, by this process only.
  os.makedirs(workdir, exist_ok=True)
  main = distributed.is_main()  # the one process that writes the workdir's files
  with (workdir_lock.hold(workdir) if main else contextlib.nullcontext()), \
       preemption.SigtermWatcher(enabled=jax.process_count() == 1) as sigterm:
    record_config(config, workdir, write=main)
    components, params = models.load_configured(config.model)
    if data_config.resolution % components.vae_scale_factor:
      raise config_check.ConfigError(
          f"config.data.resolution: {data_config.resolution} is not a multiple of the VAE's "
          f"downsampling factor {components.vae_scale_factor}")
    prompts = identifiers.resolve_prompts(data_config, components.tokenizer, config.seed)
    if main:
      atomic_files.write_json(os.path.join(workdir, "prompts.json"),
                              dataclasses.asdict(prompts))
    logging.info("Identifier %r; instance prompt %r; class prompt %r", prompts.identifier,
                 prompts.instance_prompt, prompts.class_prompt)
    mesh = sharding.make_mesh(data=config.mesh.data, fsdp=config.mesh.fsdp)
    logging.info("Mesh: %s of %s devices", dict(mesh.shape), jax.devices()[0].platform)
    params = sharding.put_state(params, mesh)

    class_image_arrays = []
    if train_config.with_prior_preservation:
      class_dir = data_config.class_dir or os.path.join(workdir, "class_images")
      class_paths = class_images.ensure_class_images(
          class_dir, data_config.num_class_images, prompts.class_prompt, components, params,
          mesh, data_config.resolution, config.class_images, config.seed,
          stop_requested=lambda: sigterm.requested)
      class_image_arrays = input_pipeline.load_images(class_paths, data_config.resolution)
    data = frozen_cache.training_data(config, components, params, mesh, instance_images,
                                      class_image_arrays, prompts.instance_prompt,
                                      prompts.class_prompt)

    optimizer = train_step.make_optimizer(train_config)
    frozen = train_step.frozen_params(params, train_config.train_text_encoder)
    step_frozen = train_step.frozen_params(params, train_config.train_text_encoder,
                                           data.instance_latents is not None,
                                           data.prompt_embeddings is not None)
    state = train_step.create_train_state(params, optimizer, config.seed,
                                          train_config.train_text_encoder,
                                          train_config.param_dtype)
    state = sharding.put_state(state, mesh)
    manager = checkpoints.make_manager(workdir, config.checkpoint.max_to_keep)
    restored = checkpoints.restore_latest(manager, state)
    if restored is not None:
      state = restored
      logging.info("Resumed from %s at step %d", manager.directory, int(state.step))
    start_step = int(jax.device_get(state.step))
    if start_step > train_config.steps:
      raise config_check.ConfigError(
          f"config.train.steps: {train_config.steps} is below step {start_step}, where this "
          "workdir's newest checkpoint is")

    writer = (metric_writer.MetricWriter(workdir, start_step) if main
              else metric_writer.NullWriter())
    step_fn = train_step.jit_on_mesh(components, optimizer, train_config, mesh, state,
                                     step_frozen)
    eval_config = config.eval
    if eval_config.every_steps:  # validation grids during training, compiled once
      eval_prompts = [prompts.fill(p, data_config.class_name)
                      for p in eval_config.prompts or config.sample.prompts]
      eval_sampler = sampling.make_sampler(components, mesh, data_config.resolution,
                                           eval_config.scheduler,
                                           eval_config.num_inference_steps,
                                           eval_config.guidance_scale)
      if main:
        os.makedirs(os.path.join(workdir, "eval"), exist_ok=True)

    rows = sharding.local_rows(mesh, data.num_rows)  # this process builds only its rows
    put_batch = sharding.BatchPutter(mesh, data.num_rows)

    def global_batch(step: int) -> dict[str, jax.Array]:
      batch = failpoints.corrupt("batch", step + 1, data.batch(step, rows))
      failpoints.trace("rows", step + 1, *batch["example_id"])
      return put_batch(batch)

    batches = prefetch.prefetched(global_batch, range(start_step, train_config.steps),
                                  train_config.prefetch_batches)
    try:
      last_log_time, last_log_step = time.perf_counter(), start_step
      for step, batch in zip(tqdm(range(start_step, train_config.steps), initial=start_step,
                                  total=train_config.steps, desc="train", unit="step"), batches):
        state, metrics = step_fn(state, step_frozen, batch)
        done = step + 1
        failpoints.at("step", done)
        if done % config.log.every_steps == 0 or done == train_config.steps:
          scalars = jax.device_get(metrics)
          now = time.perf_counter()
          scalars["steps_per_sec"] = (done - last_log_step) / (now - last_log_time)
          last_log_time, last_log_step = now, done
          writer.write_scalars(done, scalars)
          stop_if_nonfinite(state, train_config, manager)
        if eval_config.every_steps and done % eval_config.every_steps == 0:
          images = sampling.sample_grid(eval_sampler, {**frozen, **state.params}, mesh,
                                        components.tokenizer, eval_prompts,
                                        eval_config.num_images, config.seed)
          grid = sampling.make_grid(images.reshape(-1, *images.shape[2:]),
                                    columns=eval_config.num_images)
          if main:
            sampling.write_png(grid, os.path.join(workdir, "eval", f"step_{done:06d}.png"))
          writer.write_image(done, "eval", grid)
        preempted = sigterm.requested or manager.reached_preemption(done)
        if done % config.checkpoint.every_steps == 0 or preempted:
          stop_if_nonfinite(state, train_config, manager)
          checkpoints.save(manager, state)
        if preempted:
          checkpoints.wait(manager)
          raise errors.Preempted(
              f"stopped at step {done} of {train_config.steps} on SIGTERM; checkpoint saved "
              f"in {manager.directory}; rerun the same command to resume")
      stop_if_nonfinite(state, train_config, manager)
      checkpoints.save(manager, state)
    finally:  # an in-flight async save completes even when the loop dies
      batches.close()  # stops the prefetch thread
      checkpoints.wait(manager)

    trained_params = {**frozen, **state.params}
    export_dir = os.path.join(workdir, "export")
    single_file = os.path.join(workdir, "export.safetensors") if config.export.single_file else None
    models.export_pipeline(components, trained_params, export_dir, config.export.fp16_variant,
                           single_file)
    logging.info("Exported the fine-tuned pipeline to %s%s", export_dir,
                 f" and {single_file}" if single_file else "")
    if config.sample.prompts:
      grid = sampling.write_samples(
          components, trained_params, mesh,
          [prompts.fill(p, data_config.class_name) for p in config.sample.prompts],
          config.sample.num_images,
          os.path.join(workdir, "samples"), data_config.resolution, config.sample.scheduler,
          config.sample.num_inference_steps, config.sample.guidance_scale, config.seed)
      writer.write_image(train_config.steps, "samples", grid)
    writer.close()
  return state
