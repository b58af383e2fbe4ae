"""The sampling loop's noise: image k of a seed starts from the same latents however many
images are drawn with it and wherever it sits in the batch."""

import numpy as np

from dreambooth_jax import sharding
from dreambooth_jax.models import sampling


def test_image_k_starts_from_the_same_noise_in_any_batch():
  shape = (4, 2, 2)
  three = np.asarray(sampling.initial_noise(sampling.image_keys(7, np.arange(3)), shape))
  two = np.asarray(sampling.initial_noise(sampling.image_keys(7, np.arange(2)), shape))
  np.testing.assert_array_equal(three[:2], two)
  shuffled = np.asarray(sampling.initial_noise(sampling.image_keys(7, np.asarray([2, 0])), shape))
  np.testing.assert_array_equal(shuffled, three[[2, 0]])
  other_seed = np.asarray(sampling.initial_noise(sampling.image_keys(8, np.arange(3)), shape))
  assert not np.allclose(other_seed, three)
  assert not np.allclose(three[0], three[1])  # images differ from each other


def test_the_same_settings_give_the_same_jitted_sampler(tiny):
  """A run's class images, validation grids and samples share one trace when their settings
  match (the tests' runs all sample with 2 DDIM steps)."""
  components, _ = tiny
  mesh = sharding.make_mesh()
  first = sampling.make_sampler(components, mesh, 32, "ddim", 2, 7.5)
  assert sampling.make_sampler(components, mesh, 32, "ddim", 2, 7.5) is first
  assert sampling.make_sampler(components, mesh, 32, "ddim", 3, 7.5) is not first
  assert sampling.make_sampler(components, mesh, 32, "ddim", 2, 5.0) is not first
  assert sampling.make_sampler(components, mesh, 32, "ddim", 2, 7.5, as_uint8=False) is not first
