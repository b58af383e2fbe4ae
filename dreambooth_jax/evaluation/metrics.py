"""The DreamBooth paper's evaluation metrics (Ruiz et al., arXiv 2208.12242, §4.1 and §4.3).

Pure functions on embeddings or distances that `features` computes, so every definition
can be checked by hand. All work in float64 numpy and return a Python float:

- DINO, CLIP-I (subject fidelity): mean cosine similarity over *every* (generated, real) pair of
  image embeddings (DINO ViT-S/16 CLS tokens, CLIP image embeddings).
- CLIP-T (prompt fidelity): mean cosine similarity between each generated image's CLIP
  embedding and the CLIP text embedding of the prompt it was generated from.
- PRES (prior preservation, §4.3 / Table 3): DINO's formula applied to the tuned model's samples
  of the bare class prompt against the real subject; lower = prior better preserved.
- DIV (diversity, §4.3 / Table 3): mean pairwise LPIPS distance between images of one prompt;
  higher = more diverse.

Each function scores one set (one subject, or one subject and prompt); the paper reports the
mean of these over its subjects and prompts.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike


def _unit_rows(emb: ArrayLike, name: str) -> np.ndarray:
  """[N, D] rows scaled to unit L2 norm (cosine similarity is then a dot product)."""
  emb = np.asarray(emb, dtype=np.float64)
  if emb.ndim == 1:
    emb = emb[None]
  if emb.ndim != 2 or emb.shape[0] == 0:
    raise ValueError(f"{name}: expected a non-empty [N, D] array of embeddings, got shape "
                     f"{emb.shape}")
  norms = np.linalg.norm(emb, axis=1, keepdims=True)
  if np.any(norms == 0):
    raise ValueError(f"{name}: a zero embedding has no direction (cosine similarity undefined)")
  return emb / norms


def cosine_matrix(a: ArrayLike, b: ArrayLike) -> np.ndarray:
  """[Na, Nb] cosine similarities cos(a_i, b_j); a [Na, D] (or [D]), b [Nb, D] (or [D])."""
  a, b = _unit_rows(a, "a"), _unit_rows(b, "b")
  if a.shape[1] != b.shape[1]:
    raise ValueError(f"embedding sizes differ: {a.shape[1]} vs {b.shape[1]}")
  return a @ b.T


def mean_pairwise_cosine(a: ArrayLike, b: ArrayLike) -> float:
  """(1 / (Na·Nb)) Σ_i Σ_j cos(a_i, b_j): the mean over every (a_i, b_j) pair."""
  return float(cosine_matrix(a, b).mean())


def dino(generated_emb: ArrayLike, real_emb: ArrayLike) -> float:
  """DINO score: mean cosine similarity over all (generated, real) DINO-embedding pairs.

  `(1 / (G·R)) Σ_g Σ_r cos(e_g, e_r)` with e the DINO ViT-S/16 CLS embeddings of the G generated
  and R real subject images. The paper prefers it to CLIP-I because DINO, trained without
  labels, separates subjects of one class (two different corgis) that CLIP maps together.
  """
  return mean_pairwise_cosine(generated_emb, real_emb)


def clip_i(generated_emb: ArrayLike, real_emb: ArrayLike) -> float:
  """CLIP-I score: the DINO formula with CLIP image embeddings.

  `(1 / (G·R)) Σ_g Σ_r cos(c_g, c_r)` over all (generated, real) pairs.
  """
  return mean_pairwise_cosine(generated_emb, real_emb)


def clip_t(image_emb: ArrayLike, text_emb: ArrayLike) -> float:
  """CLIP-T score: mean cosine similarity between each image and its own prompt.

  `(1 / N) Σ_i cos(c_i, t_i)`, with c_i the CLIP image embedding of generated image i and t_i
  the CLIP text embedding of the prompt it was generated from (row i of `text_emb`). A single
  text row ([D] or [1, D]) is used for every image.
  """
  images = _unit_rows(image_emb, "image_emb")
  texts = _unit_rows(text_emb, "text_emb")
  if images.shape[1] != texts.shape[1]:
    raise ValueError(f"embedding sizes differ: {images.shape[1]} vs {texts.shape[1]}")
  if texts.shape[0] not in (1, images.shape[0]):
    raise ValueError(f"clip_t: {images.shape[0]} images but {texts.shape[0]} text embeddings "
                     "(give one per image, or one for all)")
  return float(np.mean(np.sum(images * texts, axis=1)))


def pres(class_sample_emb: ArrayLike, real_subject_emb: ArrayLike) -> float:
  """PRES, the paper's prior-preservation metric (§4.3, Table 3); lower is better.

  The mean pairwise DINO cosine similarity between the *tuned* model's samples of the bare class
  prompt ("a dog", no identifier) and the real images of the subject:
  `(1 / (S·R)) Σ_s Σ_r cos(e_s, e_r)`. If fine-tuning has drifted the whole class towards the
  subject (language drift), every "a dog" looks like the subject and the score rises; a model
  that kept its prior draws varied dogs and scores low. That is why the paper reports it with
  and without the prior-preservation loss.
  """
  return mean_pairwise_cosine(class_sample_emb, real_subject_emb)


def unordered_pairs(n: int) -> tuple[np.ndarray, np.ndarray]:
  """(i, j) index arrays of the n·(n-1)/2 unordered pairs i < j of n items, row-major."""
  i, j = np.triu_indices(n, k=1)
  return i, j


def _pair_distances(group: ArrayLike, index: int) -> np.ndarray:
  """A group's pair distances: a 1-D vector as given, or the strict upper triangle of [n, n]."""
  d = np.asarray(group, dtype=np.float64)
  if d.ndim == 2:
    if d.shape[0] != d.shape[1]:
      raise ValueError(f"div: group {index} is a {d.shape} matrix; a distance matrix is square")
    d = d[unordered_pairs(d.shape[0])]
  if d.ndim != 1 or d.size == 0:
    raise ValueError(f"div: group {index} has no image pairs (shape {np.shape(group)}); "
                     "each prompt needs at least 2 images")
  return d


def div(group_distances: Sequence[ArrayLike]) -> float:
  """DIV, the paper's diversity metric (§4.3, Table 3); higher = more diverse.

  For each prompt, the mean LPIPS distance over all unordered pairs of its generated images;
  DIV is the mean of those per-prompt means (so every prompt counts equally; with the paper's
  fixed 4 images per prompt it equals the mean over all pairs). Each entry of
  `group_distances` is one prompt's pair distances: either the vector of its n·(n-1)/2 LPIPS
  distances (`LpipsDistance.within_groups` gives these) or its full [n, n] distance matrix, of
  which the strict upper triangle is used. Only images of the same prompt are compared, so the
  score measures variety in pose, background and appearance under a fixed prompt.
  """
  if len(group_distances) == 0:
    raise ValueError("div: no prompt groups given")
  return float(np.mean([_pair_distances(g, k).mean() for k, g in enumerate(group_distances)]))
