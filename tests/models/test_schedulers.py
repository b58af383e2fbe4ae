"""Our noise schedule and samplers against diffusers' PyTorch schedulers, step for step.

Every sampler runs jitted, in a `lax.fori_loop` (as the project samples), on a deterministic
fake model; diffusers' scheduler of the same method runs the same model from the same config
dict, and the ancestral ones get our noise (diffusers' `randn_tensor` is replaced by a replay
of the noise our step draws from its key). One compiled loop per sampler class and prediction
type serves every step count: the sampler's tables are padded to MAX_STEPS and passed in.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.schedulers import scheduling_ddpm, scheduling_euler_ancestral_discrete

from dreambooth_jax import toyworld
from dreambooth_jax.models import schedulers

SHAPE = (2, 4, 8, 8)  # NCHW latents
MAX_STEPS = 50
STEP_COUNTS = (1, 2, 3, 10, 50)
FAKE_MODEL_T = 0.001  # the fake model's output moves with the timestep too
TOL = 1e-5  # max abs error, relative to the scale of the samples entering and leaving a step
SD_CONFIG = dict(  # Stable Diffusion 1.x/2.x's scheduler_config.json (a PNDM one)
    _class_name="PNDMScheduler", _diffusers_version="0.6.0", beta_start=0.00085,
    beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000, clip_sample=False,
    set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1, trained_betas=None)


def diffusers_scheduler(name: str, config: dict):
  if name == "ddim":
    return diffusers.DDIMScheduler.from_config(config)
  if name == "ddpm":
    return diffusers.DDPMScheduler.from_config(config)
  if name == "euler":
    return diffusers.EulerDiscreteScheduler.from_config(config)
  if name == "euler_ancestral":
    return diffusers.EulerAncestralDiscreteScheduler.from_config(config)
  assert name in ("dpm", "dpm_karras")
  return diffusers.DPMSolverMultistepScheduler.from_config(
      config, algorithm_type="dpmsolver++", solver_order=2,
      use_karras_sigmas=name == "dpm_karras")


# --------------------------------------------------------------------------------------------
# Our sampler, jitted.

_LOOPS = {}
# XLA:CPU spends ~5 s optimising a loop that draws threefry noise; unoptimised code computes
# the same float32 operations (the tolerances cover reassociation).
_QUICK_COMPILE = {"xla_backend_optimization_level": 0}


def _tables(sampler: schedulers.Sampler) -> dict[str, np.ndarray]:
  """The sampler's per-step tables, each padded (repeating its last row) to MAX_STEPS rows
  (+1 for those one longer than the step count)."""
  tables = {}
  for field in dataclasses.fields(sampler):
    value = getattr(sampler, field.name)
    if isinstance(value, np.ndarray):
      extra = len(value) - sampler.num_steps
      tables[field.name] = np.pad(value, (0, MAX_STEPS + extra - len(value)), mode="edge")
  return tables


def _loop(template: schedulers.Sampler):
  """jit(tables, sample, key, num_steps) -> (model inputs, samples) of every step, [MAX_STEPS,
  ...] (zero past num_steps). The static part (class, prediction type, clipping) is
  `template`'s; the tables are arguments, so one compilation serves every step count."""

  def run(tables, sample, key, num_steps):
    sampler = dataclasses.replace(template, **tables)

    def body(i, carry):
      sample, state, inputs, samples = carry
      model_input = sampler.scale_model_input(sample, i)
      t = sampler.timesteps_jnp[i].astype(jnp.float32)
      output = jnp.tanh(0.1 * model_input + FAKE_MODEL_T * t)
      sample, state = sampler.step(state, output, i, sample, jax.random.fold_in(key, i))
      return sample, state, inputs.at[i].set(model_input), samples.at[i].set(sample)

    buffers = jnp.zeros((MAX_STEPS,) + sample.shape, sample.dtype)
    carry = (sample, sampler.init_state(sample), buffers, buffers)
    _, _, inputs, samples = jax.lax.fori_loop(0, num_steps, body, carry)
    return inputs, samples

  return jax.jit(run, compiler_options=_QUICK_COMPILE)


def run_ours(sampler: schedulers.Sampler, start: np.ndarray, seed: int):
  key = (type(sampler), sampler.prediction_type, getattr(sampler, "clip_range", None))
  if key not in _LOOPS:
    _LOOPS[key] = _loop(sampler)
  inputs, samples = _LOOPS[key](_tables(sampler), start, jax.random.key(seed),
                                sampler.num_steps)
  return np.asarray(inputs)[:sampler.num_steps], np.asarray(samples)[:sampler.num_steps]


