"""The base config every run starts from; each field is documented where it is set.

Override any field from the command line: `--config.train.steps=400`. Fields not defined here
are rejected before any work starts.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  # Seed of everything random: parameter-free data order, crops, flips, noise, timesteps.
  config.seed = 0
  # Resuming a workdir with a config whose math differs from the one it was started with
  # (model, data, resolution, batch size, λ, learning rate, ...) is refused, naming the fields;
  # true accepts the new values from the restored step on. train.steps, checkpoint.*, log.*,
  # sample.* and class_images.batch_size may always change.
  config.resume_ignore_changes = False

  config.model = ml_collections.ConfigDict()
  # Hub id ("runwayml/stable-diffusion-v1-5"), a local diffusers-layout directory, one
  # .safetensors file in the original Stable Diffusion layout (SD 1.x/2.x; see
  # single_file_config),
  # "builtin:toyworld" (the toy-world model shipped in the package; the demo's) or
  # "builtin:tiny-sd" (a tiny random pipeline built on first use; tests and benchmarks).
  config.model.pretrained = "builtin:tiny-sd"
  # Hub revision (branch, tag or commit); "" for the default branch. Ignored for local dirs.
  config.model.revision = ""
  # Compute dtype of the UNet, VAE and text encoder: "float32", "bfloat16" or "float16".
  # Trained parameters and optimizer state always stay float32.
  config.model.dtype = "float32"
  # Weight-file variant to read ("fp16" reads diffusion_pytorch_model.fp16.safetensors etc.);
  # "" for the full-precision files. Weights are float32 in memory either way.
  config.model.variant = ""
  # For a single-file model.pretrained (one .safetensors in the original SD layout): a
  # diffusers folder whose configs and tokenizer describe it (as diffusers' from_single_file
  # config=); "" = the shipped SD 1.5 / 2.1 architecture of its family, with the CLIP
  # tokenizer folder beside the file as tokenizer/.
  config.model.single_file_config = ""
  # Attention implementation: "xla" (jax.nn.dot_product_attention; XLA picks the kernel),
  # "cudnn" (cuDNN flash attention; GPU with bfloat16/float16 only) or "chunked" (our
  # memory-efficient attention in query and key chunks: less memory at high resolution).
  config.model.attention = "xla"
  # The older switch for attention="chunked" (true overrides model.attention).
  config.model.memory_efficient_attention = False

  config.distributed = ml_collections.ConfigDict()
  # Multi-host runs (the same command on every host). Nothing to set on a Cloud TPU pod slice
  # (found automatically) or on one host. Elsewhere: the coordinator's "host:port", the
  # number of processes and this one's id (or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
  # JAX_PROCESS_ID in the environment); -1 / 0 = from the environment.
  config.distributed.coordinator_address = ""
  config.distributed.num_processes = 0
  config.distributed.process_id = -1

  config.mesh = ml_collections.ConfigDict()
  # The device mesh is data × fsdp. Batches are split over all devices; parameters, optimizer
  # state and frozen weights are replicated (fsdp = 1) or split along fsdp (for models too big
  # for one device). data = 0 takes all devices that fsdp leaves. Same numbers on any shape.
  config.mesh.data = 0
  config.mesh.fsdp = 1

  config.data = ml_collections.ConfigDict()
  # Folder of 3-5 subject photos (jpg, jpeg, png, webp): a local path, a gs://bucket/dir (read
  # through fsspec; needs `pip install -e ".[gcs]"`), or a builtin drawn on first use:
  # "builtin:toyworld-subject" (the demo's striped ball) or "builtin:demo-toy" (tests).
  config.data.instance_dir = ""
  # Prompt for every instance photo. {identifier} and {class} are replaced by data.identifier
  # and data.class_name; the prompt must name the identifier (placeholder or literally).
  config.data.instance_prompt = "a photo of {identifier} {class}"
  # The rare token that names the subject, or "auto": a rare 2-3 letter token of the model's
  # vocabulary picked from the seed (paper §3.2; `python -m dreambooth_jax.identifiers` lists
  # candidates). The one used is written to workdir/prompts.json.
  config.data.identifier = "sks"
  # The class noun of the subject ("dog"), for {class}.
  config.data.class_name = "dog"
  # Folder of class (prior-preservation) images; missing ones are generated into it.
  # "" means workdir/class_images.
  config.data.class_dir = ""
  # Prompt of the class images, without the identifier ({class} = data.class_name).
  config.data.class_prompt = "a photo of {class}"
  # How many class images to train with (generated if class_dir holds fewer).
  config.data.num_class_images = 200
  # Training image size in pixels (a multiple of 8, or of the VAE's downsampling factor).
  config.data.resolution = 512
  # Crop the resized image at its centre (true) or at a random place per step (false).
  config.data.center_crop = True
  # Flip each training image horizontally with probability 1/2.
  config.data.random_flip = False

  config.class_images = ml_collections.ConfigDict()
  # Sampler and steps used to generate missing class images with the frozen model.
  config.class_images.scheduler = "ddim"
  config.class_images.num_inference_steps = 50
  config.class_images.guidance_scale = 7.5
  # Images generated per batch (over all devices; rounded up to a multiple of the device count).
  config.class_images.batch_size = 8

  config.train = ml_collections.ConfigDict()
  # Optimizer steps.
  config.train.steps = 800
  # Instance images per step; as many class images are added when prior preservation is on.
  # The global batch is padded with zero-weight rows to a multiple of the device count.
  config.train.batch_size = 1
  # Peak learning rate of AdamW (the paper uses 5e-6 for Stable Diffusion).
  config.train.learning_rate = 5e-6
  # "constant", "linear" (decay to 0) or "cosine" (decay to 0), after warmup.
  config.train.lr_schedule = "constant"
  # Linear warmup steps from 0 to learning_rate.
  config.train.warmup_steps = 0
  # Add λ · prior loss on class images (the paper's class-specific prior preservation).
  config.train.with_prior_preservation = True
  # λ, the weight of the prior-preservation loss (the paper uses 1).
  config.train.prior_loss_weight = 1.0
  # Also fine-tune the CLIP text encoder (the paper's optional variant).
  config.train.train_text_encoder = False
  # Peak learning rate of the text encoder (same schedule shape); 0 = train.learning_rate.
  config.train.text_encoder_learning_rate = 0.0
  # Train the text encoder for the first this-many steps only, then freeze it; 0 = all steps.
  config.train.text_encoder_steps = 0
  # Min-SNR-γ loss weighting (Hang et al. 2023): each example's MSE is weighted by
  # min(SNR(t), γ)/SNR(t) (ε-prediction) or min(SNR(t), γ)/(SNR(t)+1) (v-prediction);
  # 0 = off, the paper's plain MSE. 5 is the usual value.
  config.train.min_snr_gamma = 0.0
  # Offset noise: adds this times per-(example, channel) constant Gaussian noise to the noise,
  # which lets the model learn very dark or bright images; 0 = off (the paper). 0.1 is usual.
  config.train.offset_noise = 0.0
  # Global-norm gradient clipping threshold.
  config.train.max_grad_norm = 1.0
  # AdamW hyper-parameters.
  config.train.adam_b1 = 0.9
  config.train.adam_b2 = 0.999
  config.train.adam_eps = 1e-8
  config.train.weight_decay = 1e-2
  # A non-finite loss or gradient stops the run, naming the step, and keeps the last good
  # checkpoint. true instead skips such steps (no update) and counts them in the metric
  # `nonfinite_steps`.
  config.train.skip_nonfinite_steps = False
  # dtype of the trained parameters (the fp32 master weights) and of AdamW's moments:
  # "float32", or "bfloat16" to halve their memory at some cost in precision.
  config.train.param_dtype = "float32"
  # Speed and memory levers; none changes the loss beyond float rounding.
  # Encode every instance and class image with the VAE once before training (both flips when
  # data.random_flip) and sample each step's latent from the cached mean and std. Needs
  # data.center_crop (random crops are encoded every step).
  config.train.cache_latents = True
  # Embed the instance and class prompts once when the text encoder is frozen.
  config.train.cache_text_embeddings = True
  # Split each step's batch into this many micro-batches run one after another, summing their
  # gradients: the same update as the whole batch, in less memory.
  config.train.grad_accum_steps = 1
  # Gradient checkpointing: recompute the activations of each UNet ResNet and transformer
  # block in the backward pass instead of keeping them (less memory, ~30% more compute).
  config.train.remat = False
  # Batches built on a background thread and put on the devices this many steps ahead of the
  # step that uses them; 0 = built in the loop.
  config.train.prefetch_batches = 2

  config.checkpoint = ml_collections.ConfigDict()
  # Save an Orbax checkpoint every this many steps (and always at the end).
  config.checkpoint.every_steps = 200
  # Checkpoints kept on disk (the newest ones).
  config.checkpoint.max_to_keep = 2

  config.log = ml_collections.ConfigDict()
  # Write a metrics.jsonl row / TensorBoard scalars every this many steps (and the last step).
  config.log.every_steps = 10

  config.eval = ml_collections.ConfigDict()
  # Every this many steps, sample eval.prompts with the current weights and save a grid in
  # workdir/eval/step_<N>.png and to TensorBoard; 0 = never.
  config.eval.every_steps = 0
  # Validation prompts ({identifier}/{class} are filled); () = sample.prompts.
  config.eval.prompts = ()
  config.eval.num_images = 2
  config.eval.scheduler = "ddim"
  config.eval.num_inference_steps = 25
  config.eval.guidance_scale = 7.5

  config.export = ml_collections.ConfigDict()
  # workdir/export is a diffusers PyTorch-layout pipeline of float32 safetensors; also write
  # float16 copies as the "fp16" variant (from_pretrained(export, variant="fp16")).
  config.export.fp16_variant = False
  # Also write workdir/export.safetensors: one float16 file in the original Stable Diffusion
  # key layout, which ComfyUI, A1111/Forge and diffusers' from_single_file load.
  config.export.single_file = False

  config.sample = ml_collections.ConfigDict()
  # Prompts sampled from the exported pipeline at the end of training ({identifier} and
  # {class} are filled; () = none).
  config.sample.prompts = ()
  config.sample.num_images = 4
  config.sample.scheduler = "ddim"
  config.sample.num_inference_steps = 50
  config.sample.guidance_scale = 7.5
  return config
