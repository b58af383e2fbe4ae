"""Our own Flax Stable Diffusion: networks, tokenizer, schedulers and the PyTorch world's weight
formats (see builtin.py for resolving and loading model.pretrained and the models that need
no download, pipeline.py for reading and exporting pipeline folders).

The names below are the package's public surface; the modules hold one idea each:
unet, vae, clip_text, attention (networks); tokenizer; schedulers (noise schedule, samplers);
weights (diffusers-layout safetensors), single_file (original-layout checkpoints);
vit, clip_vision (evaluation networks); pipeline (Components, read, export); builtin (resolve
and load; builtin models).
"""

from dreambooth_jax.errors import ModelLoadError
from dreambooth_jax.models.pipeline import (COMPONENTS, Components, architecture_configs,
                                            export_pipeline, is_hub_id, local_dir)
from dreambooth_jax.models.builtin import (MODELS as BUILTIN_MODELS, PREFIX as BUILTIN_PREFIX,
                                           TINY as BUILTIN_TINY, TINY_WORDS,
                                           TOYWORLD as BUILTIN_TOYWORLD, build_tiny_pipeline,
                                           check_pretrained, load_configured, load_pretrained,
                                           load_tokenizer, local_vae_scale_factor,
                                           resolve_pretrained, tiny_text_config)
from dreambooth_jax.models.tokenizer import ClipTokenizer, build_word_tokenizer
