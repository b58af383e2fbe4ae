"""The evaluate CLI end to end on the trained tiny pipeline, with tiny random feature networks."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from dreambooth_jax import evaluate
from dreambooth_jax.evaluation import (features as eval_features, metrics as eval_metrics,
                                       prompts as eval_prompts)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = eval_features.TINY_RANDOM


@pytest.fixture(scope="module")
def comparison(tmp_path_factory, straight_run, tiny_dir):
  """The trained export (a) against the base model it started from (b); the real photos by
  their builtin name, as the README's command gives them."""
  out = tmp_path_factory.mktemp("evaluation")
  export = os.path.join(straight_run[0], "export")
  result = subprocess.run(
      [sys.executable, "-m", "dreambooth_jax.evaluate", f"--pipeline={export}",
       f"--compare={tiny_dir}", "--real_dir=builtin:demo-toy", "--class_name=toy",
       "--num_prompts=3", "--num_images=2", "--steps=2", f"--out={out}", f"--dino={TINY}",
       f"--clip={TINY}", f"--lpips={TINY}"],
      cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  return out, result.stdout


def _load(path):
  with open(path) as f:
    return json.load(f)


def test_metrics_json_has_the_five_metrics_overall_and_per_prompt(comparison):
  out, _ = comparison
  metrics = _load(out / "a" / "metrics.json")
  assert metrics["identifier"] == "sks"  # read from the run's prompts.json
  for name in evaluate.METRICS:
    assert np.isfinite(metrics[name]), name
  for name in ("dino", "clip_i", "clip_t", "pres"):
    assert -1.0 <= metrics[name] <= 1.0
  assert metrics["div"] > 0  # different noise per image: different images
  expected_prompts = [t.format("sks", "toy") for t in eval_prompts.OBJECT_PROMPTS[:3]]
  assert [row["prompt"] for row in metrics["per_prompt"]] == expected_prompts
  assert _load(out / "b" / "metrics.json")["identifier"] == "sks"  # nothing recorded: default


def test_metrics_recomputed_from_the_written_images_agree(comparison, instance_dir):
  """The PNGs are exactly what was scored: scoring them again gives metrics.json's numbers."""
  out, _ = comparison
  metrics = _load(out / "a" / "metrics.json")
  read = lambda name: np.asarray(Image.open(out / "a" / "images" / name))
  samples = np.stack([[read(f"prompt{k:02d}_{i:02d}.png") for i in range(2)] for k in range(3)])
  class_samples = np.stack([read(f"class_{i:02d}.png") for i in range(2)])
  real = [np.asarray(Image.open(os.path.join(instance_dir, name)).convert("RGB"))
          for name in sorted(os.listdir(instance_dir))]
  extractors = evaluate.Extractors(TINY, TINY, TINY)
  again = evaluate.score(extractors, real, [r["prompt"] for r in metrics["per_prompt"]], samples,
                         class_samples)
  for name in evaluate.METRICS:
    assert again[name] == pytest.approx(metrics[name], rel=1e-5, abs=1e-6), name
  # And DINO is the mean over every (sample, photo) pair of the DINO cosines.
  dino = extractors.dino
  pairs = eval_metrics.cosine_matrix(dino(samples.reshape(-1, 32, 32, 3)), dino(real))
  assert metrics["dino"] == pytest.approx(float(pairs.mean()), rel=1e-5)


def test_report_and_images_are_written(comparison):
  out, _ = comparison
  names = sorted(os.listdir(out / "a" / "images"))
  assert names == sorted([f"prompt{k:02d}_{i:02d}.png" for k in range(3) for i in range(2)] +
                         [f"class_{i:02d}.png" for i in range(2)] +
                         [f"real_{i:02d}.png" for i in range(5)])
  report = (out / "a" / "report.html").read_text()
  assert report.count("<img ") == len(names)
  assert "a sks toy in the jungle" in report and "a toy (PRES)" in report


def test_compare_prints_and_writes_a_side_by_side_table(comparison):
  out, stdout = comparison
  table = stdout.strip().splitlines()
  assert table[0].split()[0] == "metric" and len(table) == 1 + len(evaluate.METRICS)
  compare = _load(out / "compare.json")
  a, b = (compare[label] for label in sorted(compare))
  assert a == {name: _load(out / "a" / "metrics.json")[name] for name in evaluate.METRICS}
  assert b == {name: _load(out / "b" / "metrics.json")[name] for name in evaluate.METRICS}
  assert a != b  # the tuned and the base model sample differently
  for line, name in zip(table[1:], evaluate.METRICS):
    assert line.split() == [name, f"{a[name]:.4f}", f"{b[name]:.4f}"]


def test_real_dir_or_subject_is_required(tmp_path):
  result = subprocess.run([sys.executable, "-m", "dreambooth_jax.evaluate", "--pipeline=x",
                           f"--out={tmp_path}"], cwd=REPO, capture_output=True, text=True,
                          timeout=300, check=False)
  assert result.returncode == 1
  assert "give either --real_dir (with --class_name) or --subject" in result.stderr


def test_the_identifier_is_the_one_the_run_recorded_beside_its_export(tmp_path):
  """Not the default: a run that chose "zwx" is evaluated with "zwx" prompts."""
  export = tmp_path / "run" / "export"
  export.mkdir(parents=True)
  assert evaluate.default_identifier(str(export)) == "sks"  # nothing recorded
  (tmp_path / "run" / "prompts.json").write_text(json.dumps({"identifier": "zwx"}))
  assert evaluate.default_identifier(str(export)) == "zwx"