@functools.partial(jax.jit, compiler_options=_QUICK_COMPILE)
def _step_noises(key):
  """What the ancestral samplers draw at steps 0..MAX_STEPS-1 under run_ours's keys."""
  return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), SHAPE, jnp.float32))(
      jnp.arange(MAX_STEPS))


# --------------------------------------------------------------------------------------------
# Diffusers, with our noise.


@pytest.fixture
def replayed_noise(monkeypatch):
  """A list to fill with the noise of the coming step: diffusers' DDPM and Euler-ancestral
  steps draw it from there instead of from torch's generator. The second item counts draws."""
  box = [None, 0]

  def randn_tensor(shape, generator=None, device=None, dtype=None, layout=None):
    del generator, device, layout
    assert tuple(shape) == box[0].shape
    box[1] += 1
    return box[0].to(dtype)

  monkeypatch.setattr(scheduling_ddpm, "randn_tensor", randn_tensor)
  monkeypatch.setattr(scheduling_euler_ancestral_discrete, "randn_tensor", randn_tensor)
  return box


def run_diffusers(name, config, num_steps, start_noise, noises, replayed):
  scheduler = diffusers_scheduler(name, config)
  scheduler.set_timesteps(num_steps)
  sample = torch.from_numpy(start_noise.copy()) * scheduler.init_noise_sigma
  start = sample.numpy().copy()
  inputs, samples = [], []
  draws = replayed[1]
  for i, t in enumerate(scheduler.timesteps):
    model_input = scheduler.scale_model_input(sample, t)
    output = torch.tanh(0.1 * model_input + FAKE_MODEL_T * t.to(torch.float32))
    replayed[0] = torch.from_numpy(noises[i].copy())
    sample = scheduler.step(output, t, sample).prev_sample
    inputs.append(model_input.numpy().copy())
    samples.append(sample.numpy().copy())
  return dict(timesteps=scheduler.timesteps.numpy(), init_noise_sigma=float(
      scheduler.init_noise_sigma), start=start, inputs=np.stack(inputs),
              samples=np.stack(samples), draws=replayed[1] - draws)


def start_noise(seed: int = 0) -> np.ndarray:
  return np.random.RandomState(seed).standard_normal(SHAPE).astype(np.float32)


def compare(name: str, config: dict, num_steps: int, replayed) -> float:
  """Runs ours and diffusers' sampler; asserts they agree; returns the largest relative error."""
  sampler = schedulers.make_sampler(name, schedulers.NoiseSchedule.from_config(config),
                                    num_steps)
  noise = start_noise()
  noises = np.asarray(_step_noises(jax.random.key(7)))
  ref = run_diffusers(name, config, num_steps, noise, noises, replayed)
  where = f"{name} n={num_steps} {config}"
  np.testing.assert_array_equal(sampler.timesteps, ref["timesteps"], err_msg=where)
  assert sampler.timesteps.dtype == (np.float32 if name.startswith("euler") else np.int32)
  ref_sigma = ref["init_noise_sigma"]
  assert abs(sampler.init_noise_sigma - ref_sigma) <= 1e-6 * max(1.0, ref_sigma), where
  start = (noise * np.float32(sampler.init_noise_sigma)).astype(np.float32)
  inputs, samples = run_ours(sampler, start, seed=7)
  expected_draws = {"euler_ancestral": num_steps,
                    "ddpm": int(np.sum(ref["timesteps"] > 0))}.get(name, 0)
  assert ref["draws"] == expected_draws, where  # diffusers really stepped with our noise
  worst = 0.0
  previous = ref["start"]
  # Errors are relative to the samples entering and leaving the step, except after a start at
  # a huge sigma (zero terminal SNR: 4096): rounding that sample to float32 leaves absolute
  # errors of ~1e-7 times it in all later steps, in diffusers' trajectory as in ours.
  carried = np.abs(ref["start"]).max() if ref_sigma > 100 else 1.0
  for i in range(num_steps):
    # The model input is the sample times a factor; it inherits the carried error so scaled.
    factor = np.abs(ref["inputs"][i]).max() / np.abs(previous).max()
    input_scale = max(1.0, np.abs(ref["inputs"][i]).max(), carried * factor)
    input_error = np.abs(inputs[i] - ref["inputs"][i]).max() / input_scale
    scale = max(carried, np.abs(previous).max(), np.abs(ref["samples"][i]).max())
    error = np.abs(samples[i] - ref["samples"][i]).max() / scale
    assert input_error <= TOL and error <= TOL, (
        f"{where}: step {i} input error {input_error:.2e}, sample error {error:.2e}")
    worst = max(worst, input_error, error)
    previous = ref["samples"][i]
  assert np.all(np.isfinite(samples))
  return worst


