"""Stable Diffusion 2.1 at 768 px; v-prediction is read from the model's scheduler config.

Set data.instance_dir, data.instance_prompt and data.class_prompt as for sd15.py.
"""

from configs import common


def get_config():
  config = common.get_config()
  config.model.pretrained = "stabilityai/stable-diffusion-2-1"
  config.model.dtype = "bfloat16"
  config.data.resolution = 768
  config.data.num_class_images = 200
  config.train.steps = 800
  config.train.batch_size = 1
  config.train.learning_rate = 5e-6
  config.sample.prompts = ("a photo of sks dog on the beach",)
  return config
