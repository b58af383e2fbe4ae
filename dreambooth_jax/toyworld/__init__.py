"""A procedural toy world (`world`) and small classifiers that judge pictures of it (`judges`).

Why: DreamBooth's claims (subject fidelity, recontextualisation, prior preservation, diversity)
can be tested end to end on CPU with a tiny text-to-image model trained on this world, scored
by judges that know the world, instead of by DINO/CLIP on real photographs.
"""
