"""The shipped configs carry the paper's recipe, as the README's "The recipe" states it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common, demo, sd15, sd21
from dreambooth_jax.training import step as train_step


@pytest.mark.parametrize("module", [common, sd15, sd21], ids=["common", "sd15", "sd21"])
def test_the_defaults_are_the_papers_recipe(module):
  config = module.get_config()
  assert config.train.with_prior_preservation is True
  assert config.train.prior_loss_weight == 1.0  # λ = 1
  assert config.train.learning_rate == 5e-6
  assert config.train.train_text_encoder is False  # the UNet alone, the paper's main variant
  # Plain MSE on the model's target: no min-SNR weighting, no offset noise.
  assert (config.train.min_snr_gamma, config.train.offset_noise) == (0.0, 0.0)
  assert config.data.class_prompt == "a photo of {class}"
  if module is not common:
    assert config.data.num_class_images == 200
    assert 800 <= config.train.steps <= 1000


def test_the_optimizer_is_adamw_at_5e_6_on_every_unet_weight():
  """One step of sd15.py's optimizer on a toy tree: Adam's first step moves every weight by
  lr·sign(g) (|g| ≫ eps; global norm 0.35, not clipped), and decoupled weight decay by
  lr·wd·p."""
  config = sd15.get_config().train
  assert train_step.trainable_names(config.train_text_encoder) == ("unet",)
  params = {"unet": {"conv": {"kernel": jnp.zeros((3, 4))},
                     "block": {"bias": jnp.ones((5,)), "scale": jnp.full((2,), 2.0)}}}
  grads = {"unet": {"conv": {"kernel": jnp.full((3, 4), -0.1)},
                    "block": {"bias": jnp.zeros((5,)), "scale": jnp.zeros((2,))}}}
  optimizer = train_step.make_optimizer(config)
  updates, _ = optimizer.update(grads, optimizer.init(params), params)
  lr, wd = 5e-6, config.weight_decay
  np.testing.assert_allclose(updates["unet"]["conv"]["kernel"], np.full((3, 4), lr), rtol=1e-5)
  np.testing.assert_allclose(updates["unet"]["block"]["bias"], np.full((5,), -lr * wd),
                             rtol=1e-6)
  np.testing.assert_allclose(updates["unet"]["block"]["scale"], np.full((2,), -2 * lr * wd),
                             rtol=1e-6)
  assert all(np.all(leaf != 0) for leaf in jax.tree.leaves(updates))


def test_the_demo_config_is_the_run_the_readme_describes():
  """What "What the demo does" promises of configs/demo.py (its CLI run, shortened, is
  tests/test_train.py's)."""
  config = demo.get_config()
  assert (config.model.pretrained, config.data.instance_dir) == (
      "builtin:toyworld", "builtin:toyworld-subject")
  assert config.data.num_class_images == 64 and config.data.class_prompt == "a {class}"
  assert config.train.steps == 600 and config.train.with_prior_preservation
  assert config.train.train_text_encoder and config.train.text_encoder_steps == 0
  assert (config.data.identifier, config.data.class_name) == ("sks", "ball")
  assert config.data.instance_prompt == "a {identifier} {class}"  # "a sks ball"
  assert config.sample.prompts == (
      "a {identifier} {class} on the beach", "a {identifier} {class} in the snow",
      "a {identifier} {class} at night", "a {identifier} {class} on grass", "a {class}")
  assert config.export.single_file
