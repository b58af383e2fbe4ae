"""DreamBooth fine-tuning of Stable Diffusion in JAX/Flax, sharded over any number of devices."""
