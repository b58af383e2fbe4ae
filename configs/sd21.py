"""Stable Diffusion 2.1 at 768 px: sd15.py's recipe on another model.

v-prediction is read from the model's scheduler config, nothing to set here. Set
data.instance_dir and data.class_name as for sd15.py.
"""

from configs import sd15


def get_config():
  config = sd15.get_config()
  config.model.pretrained = "stabilityai/stable-diffusion-2-1"
  config.data.resolution = 768
  return config