@pytest.mark.parametrize("spacing", schedulers.TIMESTEP_SPACINGS)
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("name", schedulers.SAMPLERS)
def test_sampler_matches_diffusers_step_for_step(name, prediction_type, spacing, replayed_noise):
  config = dict(SD_CONFIG, prediction_type=prediction_type, timestep_spacing=spacing)
  for num_steps in STEP_COUNTS:
    compare(name, config, num_steps, replayed_noise)


EXTRA_CONFIGS = {
    # Keys left out: each diffusers class's own defaults (spacing; DDIM/DDPM clip x0 to [-1, 1]
    # and DDIM ends at a = 1), and the default linear betas.
    "defaults": dict(prediction_type="epsilon"),
    "sd_without_spacing": SD_CONFIG,
    "x0_prediction": dict(SD_CONFIG, prediction_type="sample", timestep_spacing="leading"),
    # Zero terminal SNR (Lin et al.) with v-prediction, trailing, as its paper recommends.
    "zero_snr": dict(SD_CONFIG, rescale_betas_zero_snr=True, prediction_type="v_prediction",
                     timestep_spacing="trailing"),
    "cosine": dict(beta_schedule="squaredcos_cap_v2", prediction_type="epsilon",
                   timestep_spacing="linspace", clip_sample=False),
    "trained_betas": dict(trained_betas=np.linspace(1e-4, 0.03, 1000).tolist(),
                          prediction_type="v_prediction", timestep_spacing="trailing",
                          clip_sample=False),
    "ddpm_fixed_large": dict(SD_CONFIG, variance_type="fixed_large", clip_sample=True,
                             clip_sample_range=1.5),
    "ddpm_fixed_small_log": dict(SD_CONFIG, variance_type="fixed_small_log"),
}


def _applies(name: str, extra: str) -> bool:
  if extra.startswith("ddpm_"):
    return name == "ddpm"
  if extra == "x0_prediction":  # diffusers' EulerAncestralDiscreteScheduler has none
    return name != "euler_ancestral"
  if extra == "cosine":  # diffusers' first timestep differs: see the test after this one
    return name != "dpm_karras"
  return True


@pytest.mark.parametrize("name,extra", [(name, extra) for name in schedulers.SAMPLERS
                                        for extra in sorted(EXTRA_CONFIGS)
                                        if _applies(name, extra)])
def test_sampler_matches_diffusers_on_other_configs(name, extra, replayed_noise):
  config = EXTRA_CONFIGS[extra]
  for num_steps in (1, 3, 10):
    compare(name, config, num_steps, replayed_noise)


def test_karras_timesteps_of_the_cosine_schedule():
  """Diffusers truncates the Karras levels' timesteps for squaredcos_cap_v2 (and rounds them
  otherwise); its float32 log sigmas put the largest level (exactly that of T - 1) just below
  T - 1, which truncates to T - 2. Everything else is the same."""
  config = EXTRA_CONFIGS["cosine"]
  for num_steps in (2, 10):
    ours = schedulers.make_sampler("dpm_karras", schedulers.NoiseSchedule.from_config(config),
                                   num_steps)
    theirs = diffusers_scheduler("dpm_karras", config)
    theirs.set_timesteps(num_steps)
    assert ours.timesteps[0] == 999 and theirs.timesteps[0] == 998
    np.testing.assert_array_equal(ours.timesteps[1:], theirs.timesteps.numpy()[1:])
    sigmas = theirs.sigmas.numpy().astype(np.float64)[:-1]
    np.testing.assert_allclose(ours.noise_scale, sigmas / np.sqrt(sigmas ** 2 + 1), rtol=1e-6)


def test_fori_loop_with_the_sampler_as_a_constant():
  """The module docstring's loop: the sampler captured by the jitted function."""
  schedule = schedulers.NoiseSchedule.from_config(dict(SD_CONFIG, prediction_type="epsilon"))
  sampler = schedulers.make_sampler("dpm", schedule, 10)
  key = jax.random.key(7)

  @jax.jit
  def sample_all(noise):
    def body(i, carry):
      sample, state = carry
      model_input = sampler.scale_model_input(sample, i)
      output = jnp.tanh(0.1 * model_input
                        + FAKE_MODEL_T * sampler.timesteps_jnp[i].astype(jnp.float32))
      return sampler.step(state, output, i, sample, jax.random.fold_in(key, i))
    sample = noise * sampler.init_noise_sigma
    sample, _ = jax.lax.fori_loop(0, sampler.num_steps, body, (sample, sampler.init_state(sample)))
    return sample

  final = np.asarray(sample_all(start_noise()))
  _, samples = run_ours(sampler, start_noise(), seed=7)
  # The same steps, compiled with and without optimisation: equal to float32 rounding.
  np.testing.assert_allclose(final, samples[-1], rtol=0, atol=1e-6 * np.abs(final).max())


