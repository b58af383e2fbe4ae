"""The DreamBooth paper's evaluation as library code, above data/ (evaluate.py is the command).

prompts (its 30 subjects and 25 + 25 prompt templates); dreambooth_dataset (tfds builder of its
dataset, the subjects' real images); features (DINO, CLIP and LPIPS networks); metrics (the
paper's metrics as pure functions).
"""
