"""Tiny random configs shaped like each Stable Diffusion family, in diffusers' config.json
format (the same dicts build our Flax modules, diffusers' Flax modules and the PyTorch ones)."""

UNET_SD1 = dict(
    sample_size=8, in_channels=4, out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=8,
    cross_attention_dim=32)

# SD 2.x: linear projections in the transformers, a head count per block (diffusers keeps the
# historical name attention_head_dim for it), v-prediction in the scheduler.
UNET_SD2 = dict(
    sample_size=8, in_channels=4, out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=(2, 4),
    use_linear_projection=True, cross_attention_dim=32)

# SDXL: no attention in the first down block, per-block transformer depth, and "text_time"
# added embeddings: pooled text (32) + 6 micro-conditioning numbers x addition_time_embed_dim.
UNET_SDXL = dict(
    sample_size=8, in_channels=4, out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=(2, 4),
    transformer_layers_per_block=(1, 2), use_linear_projection=True,
    cross_attention_dim=64, addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=32 + 6 * 8)

VAE = dict(
    in_channels=3, out_channels=3,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    block_out_channels=(32, 64), latent_channels=4, layers_per_block=1, sample_size=16)

VAE_SDXL = dict(VAE, scaling_factor=0.13025)

# transformers CLIPTextConfig fields.
CLIP_TEXT_SD1 = dict(  # CLIP ViT-L/14 text tower: quick_gelu, final hidden states
    vocab_size=1000, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
    num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
    bos_token_id=998, eos_token_id=999, pad_token_id=999)
CLIP_TEXT_SD2 = dict(CLIP_TEXT_SD1, hidden_act="gelu")  # OpenCLIP ViT-H: penultimate layer
CLIP_TEXT_SDXL_2 = dict(CLIP_TEXT_SD2, projection_dim=32)  # OpenCLIP bigG with text projection

SCHEDULER_EPS = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")
SCHEDULER_V = dict(SCHEDULER_EPS, prediction_type="v_prediction")