# --------------------------------------------------------------------------------------------
# Edge cases of the step counts.


def test_every_step_count_gives_finite_tables():
  schedule = schedulers.NoiseSchedule.from_config(SD_CONFIG)
  counts = list(range(1, 21)) + [61, 103, 333, 500, 501, 999, 1000]
  for spacing in schedulers.TIMESTEP_SPACINGS:
    spaced = dataclasses.replace(schedule, timestep_spacing=spacing)
    for name in schedulers.SAMPLERS:
      for num_steps in counts:
        sampler = schedulers.make_sampler(name, spaced, num_steps)
        where = f"{name} {spacing} n={num_steps}"
        assert sampler.timesteps.shape == (num_steps,), where
        assert 0 <= sampler.timesteps.min() and sampler.timesteps.max() <= 1000, where
        for field in dataclasses.fields(sampler):
          value = getattr(sampler, field.name)
          if isinstance(value, np.ndarray):
            assert np.all(np.isfinite(value)), f"{where}: {field.name}"
        assert math.isfinite(sampler.init_noise_sigma), where


def test_trailing_spacing_has_no_negative_timestep():
  """For some step counts (61 of 1000 here) diffusers' trailing spacing appends a timestep -1
  (np.arange with a float step overshoots); ours stops at the n values that mean."""
  config = dict(SD_CONFIG, timestep_spacing="trailing")
  ours = schedulers.make_sampler("ddim", schedulers.NoiseSchedule.from_config(config), 61)
  theirs = diffusers.DDIMScheduler.from_config(config)
  theirs.set_timesteps(61)
  assert len(theirs.timesteps) == 62 and theirs.timesteps[-1] == -1
  np.testing.assert_array_equal(ours.timesteps, theirs.timesteps.numpy()[:61])


def test_dpm_first_and_last_steps_are_first_order():
  schedule = schedulers.NoiseSchedule.from_config(SD_CONFIG)
  for num_steps in (1, 2, 3, 20):
    sampler = schedulers.make_sampler("dpm", schedule, num_steps)
    second_order = sampler.x0_change_coef != 0
    assert not second_order[0] and not second_order[-1]
    assert np.all(second_order[1:-1])
    # The last step lands on the predicted clean sample.
    assert sampler.sample_coef[-1] == 0 and sampler.x0_coef[-1] == 1


def test_unknown_sampler_and_bad_step_counts():
  schedule = schedulers.NoiseSchedule.from_config(SD_CONFIG)
  with pytest.raises(ValueError, match="unknown sampler 'lms'; choose one of ddim, dpm, "
                     "dpm_karras, euler, euler_ancestral, ddpm"):
    schedulers.make_sampler("lms", schedule, 10)
  for bad in (0, 1001):
    with pytest.raises(ValueError, match="num_inference_steps"):
      schedulers.make_sampler("ddim", schedule, bad)


def test_ancestral_samplers_need_a_key():
  schedule = schedulers.NoiseSchedule.from_config(SD_CONFIG)
  sample = jnp.zeros(SHAPE)
  for name in ("ddpm", "euler_ancestral"):
    sampler = schedulers.make_sampler(name, schedule, 2)
    with pytest.raises(ValueError, match="PRNG key"):
      sampler.step(sampler.init_state(sample), sample, 0, sample)


# --------------------------------------------------------------------------------------------
# Reading configs.


def test_real_configs_load():
  with open(os.path.join(toyworld.PRETRAINED_DIR, "scheduler", "scheduler_config.json")) as f:
    toy = json.load(f)
  assert schedulers.NoiseSchedule.from_config(toy).prediction_type == "epsilon"
  # A DPM-Solver config as diffusers writes it (lambda_min_clipped -inf is "-Infinity").
  dpm = json.loads(json.dumps(dict(diffusers.DPMSolverMultistepScheduler.from_config(
      dict(SD_CONFIG, prediction_type="v_prediction")).config)))
  schedule = schedulers.NoiseSchedule.from_config(dpm)
  assert schedule.prediction_type == "v_prediction" and schedule.timestep_spacing == "linspace"
  for cls in (diffusers.DDIMScheduler, diffusers.EulerDiscreteScheduler,
              diffusers.EulerAncestralDiscreteScheduler, diffusers.DDPMScheduler,
              diffusers.PNDMScheduler, diffusers.LMSDiscreteScheduler,
              diffusers.UniPCMultistepScheduler, diffusers.DEISMultistepScheduler,
              diffusers.HeunDiscreteScheduler):
    schedulers.NoiseSchedule.from_config(json.loads(json.dumps(
        dict(cls.from_config(SD_CONFIG).config))))


