"""A procedural toy world (`world`), small classifiers that judge pictures of it (`judges`), a
tiny text-to-image model pretrained on it (`pretrain`) and DreamBooth measured on it
(`experiment`).

Why: DreamBooth's claims (subject fidelity, recontextualisation, prior preservation, diversity)
can be tested end to end on CPU with a tiny text-to-image model trained on this world, scored
by judges that know the world, instead of by DINO/CLIP on real photographs.
"""

import os

# The committed base model (`python -m dreambooth_jax.toyworld.pretrain` writes it here);
# `model.pretrained=builtin:toyworld` loads it.
PRETRAINED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pretrained")
