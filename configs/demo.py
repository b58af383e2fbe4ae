"""The embedded demo: DreamBooth on the toy world, no download, a few minutes on 2 CPU cores.

The base model is the tiny text-to-image model pretrained on the toy world and shipped in the
package (`builtin:toyworld`, see dreambooth_jax/toyworld/pretrain.py): it draws 32x32 pictures
of balls, boxes, trees and cups of six colours in five scenes, following their captions. The
subject is the world's one orange-and-teal striped ball, of which 4 photos exist, all in a room
(`builtin:toyworld-subject`). The run generates class images of "a ball" with the frozen
model, fine-tunes every UNet layer and the text encoder on "a sks ball" with prior
preservation, exports the pipeline and samples the subject in the four scenes it was never
photographed in, plus "a ball" (which should stay a plain ball of any colour).
"""

from configs import common


def get_config():
  config = common.get_config()
  config.model.pretrained = "builtin:toyworld"
  config.data.instance_dir = "builtin:toyworld-subject"
  config.data.class_name = "ball"
  config.data.identifier = "sks"
  # The pretraining captions' grammar: "a [V] ball", "a ball" (no "photo of").
  config.data.instance_prompt = "a {identifier} {class}"
  config.data.class_prompt = "a {class}"
  config.data.num_class_images = 64
  config.data.resolution = 32
  config.data.random_flip = True
  config.class_images.num_inference_steps = 25
  config.class_images.guidance_scale = 4.0
  config.class_images.batch_size = 32
  config.train.steps = 600
  config.train.batch_size = 4
  # A tiny model trained from scratch takes a larger step than SD's 5e-6. The text encoder is
  # tuned too (the paper's optional variant): with it frozen, the 3-layer encoder's "a sks
  # ball" stays too close to "a ball" for prior preservation to let the UNet tell them apart
  # in 600 steps (measured: subject similarity 0.39 after 1500 steps frozen, 0.54 after 600
  # tuned).
  config.train.learning_rate = 3e-4
  config.train.train_text_encoder = True
  config.train.warmup_steps = 20
  config.checkpoint.every_steps = 200
  config.log.every_steps = 10
  # workdir/export.safetensors too: the one-file form ComfyUI and A1111 load.
  config.export.single_file = True
  config.sample.prompts = (
      "a {identifier} {class} on the beach", "a {identifier} {class} in the snow",
      "a {identifier} {class} at night", "a {identifier} {class} on grass", "a {class}")
  config.sample.num_images = 8
  config.sample.num_inference_steps = 25
  config.sample.guidance_scale = 4.0
  return config
