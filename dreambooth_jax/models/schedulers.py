"""The diffusion noise schedule and the samplers that invert it, as pure, jit-friendly code.

A `NoiseSchedule` is read from a model's scheduler_config.json (whichever diffusers scheduler
class wrote it) and gives the training side: `add_noise`, `velocity`, `snr` and
`training_target`, all traceable. `make_sampler` turns it into a `Sampler` for a number of
steps: everything that depends only on the step index is tabulated on the host in float64 and
stored as float32 numpy arrays, so a whole denoising loop is one `lax.fori_loop` inside jit:

  sampler = make_sampler("dpm", schedule, 25)
  def body(i, carry):
    sample, state = carry
    model_input = sampler.scale_model_input(sample, i)
    output = unet(model_input, sampler.timesteps_jnp[i])
    return sampler.step(state, output, i, sample, jax.random.fold_in(key, i))
  sample = noise * sampler.init_noise_sigma
  sample, _ = jax.lax.fori_loop(0, sampler.num_steps, body, (sample, sampler.init_state(sample)))

Each sampler reproduces the diffusers scheduler of the same name step for step (timesteps,
noise levels, the low-order steps of DPM-Solver, even the places where diffusers' choices are
odd, noted where they occur), so images match a diffusers pipeline's for the same model.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
SAMPLERS = ("ddim", "dpm", "dpm_karras", "euler", "euler_ancestral", "ddpm")

# The ancestral DDPM step's noise variance, as diffusers' DDPMScheduler names the choices
# (the learned ones need a UNet that also predicts a variance, which Stable Diffusion's do not).
_DDPM_VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large")

# Keys of a scheduler config that choose a sampling METHOD (solver order, Karras sigmas, ...):
# here the sampler's name chooses it, so these are ignored, like diffusers' bookkeeping keys.
_METHOD_KEYS = frozenset((
    "solver_order", "algorithm_type", "solver_type", "lower_order_final", "euler_at_final",
    "use_karras_sigmas", "skip_prk_steps", "predict_x0", "disable_corrector", "solver_p"))
# Parameters of options that are refused unless off (dynamic thresholding, flow sigmas), so
# their values never matter.
_INERT_KEYS = frozenset(("dynamic_thresholding_ratio", "sample_max_value", "flow_shift",
                         "time_shift_type"))
# Options we do not implement, accepted only at their diffusers default (which changes nothing).
_DEFAULT_ONLY = {
    "thresholding": False,
    "interpolation_type": "linear",
    "timestep_type": "discrete",
    "final_sigmas_type": "zero",
    "lambda_min_clipped": -math.inf,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "use_lu_lambdas": False,
    "use_flow_sigmas": False,
    "use_dynamic_shifting": False,
    "sigma_min": None,
    "sigma_max": None,
    "shift_terminal": None,
}
_SCHEDULE_KEYS = frozenset((
    "num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
    "prediction_type", "timestep_spacing", "steps_offset", "set_alpha_to_one", "clip_sample",
    "clip_sample_range", "rescale_betas_zero_snr", "variance_type"))


def _config_error(message: str) -> ValueError:
  return ValueError(f"scheduler_config: {message}")


# --------------------------------------------------------------------------------------------
# The noise schedule (training side).


@dataclasses.dataclass(frozen=True, eq=False)
class NoiseSchedule:
  """The forward process q(x_t | x_0) = N(sqrt(a_t) x_0, (1 - a_t) I) of a model, plus the
  config options its samplers honour.

  Options diffusers leaves to each scheduler class's own default when the config omits them
  (timestep_spacing, clip_sample, set_alpha_to_one, variance_type) stay None here and are
  resolved per sampler, so that "the same config" means the same thing as in diffusers.
  """
  alphas_cumprod: np.ndarray  # [num_train_timesteps] a_t, the signal fraction (float32 values).
  beta_schedule: str = "linear"
  prediction_type: str = "epsilon"
  timestep_spacing: str | None = None
  steps_offset: int = 0
  set_alpha_to_one: bool | None = None
  clip_sample: bool | None = None
  clip_sample_range: float = 1.0
  variance_type: str | None = None
  zero_terminal_snr: bool = False

  @property
  def num_train_timesteps(self) -> int:
    return len(self.alphas_cumprod)

  @classmethod
  def from_config(cls, scheduler_config: Mapping[str, Any]) -> NoiseSchedule:
    """Reads a diffusers scheduler_config.json dict; refuses, in one line naming the key,
    any option it cannot honour."""
    config = {k: v for k, v in scheduler_config.items()
              if not k.startswith("_") and k not in _METHOD_KEYS and k not in _INERT_KEYS}
    for key, value in config.items():
      if key in _DEFAULT_ONLY:
        default = _DEFAULT_ONLY[key]
        if value != default and not (value is None and default is not None):
          raise _config_error(f"{key}={value!r} is not supported (only {default!r})")
      elif key not in _SCHEDULE_KEYS:
        raise _config_error(f"unknown key {key!r}")

    def option(key, choices, default):
      value = config.get(key, default)
      if value is None:
        value = default
      if choices is not None and value not in choices:
        raise _config_error(f"{key}={value!r} is not supported; choose one of "
                            f"{', '.join(choices)}")
      return value

    num_train_timesteps = int(option("num_train_timesteps", None, 1000))
    if num_train_timesteps < 2:
      raise _config_error(f"num_train_timesteps={num_train_timesteps} must be at least 2")
    beta_schedule = option("beta_schedule", None, "linear")
    trained_betas = config.get("trained_betas")
    if trained_betas is not None:
      betas = np.asarray(trained_betas, np.float64)
      if betas.shape != (num_train_timesteps,):
        raise _config_error(f"trained_betas has {betas.size} values, num_train_timesteps is "
                            f"{num_train_timesteps}")
    else:
      option("beta_schedule", BETA_SCHEDULES, "linear")
      betas = _betas(beta_schedule, float(option("beta_start", None, 0.0001)),
                     float(option("beta_end", None, 0.02)), num_train_timesteps)
    zero_terminal_snr = bool(option("rescale_betas_zero_snr", None, False))
    if zero_terminal_snr:
      betas = _zero_terminal_snr(betas)
    # Diffusers holds betas, 1 - beta and a_t in float32, and the models fine-tuned with it
    # saw those values: near t = 0, where 1 - a_t is small, that rounding moves sqrt(1 - a_t)
    # by up to ~1e-5 relative. So we round where it does (its product accumulates in float64);
    # everything derived from a_t is then computed in float64.
    alphas = np.float32(1.0) - betas.astype(np.float32)
    alphas_cumprod = np.cumprod(alphas.astype(np.float64)).astype(np.float32).astype(np.float64)
    # Only zero terminal SNR may leave no signal at all, and only at the last step.
    if (not np.all(np.isfinite(alphas_cumprod)) or np.any(alphas_cumprod[:-1] <= 0)
        or (alphas_cumprod[-1] <= 0 and not zero_terminal_snr)):
      raise _config_error("the betas leave no signal (a_t <= 0) before the last step")

    variance_type = config.get("variance_type")
    if variance_type is not None and variance_type not in _DDPM_VARIANCE_TYPES:
      raise _config_error(f"variance_type={variance_type!r} is not supported; choose one of "
                          f"{', '.join(_DDPM_VARIANCE_TYPES)}")
    timestep_spacing = config.get("timestep_spacing")
    if timestep_spacing is not None:
      option("timestep_spacing", TIMESTEP_SPACINGS, None)
    steps_offset = int(option("steps_offset", None, 0))
    if steps_offset < 0:
      raise _config_error(f"steps_offset={steps_offset} must not be negative")
    return cls(
        alphas_cumprod=alphas_cumprod,
        beta_schedule=beta_schedule,
        prediction_type=option("prediction_type", PREDICTION_TYPES, "epsilon"),
        timestep_spacing=timestep_spacing,
        steps_offset=steps_offset,
        set_alpha_to_one=config.get("set_alpha_to_one"),
        clip_sample=config.get("clip_sample"),
        clip_sample_range=float(option("clip_sample_range", None, 1.0)),
        variance_type=variance_type,
        zero_terminal_snr=zero_terminal_snr)

  def sigmas(self) -> np.ndarray:
    """float64 [T]: the noise-to-signal ratio sqrt((1 - a_t) / a_t) that Euler and DPM-Solver
    step in. With zero terminal SNR a_T is 0, so (as diffusers) it is taken as 2^-24 there."""
    alphas_cumprod = self.alphas_cumprod.copy()
    if self.zero_terminal_snr:
      alphas_cumprod[-1] = 2.0 ** -24
    return np.sqrt((1.0 - alphas_cumprod) / alphas_cumprod)


def _betas(schedule: str, beta_start: float, beta_end: float, num: int) -> np.ndarray:
  if schedule == "linear":
    return np.linspace(beta_start, beta_end, num)
  if schedule == "scaled_linear":  # Stable Diffusion's: linear in sqrt(beta).
    return np.linspace(beta_start ** 0.5, beta_end ** 0.5, num) ** 2
  # squaredcos_cap_v2 (Nichol & Dhariwal): a_t follows cos^2 of a slightly shifted time, each
  # beta capped at 0.999 so that the last step keeps a little signal.
  def signal(t):
    return np.cos((t + 0.008) / 1.008 * np.pi / 2) ** 2
  steps = np.arange(num + 1) / num
  return np.minimum(1.0 - signal(steps[1:]) / signal(steps[:-1]), 0.999)


def _zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
  """Betas whose sqrt(a_t) is shifted and scaled so that the last step is pure noise and the
  first unchanged (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps Are
  Flawed").

  In float32 arithmetic as diffusers does it: near t = 0 the result is the small difference of
  float32 numbers, so its rounding shows at ~1e-6 in add_noise.
  """
  f32 = np.float32
  alphas = f32(1.0) - betas.astype(f32)
  root = np.sqrt(np.cumprod(alphas.astype(np.float64)).astype(f32))
  first, last = root[0], root[-1]
  root = (root - last) * (first / (first - last))
  alphas_cumprod = root * root
  alphas = np.append(alphas_cumprod[0], alphas_cumprod[1:] / alphas_cumprod[:-1])
  return f32(1.0) - alphas


def _per_sample(table: np.ndarray, timesteps: jax.Array, like: jax.Array) -> jax.Array:
  """table[timesteps] in float32, shaped to broadcast over the non-batch axes of `like`."""
  values = jnp.asarray(table, jnp.float32)[timesteps]
  return values.reshape(values.shape + (1,) * (like.ndim - values.ndim))


def add_noise(schedule: NoiseSchedule, latents: jax.Array, noise: jax.Array,
              timesteps: jax.Array) -> jax.Array:
  """x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) noise, for int timesteps [B] and latents [B, ...]."""
  signal = _per_sample(np.sqrt(schedule.alphas_cumprod), timesteps, latents)
  noise_scale = _per_sample(np.sqrt(1.0 - schedule.alphas_cumprod), timesteps, latents)
  return (signal * latents + noise_scale * noise).astype(latents.dtype)


def velocity(schedule: NoiseSchedule, latents: jax.Array, noise: jax.Array,
             timesteps: jax.Array) -> jax.Array:
  """v = sqrt(a_t) noise - sqrt(1 - a_t) x_0, the v-prediction target (Salimans & Ho 2022)."""
  signal = _per_sample(np.sqrt(schedule.alphas_cumprod), timesteps, latents)
  noise_scale = _per_sample(np.sqrt(1.0 - schedule.alphas_cumprod), timesteps, latents)
  return (signal * noise - noise_scale * latents).astype(latents.dtype)


def snr(schedule: NoiseSchedule, timesteps: jax.Array) -> jax.Array:
  """Signal-to-noise ratio a_t / (1 - a_t) per timestep, float32 [B] (for min-SNR weighting)."""
  alphas_cumprod = schedule.alphas_cumprod
  return jnp.asarray(alphas_cumprod / (1.0 - alphas_cumprod), jnp.float32)[timesteps]


def training_target(schedule: NoiseSchedule, latents: jax.Array, noise: jax.Array,
                    timesteps: jax.Array) -> jax.Array:
  """What the UNet learns to predict from x_t: the noise, v, or x_0 itself."""
  if schedule.prediction_type == "epsilon":
    return noise
  if schedule.prediction_type == "v_prediction":
    return velocity(schedule, latents, noise, timesteps)
  return latents


# --------------------------------------------------------------------------------------------
# Samplers.


def _at(table: np.ndarray, i: jax.Array | int) -> jax.Array:
  return jnp.asarray(table)[i]


def _float32(x: jax.Array) -> jax.Array:
  return jnp.asarray(x).astype(jnp.float32)


@dataclasses.dataclass(frozen=True, eq=False)
class Sampler:
  """A sampling method tabulated for a fixed number of steps.

  `step` and `scale_model_input` are pure and take the step index i (a Python or traced int),
  so the whole loop can run under jit. Steps compute in float32 and return the sample's dtype.
  """
  name: str
  prediction_type: str
  timesteps: np.ndarray  # [n]: the UNet's timestep at step i (int32; float32 for Euler).
  init_noise_sigma: float  # the initial noise is N(0, I) times this.

  @property
  def num_steps(self) -> int:
    return len(self.timesteps)

  @property
  def timesteps_jnp(self) -> jax.Array:
    return jnp.asarray(self.timesteps)

  def init_state(self, sample: jax.Array) -> Any:
    """What the method carries between steps (a pytree; empty for one-step methods)."""
    del sample
    return ()

  def scale_model_input(self, sample: jax.Array, i: jax.Array | int) -> jax.Array:
    del i
    return sample

  def step(self, state: Any, model_output: jax.Array, i: jax.Array | int, sample: jax.Array,
           key: jax.Array | None = None) -> tuple[jax.Array, Any]:
    """(the sample at step i + 1, the new state), from the UNet's output at step i.

    The ancestral samplers draw their noise as jax.random.normal(key, sample.shape, float32).
    """
    raise NotImplementedError


def _x0_and_eps(prediction_type: str, model_output: jax.Array, sample: jax.Array,
                signal: jax.Array, noise_scale: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The clean sample and the noise implied by the model's output, with x = signal x0 +
  noise_scale eps (signal = sqrt(a_t), noise_scale = sqrt(1 - a_t))."""
  if prediction_type == "epsilon":
    return (sample - noise_scale * model_output) / signal, model_output
  if prediction_type == "v_prediction":
    return (signal * sample - noise_scale * model_output,
            signal * model_output + noise_scale * sample)
  return model_output, (sample - signal * model_output) / noise_scale


