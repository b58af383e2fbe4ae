"""Stable Diffusion 1.5 at 512 px with the paper's recipe (lr 5e-6, λ = 1, prior preservation).

Set at least data.instance_dir and data.class_name, e.g.
  --config.data.instance_dir=/data/dog --config.data.class_name=dog
The prompts default to "a photo of {identifier} {class}" and "a photo of {class}".
"""

from configs import common


def get_config():
  config = common.get_config()
  config.model.pretrained = "stable-diffusion-v1-5/stable-diffusion-v1-5"
  config.model.dtype = "bfloat16"
  config.data.resolution = 512
  config.data.num_class_images = 200
  config.train.steps = 800
  config.train.batch_size = 1
  config.train.learning_rate = 5e-6
  config.train.prior_loss_weight = 1.0
  config.sample.prompts = ("a photo of {identifier} {class} on the beach",
                           "a photo of {identifier} {class} in the snow", "a photo of {class}")
  return config
