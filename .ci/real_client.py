"""The real client: the newest diffusers release (PyTorch, CPU) loads what the demo exported,
with its plain loaders, and samples from it. Run in a virtual environment of its own."""

import sys

import diffusers
import numpy as np
import torch
import transformers

export_dir, single_file = sys.argv[1], sys.argv[2]
print(f"diffusers {diffusers.__version__}, transformers {transformers.__version__}, "
      f"torch {torch.__version__}")
pipe = diffusers.StableDiffusionPipeline.from_pretrained(export_dir)
image = pipe("a sks ball on the beach", num_inference_steps=5, guidance_scale=4.0, height=32,
             width=32, output_type="np", generator=torch.Generator().manual_seed(0)).images
assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all(), image.shape
single = diffusers.StableDiffusionPipeline.from_single_file(single_file, config=export_dir,
                                                            local_files_only=True)
for name in ("unet", "vae", "text_encoder"):
  ours, theirs = getattr(pipe, name).state_dict(), getattr(single, name).state_dict()
  for key, value in ours.items():
    np.testing.assert_allclose(theirs[key].float().numpy(), value.float().numpy(),
                               rtol=1e-3, atol=1e-3, err_msg=f"{name}.{key}")
print(f"real client: from_pretrained({export_dir}) sampled {image.shape}; from_single_file("
      f"{single_file}) holds the same weights (float16)")