@dataclasses.dataclass(frozen=True, eq=False)
class DDIMSampler(Sampler):
  """Deterministic DDIM (eta = 0): predict x0 and eps, then re-noise x0 to the previous level."""
  signal: np.ndarray  # [n] sqrt(a_t) at step i
  noise_scale: np.ndarray  # [n] sqrt(1 - a_t)
  prev_signal: np.ndarray  # [n] sqrt(a) of the level the step goes to
  prev_noise_scale: np.ndarray
  clip_range: float | None  # clip the predicted x0 to [-r, r] (clip_sample), or not

  def step(self, state, model_output, i, sample, key=None):
    del key
    x = _float32(sample)
    x0, eps = _x0_and_eps(self.prediction_type, _float32(model_output), x,
                          _at(self.signal, i), _at(self.noise_scale, i))
    if self.clip_range is not None:
      x0 = jnp.clip(x0, -self.clip_range, self.clip_range)
    prev = _at(self.prev_signal, i) * x0 + _at(self.prev_noise_scale, i) * eps
    return prev.astype(sample.dtype), state


@dataclasses.dataclass(frozen=True, eq=False)
class DDPMSampler(Sampler):
  """Ancestral DDPM: sample the posterior q(x_prev | x_t, x0) around the predicted x0."""
  signal: np.ndarray
  noise_scale: np.ndarray
  x0_coef: np.ndarray  # [n] the posterior mean is x0_coef x0 + sample_coef x_t
  sample_coef: np.ndarray
  noise_std: np.ndarray  # [n] the posterior's standard deviation (0 when t = 0)
  clip_range: float | None

  def step(self, state, model_output, i, sample, key=None):
    if key is None:
      raise ValueError("the ddpm sampler needs a PRNG key at every step")
    x = _float32(sample)
    x0, _ = _x0_and_eps(self.prediction_type, _float32(model_output), x,
                        _at(self.signal, i), _at(self.noise_scale, i))
    if self.clip_range is not None:
      x0 = jnp.clip(x0, -self.clip_range, self.clip_range)
    noise = jax.random.normal(key, sample.shape, jnp.float32)
    prev = _at(self.x0_coef, i) * x0 + _at(self.sample_coef, i) * x + _at(self.noise_std, i) * noise
    return prev.astype(sample.dtype), state


