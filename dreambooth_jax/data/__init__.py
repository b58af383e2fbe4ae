"""What a run trains on: images, prompts and the batch of each step, above models/.

input_pipeline (images → arrays, prompts → ids, the deterministic batch of each step);
identifiers (rare-token identifiers, {identifier}/{class} prompts); demo_data (builtin photos);
class_images (prior-preservation images from the frozen model); frozen_cache (latents and
embeddings computed once); prefetch (the next batches on a background thread).
"""
