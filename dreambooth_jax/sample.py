"""Sampling CLI: prompts → PNG files plus one grid, from an exported (or any) pipeline.

python -m dreambooth_jax.sample --pipeline=/tmp/run/export \
    --prompt="a photo of sks toy on the beach" --num_images=4 --out=/tmp/run/samples
"""

from dreambooth_jax import quiet  # noqa: F401  pylint: disable=unused-import

import os
import sys

from absl import app, flags

from dreambooth_jax import cli_errors, compilation_cache, models, sharding
from dreambooth_jax.models import sampling, schedulers

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defined only when run as a program, so that importing this module adds no flags."""
  flags.DEFINE_string("pipeline", None, "Exported pipeline directory, hub id or builtin name.")
  flags.DEFINE_multi_string("prompt", None, "Prompt to sample; repeat the flag for several.")
  flags.DEFINE_integer("num_images", 4, "Images per prompt.")
  flags.DEFINE_string("out", None, "Output folder for prompt<i>_<k>.png, grid.png, prompts.json.")
  flags.DEFINE_integer("seed", 0, "Seed; image k of a prompt always starts from the same noise.")
  flags.DEFINE_enum("scheduler", "ddim", sorted(schedulers.SAMPLERS), "Sampler.")
  flags.DEFINE_integer("steps", 50, "Denoising steps.")
  flags.DEFINE_float("guidance_scale", 7.5, "Classifier-free guidance scale.")
  flags.DEFINE_integer("resolution", 0, "Image size in px; 0 = the UNet's native sample size.")
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"], "Compute dtype.")
  flags.mark_flags_as_required(["pipeline", "prompt", "out"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  for name in ("num_images", "steps"):
    if FLAGS[name].value < 1:
      raise app.UsageError(f"--{name} must be >= 1")
  compilation_cache.enable()
  with cli_errors.one_line_errors():
    components, params = models.load_pretrained(FLAGS.pipeline, dtype=FLAGS.dtype)
    resolution = sampling.sample_resolution(components, FLAGS.resolution)
    mesh = sharding.make_mesh()
    sampling.write_samples(components, sharding.put_replicated(params, mesh), mesh, FLAGS.prompt,
                           FLAGS.num_images, FLAGS.out, resolution, FLAGS.scheduler,
                           FLAGS.steps, FLAGS.guidance_scale, FLAGS.seed)
  print(f"Wrote {len(FLAGS.prompt) * FLAGS.num_images} images and "
        f"{os.path.join(FLAGS.out, 'grid.png')}", file=sys.stderr)


if __name__ == "__main__":
  define_flags()
  app.run(main)