def _x0_from_sigma(prediction_type: str, model_output: jax.Array, sample: jax.Array,
                   sigma: jax.Array) -> jax.Array:
  """The clean sample in the variance-exploding parametrisation x = x0 + sigma eps, where the
  UNet saw x / sqrt(sigma^2 + 1)."""
  if prediction_type == "epsilon":
    return sample - sigma * model_output
  if prediction_type == "v_prediction":
    variance = sigma * sigma + 1.0
    return sample / variance - (sigma / jnp.sqrt(variance)) * model_output
  return model_output


@dataclasses.dataclass(frozen=True, eq=False)
class EulerSampler(Sampler):
  """Euler steps of the probability-flow ODE dx/dsigma = (x - x0) / sigma (Karras et al.)."""
  sigmas: np.ndarray  # [n + 1] float32, ending in 0
  input_scale: np.ndarray  # [n] 1 / sqrt(sigma^2 + 1): the UNet expects unit-variance input

  def scale_model_input(self, sample, i):
    return (_float32(sample) * _at(self.input_scale, i)).astype(sample.dtype)

  def step(self, state, model_output, i, sample, key=None):
    del key
    x = _float32(sample)
    sigma = _at(self.sigmas, i)
    x0 = _x0_from_sigma(self.prediction_type, _float32(model_output), x, sigma)
    prev = x + (x - x0) / sigma * (_at(self.sigmas, i + 1) - sigma)
    return prev.astype(sample.dtype), state


