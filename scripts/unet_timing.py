"""Times the tiny UNet's forward and forward + backward pass on one CPU device.

  python scripts/unet_timing.py                  # our attention ("xla": heads before length)
  python scripts/unet_timing.py --jax_attention  # jax.nn.dot_product_attention's XLA path

Batch 8 of 16x16 latents with 77 context tokens; the median of 5 rounds of 10 calls each.
"""

import os
import sys
import tempfile
import time

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402  pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # noqa: E402  pylint: disable=g-import-not-at-top
import numpy as np  # noqa: E402  pylint: disable=g-import-not-at-top

from dreambooth_jax import models  # noqa: E402  pylint: disable=g-import-not-at-top
from dreambooth_jax.models import unet as unet_lib  # noqa: E402  pylint: disable=g-import-not-at-top

BATCH, LATENT, TOKENS, ROUNDS, CALLS = 8, 16, 77, 5, 10


def main() -> None:
  if "--jax_attention" in sys.argv:
    unet_lib.dot_product_attention = (
        lambda q, k, v, **_: jax.nn.dot_product_attention(q, k, v, implementation=None))
  with tempfile.TemporaryDirectory() as scratch:
    components, params = models.load_pretrained(models.build_tiny_pipeline(scratch + "/tiny"))
  rng = np.random.default_rng(0)
  latents = jnp.asarray(rng.standard_normal((BATCH, 4, LATENT, LATENT)), jnp.float32)
  timesteps = jnp.arange(BATCH) * 100
  context = jnp.asarray(
      rng.standard_normal((BATCH, TOKENS, components.text_encoder.hidden_size)), jnp.float32)

  def loss(unet_params):
    return jnp.mean(components.unet.apply({"params": unet_params}, latents, timesteps,
                                          context) ** 2)

  for name, fn in (("forward", jax.jit(loss)),
                   ("forward + backward", jax.jit(jax.value_and_grad(loss)))):
    jax.block_until_ready(fn(params["unet"]))
    rounds = []
    for _ in range(ROUNDS):
      start = time.perf_counter()
      for _ in range(CALLS):
        result = fn(params["unet"])
      jax.block_until_ready(result)
      rounds.append((time.perf_counter() - start) / CALLS)
    print(f"{name}: {np.median(rounds) * 1e3:.1f} ms (min {min(rounds) * 1e3:.1f} ms)")


if __name__ == "__main__":
  main()