@pytest.mark.parametrize("key,value,message", [
    ("thresholding", True, "thresholding=True is not supported"),
    ("prediction_type", "flow_prediction", "prediction_type='flow_prediction' is not supported"),
    ("beta_schedule", "sigmoid", "beta_schedule='sigmoid' is not supported"),
    ("timestep_spacing", "uniform", "timestep_spacing='uniform' is not supported"),
    ("variance_type", "learned_range", "variance_type='learned_range' is not supported"),
    ("use_exponential_sigmas", True, "use_exponential_sigmas=True is not supported"),
    ("timestep_type", "continuous", "timestep_type='continuous' is not supported"),
    ("final_sigmas_type", "sigma_min", "final_sigmas_type='sigma_min' is not supported"),
    ("original_inference_steps", 50, "unknown key 'original_inference_steps'"),
    ("trained_betas", [0.1, 0.2], "trained_betas has 2 values"),
])
def test_config_refusals_name_the_key(key, value, message):
  with pytest.raises(ValueError, match=f"^scheduler_config: {message}") as info:
    schedulers.NoiseSchedule.from_config(dict(SD_CONFIG, **{key: value}))
  assert "\n" not in str(info.value)


# --------------------------------------------------------------------------------------------
# Training side.

TRAINING_CONFIGS = {
    "sd": dict(SD_CONFIG, prediction_type="epsilon"),
    "sd_v": dict(SD_CONFIG, prediction_type="v_prediction"),
    "linear_x0": dict(prediction_type="sample"),
    "cosine": dict(beta_schedule="squaredcos_cap_v2"),
    "zero_snr": dict(SD_CONFIG, rescale_betas_zero_snr=True, prediction_type="v_prediction"),
}


@pytest.fixture(scope="module")
def training_functions():
  """The four training-side functions, jitted once (the schedule is an argument's closure)."""
  compiled = {}

  def get(schedule_name):
    if schedule_name not in compiled:
      schedule = schedulers.NoiseSchedule.from_config(TRAINING_CONFIGS[schedule_name])
      compiled[schedule_name] = jax.jit(lambda x, n, t: (
          schedulers.add_noise(schedule, x, n, t), schedulers.velocity(schedule, x, n, t),
          schedulers.snr(schedule, t), schedulers.training_target(schedule, x, n, t)))
    return compiled[schedule_name]
  return get


@pytest.mark.parametrize("config_name", sorted(TRAINING_CONFIGS))
def test_training_side_matches_ddpm_scheduler(config_name, training_functions):
  config = TRAINING_CONFIGS[config_name]
  rng = np.random.RandomState(1)
  timesteps = np.array([0, 1, 2, 17, 250, 500, 998, 999], np.int32)
  latents = (2 * rng.standard_normal((len(timesteps),) + SHAPE[1:])).astype(np.float32)
  noise = rng.standard_normal(latents.shape).astype(np.float32)
  noisy, v, signal_to_noise, target = map(np.asarray, training_functions(config_name)(
      latents, noise, timesteps))

  ref = diffusers.DDPMScheduler.from_config(config)
  t = torch.from_numpy(timesteps.astype(np.int64))
  x, n = torch.from_numpy(latents), torch.from_numpy(noise)
  np.testing.assert_allclose(noisy, ref.add_noise(x, n, t).numpy(), rtol=0, atol=1e-6)
  np.testing.assert_allclose(v, ref.get_velocity(x, n, t).numpy(), rtol=0, atol=1e-6)
  alphas_cumprod = ref.alphas_cumprod.to(torch.float64)[t]
  ref_snr = (alphas_cumprod / (1 - alphas_cumprod)).numpy()
  # SNR spans 0 to ~1e3; float32 rounding of a_t near 1 leaves ~1e-6 of relative error.
  np.testing.assert_allclose(signal_to_noise, ref_snr, rtol=2e-6, atol=1e-9)
  assert signal_to_noise.dtype == np.float32
  expected_target = {"epsilon": noise, "v_prediction": v, "sample": latents}[
      config.get("prediction_type", "epsilon")]
  np.testing.assert_array_equal(target, expected_target)
  if config.get("rescale_betas_zero_snr"):
    assert signal_to_noise[-1] == 0 and np.array_equal(noisy[-1], noise[-1])