@dataclasses.dataclass(frozen=True, eq=False)
class EulerAncestralSampler(EulerSampler):
  """Euler down to sigma_down, then fresh noise of std sigma_up back up to the next level."""
  sigma_down: np.ndarray  # [n]
  sigma_up: np.ndarray  # [n]

  def step(self, state, model_output, i, sample, key=None):
    if key is None:
      raise ValueError("the euler_ancestral sampler needs a PRNG key at every step")
    x = _float32(sample)
    sigma = _at(self.sigmas, i)
    x0 = _x0_from_sigma(self.prediction_type, _float32(model_output), x, sigma)
    noise = jax.random.normal(key, sample.shape, jnp.float32)
    prev = (x + (x - x0) / sigma * (_at(self.sigma_down, i) - sigma)
            + _at(self.sigma_up, i) * noise)
    return prev.astype(sample.dtype), state


@dataclasses.dataclass(frozen=True, eq=False)
class DPMSolverSampler(Sampler):
  """DPM-Solver++(2M): multistep, second order in log-SNR, on the predicted x0.

  x_next = a x + b x0 + c (x0 - x0_prev), with a, b, c tabulated per step (c = 0 for the
  first-order steps: the first, the last, and any whose noise levels coincide).
  The state is the previous step's predicted x0.
  """
  signal: np.ndarray  # [n] alpha_s = 1 / sqrt(sigma^2 + 1)
  noise_scale: np.ndarray  # [n] sigma * alpha_s
  sample_coef: np.ndarray  # [n] a
  x0_coef: np.ndarray  # [n] b
  x0_change_coef: np.ndarray  # [n] c

  def init_state(self, sample):
    return jnp.zeros(sample.shape, jnp.float32)

  def step(self, state, model_output, i, sample, key=None):
    del key
    x = _float32(sample)
    x0, _ = _x0_and_eps(self.prediction_type, _float32(model_output), x,
                        _at(self.signal, i), _at(self.noise_scale, i))
    prev = (_at(self.sample_coef, i) * x + _at(self.x0_coef, i) * x0
            + _at(self.x0_change_coef, i) * (x0 - state))
    return prev.astype(sample.dtype), x0


