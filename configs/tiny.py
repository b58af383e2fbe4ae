"""A tiny random-init pipeline: the tests' and benchmarks' config, no download, seconds a step.

A tiny random-init Stable-Diffusion-shaped pipeline (built and cached on first use) is
fine-tuned on five procedurally drawn photos of a checkered toy, with prior preservation on
class images that the frozen model generates first. The images it makes are noise-like: the
model is random, the point is that every stage runs for real and fast. The demo
(`configs/demo.py`) uses the pretrained toy-world model instead.
"""

from configs import common


def get_config():
  config = common.get_config()
  config.model.pretrained = "builtin:tiny-sd"
  config.data.instance_dir = "builtin:demo-toy"
  config.data.class_name = "toy"
  config.data.num_class_images = 8
  config.data.resolution = 32
  config.data.random_flip = True
  config.class_images.num_inference_steps = 10
  config.class_images.batch_size = 8
  config.train.steps = 60
  config.train.batch_size = 2
  config.train.learning_rate = 1e-4
  config.train.warmup_steps = 5
  config.checkpoint.every_steps = 20
  config.log.every_steps = 5
  config.sample.prompts = ("a photo of {identifier} {class} on the beach",)
  config.sample.num_images = 4
  config.sample.num_inference_steps = 10
  return config