# --------------------------------------------------------------------------------------------
# Tabulation on the host.

_DEFAULT_SPACING = {"ddim": "leading", "ddpm": "leading", "dpm": "linspace",
                    "dpm_karras": "linspace", "euler": "linspace", "euler_ancestral": "linspace"}


def _spaced_timesteps(spacing: str, num_train: int, num_steps: int, offset: int) -> np.ndarray:
  """float64 [n], descending and unrounded (diffusers' spacings of DDIM, DDPM and Euler)."""
  if spacing == "linspace":
    return np.linspace(0, num_train - 1, num_steps)[::-1]
  if spacing == "leading":
    return np.arange(num_steps)[::-1] * float(num_train // num_steps) + offset
  # trailing. Diffusers takes np.arange(T, 0, -T/n), which for some n (61, 103, ...) yields an
  # (n+1)-th value ~1e-13 and so a timestep of -1; we take the n values it means.
  return np.round(num_train - np.arange(num_steps) * (num_train / num_steps)) - 1


def _dpm_timesteps(spacing: str, num_train: int, num_steps: int, offset: int) -> np.ndarray:
  """DPM-Solver's spacings: n + 1 levels down to 0, the last (t = 0) dropped."""
  if spacing == "linspace":
    return np.round(np.linspace(0, num_train - 1, num_steps + 1))[::-1][:-1]
  if spacing == "leading":
    return np.arange(num_steps + 1)[::-1][:-1] * float(num_train // (num_steps + 1)) + offset
  return _spaced_timesteps("trailing", num_train, num_steps, offset)


def _lookup(table: np.ndarray, timesteps: np.ndarray) -> np.ndarray:
  """table[t] with t clamped to the table (leading spacing with steps_offset = 1 asks for
  t = T when n = T; diffusers fails there)."""
  return table[np.clip(timesteps.astype(np.int64), 0, len(table) - 1)]


def _clip_range(schedule: NoiseSchedule) -> float | None:
  # DDIM and DDPM clip the predicted x0 unless the config says otherwise (diffusers' default).
  clip = True if schedule.clip_sample is None else schedule.clip_sample
  return schedule.clip_sample_range if clip else None


def _f32(x) -> np.ndarray:
  return np.asarray(x, np.float32)


def _ddim(schedule: NoiseSchedule, num_steps: int, spacing: str) -> DDIMSampler:
  num_train = schedule.num_train_timesteps
  timesteps = np.round(_spaced_timesteps(spacing, num_train, num_steps, schedule.steps_offset))
  alphas_cumprod = schedule.alphas_cumprod
  # Diffusers' DDIM always steps back by T // n, whatever the spacing: for linspace, and for
  # trailing when n does not divide T, that is not the next timestep of the list.
  prev_timesteps = timesteps - num_train // num_steps
  set_alpha_to_one = True if schedule.set_alpha_to_one is None else schedule.set_alpha_to_one
  final = 1.0 if set_alpha_to_one else alphas_cumprod[0]
  alpha = _lookup(alphas_cumprod, timesteps)
  prev_alpha = np.where(prev_timesteps >= 0, _lookup(alphas_cumprod, prev_timesteps), final)
  return DDIMSampler(
      name="ddim", prediction_type=schedule.prediction_type,
      timesteps=timesteps.astype(np.int32), init_noise_sigma=1.0,
      signal=_f32(np.sqrt(alpha)), noise_scale=_f32(np.sqrt(1 - alpha)),
      prev_signal=_f32(np.sqrt(prev_alpha)), prev_noise_scale=_f32(np.sqrt(1 - prev_alpha)),
      clip_range=_clip_range(schedule))


def _ddpm(schedule: NoiseSchedule, num_steps: int, spacing: str) -> DDPMSampler:
  num_train = schedule.num_train_timesteps
  timesteps = np.round(_spaced_timesteps(spacing, num_train, num_steps, schedule.steps_offset))
  alpha = _lookup(schedule.alphas_cumprod, timesteps)
  # DDPM goes to the next timestep of the list, and to a clean sample (a = 1) after the last.
  prev_alpha = np.append(alpha[1:], 1.0)
  step_alpha = alpha / prev_alpha  # 1 - beta of the (possibly multi-step) jump
  step_beta = 1.0 - step_alpha
  variance = np.maximum((1.0 - prev_alpha) / (1.0 - alpha) * step_beta, 1e-20)
  variance_type = schedule.variance_type or "fixed_small"
  noise_var = step_beta if variance_type == "fixed_large" else variance
  # fixed_small_log differs only in computing the same std as exp(log(var) / 2).
  noise_std = np.where(timesteps > 0, np.sqrt(noise_var), 0.0)
  return DDPMSampler(
      name="ddpm", prediction_type=schedule.prediction_type,
      timesteps=timesteps.astype(np.int32), init_noise_sigma=1.0,
      signal=_f32(np.sqrt(alpha)), noise_scale=_f32(np.sqrt(1 - alpha)),
      x0_coef=_f32(np.sqrt(prev_alpha) * step_beta / (1.0 - alpha)),
      sample_coef=_f32(np.sqrt(step_alpha) * (1.0 - prev_alpha) / (1.0 - alpha)),
      noise_std=_f32(noise_std), clip_range=_clip_range(schedule))


def _euler(schedule: NoiseSchedule, num_steps: int, spacing: str,
           ancestral: bool) -> EulerSampler:
  num_train = schedule.num_train_timesteps
  timesteps = _spaced_timesteps(spacing, num_train, num_steps, schedule.steps_offset)
  if spacing != "linspace":
    timesteps = np.round(timesteps)
  timesteps = timesteps.astype(np.float32)  # fractional for linspace: the UNet gets them so
  # Noise levels at fractional timesteps are interpolated linearly in sigma (np.interp also
  # clamps a t = T from leading spacing to the last level, as in diffusers).
  sigmas = np.append(np.interp(timesteps, np.arange(num_train), schedule.sigmas()), 0.0)
  sigmas = sigmas.astype(np.float32)
  s = sigmas.astype(np.float64)
  max_sigma = s.max()
  # Diffusers scales the initial noise to sqrt(sigma_max^2 + 1) for leading spacing only.
  init_noise_sigma = max_sigma if spacing != "leading" else math.sqrt(max_sigma ** 2 + 1)
  common = dict(name="euler_ancestral" if ancestral else "euler",
                prediction_type=schedule.prediction_type, timesteps=timesteps,
                init_noise_sigma=float(np.float32(init_noise_sigma)), sigmas=sigmas,
                input_scale=_f32(1.0 / np.sqrt(s[:-1] ** 2 + 1.0)))
  if not ancestral:
    return EulerSampler(**common)
  sigma_from, sigma_to = s[:-1], s[1:]
  sigma_up = np.sqrt(sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2)
  sigma_down = np.sqrt(sigma_to ** 2 - sigma_up ** 2)
  return EulerAncestralSampler(**common, sigma_down=_f32(sigma_down), sigma_up=_f32(sigma_up))


def _karras_sigmas(sigmas: np.ndarray, num_steps: int) -> np.ndarray:
  """Karras et al. (2022) levels: uniform in sigma^(1/7) from the largest to the smallest."""
  rho = 7.0
  largest, smallest = sigmas[-1] ** (1 / rho), sigmas[0] ** (1 / rho)
  levels = (largest + np.linspace(0, 1, num_steps) * (smallest - largest)) ** rho
  levels[0] = sigmas[-1]  # exactly, so that their timesteps come out whole (T - 1 and 0)
  if num_steps > 1:
    levels[-1] = sigmas[0]
  return levels


def _dpm(schedule: NoiseSchedule, num_steps: int, spacing: str,
         karras: bool) -> DPMSolverSampler:
  num_train = schedule.num_train_timesteps
  train_sigmas = schedule.sigmas()
  if karras:
    sigmas = _karras_sigmas(train_sigmas, num_steps)
    # The UNet's timestep for each level: interpolated in log sigma over the training levels,
    # then rounded; diffusers truncates instead for squaredcos_cap_v2 (where its float32 logs
    # also turn the first timestep T - 1 into T - 2: ours stays T - 1).
    timesteps = np.interp(np.log(sigmas), np.log(train_sigmas), np.arange(num_train))
    if schedule.beta_schedule != "squaredcos_cap_v2":
      timesteps = np.round(timesteps)
  else:
    timesteps = _dpm_timesteps(spacing, num_train, num_steps, schedule.steps_offset)
    sigmas = np.interp(timesteps, np.arange(num_train), train_sigmas)
  # The levels are float32 in diffusers; everything below derives from those values.
  s = np.append(sigmas, 0.0).astype(np.float32).astype(np.float64)
  signal = 1.0 / np.sqrt(s ** 2 + 1.0)
  noise_scale = s * signal
  with np.errstate(divide="ignore"):
    log_snr = -np.log(s)  # lambda = log(signal / noise_scale); +inf at the final sigma = 0
  sample_coef = np.zeros(num_steps)
  x0_coef = np.zeros(num_steps)
  x0_change_coef = np.zeros(num_steps)
  for i in range(num_steps):
    if s[i + 1] == 0:  # the jump to the clean sample: x_next = x0
      x0_coef[i] = 1.0
      continue
    h = log_snr[i + 1] - log_snr[i]
    sample_coef[i] = noise_scale[i + 1] / noise_scale[i]
    x0_coef[i] = -signal[i + 1] * np.expm1(-h)
    previous_h = log_snr[i] - log_snr[i - 1] if i > 0 else 0.0
    # Second order (midpoint) except at the first step and the last (lower_order_final with
    # a final sigma of zero, diffusers' default); also first order where a level repeats.
    if i > 0 and i < num_steps - 1 and h != 0 and previous_h != 0:
      x0_change_coef[i] = 0.5 * x0_coef[i] * h / previous_h
  return DPMSolverSampler(
      name="dpm_karras" if karras else "dpm", prediction_type=schedule.prediction_type,
      timesteps=timesteps.astype(np.int32), init_noise_sigma=1.0,
      signal=_f32(signal[:-1]), noise_scale=_f32(noise_scale[:-1]),
      sample_coef=_f32(sample_coef), x0_coef=_f32(x0_coef), x0_change_coef=_f32(x0_change_coef))


def make_sampler(name: str, schedule: NoiseSchedule, num_inference_steps: int) -> Sampler:
  """The sampler `name` (one of SAMPLERS) for `num_inference_steps` steps of `schedule`."""
  if name not in SAMPLERS:
    raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
  num_train = schedule.num_train_timesteps
  if not 1 <= num_inference_steps <= num_train:
    raise ValueError(f"num_inference_steps={num_inference_steps} must be between 1 and the "
                     f"model's num_train_timesteps ({num_train})")
  spacing = schedule.timestep_spacing or _DEFAULT_SPACING[name]
  if name == "ddim":
    return _ddim(schedule, num_inference_steps, spacing)
  if name == "ddpm":
    return _ddpm(schedule, num_inference_steps, spacing)
  if name in ("euler", "euler_ancestral"):
    return _euler(schedule, num_inference_steps, spacing, ancestral=name == "euler_ancestral")
  return _dpm(schedule, num_inference_steps, spacing, karras=name == "dpm_karras")
