"""The evaluate CLI end to end on the trained tiny pipeline, with tiny random feature networks.

Its runs go at once, with diffusers, transformers and torch unimportable: the trained export
against its base model; the export against itself on a DreamBooth-dataset subject (a fake copy
of the dataset), in a user's environment; and two with a missing feature network.
"""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from dreambooth_jax import evaluate
from dreambooth_jax.evaluation import (features as eval_features, metrics as eval_metrics,
                                       prompts as eval_prompts)
from tests.evaluation.test_dreambooth_dataset import make_fake_copy
from tests.test_core_imports import without_oracles
from tests.test_demo import CACHE_LOGS, default_cache_used, user_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = eval_features.TINY_RANDOM


def _evaluate(*flags: str, env=None) -> subprocess.Popen:
  return subprocess.Popen(without_oracles("evaluate", *flags), cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, straight_run, tiny_dir):
  """{name: (out folder, completed run's (returncode, stdout, stderr)), "home": HOME}."""
  root = tmp_path_factory.mktemp("evaluation")
  export = os.path.join(straight_run[0], "export")
  tiny_nets = [f"--dino={TINY}", f"--clip={TINY}", f"--lpips={TINY}"]
  small = ["--num_images=2", "--steps=2"]
  home = root / "home"
  empty_hub = root / "hub"
  empty_hub.mkdir()
  started = {
      # The trained export (a) against the base model it started from (b); the real photos by
      # their builtin name, as the README's command gives them.
      "comparison": _evaluate(f"--pipeline={export}", f"--compare={tiny_dir}",
                              "--real_dir=builtin:demo-toy", "--class_name=toy",
                              "--num_prompts=3", f"--out={root / 'comparison'}", *small,
                              *tiny_nets),
      "self": _evaluate(f"--pipeline={export}", f"--compare={export}", "--subject=dog",
                        f"--dataset_dir={make_fake_copy(root)}",
                        f"--tfds_data_dir={root / 'tfds'}", "--num_prompts=1",
                        f"--out={root / 'self'}", *small, *tiny_nets,
                        env=dict(user_env(home, suite_xla=True), **CACHE_LOGS)),
      "missing_dir": _evaluate(f"--pipeline={export}", "--real_dir=builtin:demo-toy",
                               "--class_name=toy", f"--out={root / 'missing_dir'}",
                               f"--dino={root / 'nowhere'}", f"--clip={TINY}",
                               f"--lpips={TINY}"),
      "missing_hub_id": _evaluate(f"--pipeline={export}", "--real_dir=builtin:demo-toy",
                                  "--class_name=toy", f"--out={root / 'missing_hub_id'}",
                                  f"--dino={TINY}", "--clip=openai/clip-vit-large-patch14",
                                  f"--lpips={TINY}",
                                  env=dict(os.environ, HF_HUB_CACHE=str(empty_hub))),
  }
  done = {"home": home}
  for name, process in started.items():
    stdout, stderr = process.communicate(timeout=600)
    done[name] = (root / name, (process.returncode, stdout, stderr))
  for name in ("comparison", "self"):
    assert done[name][1][0] == 0, f"{name}: {done[name][1][2][-3000:]}"
  return done


@pytest.fixture(scope="module")
def comparison(runs):
  out, (_, stdout, _) = runs["comparison"]
  return out, stdout


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


def test_a_missing_feature_network_fails_with_one_line_naming_it(runs, tmp_path_factory):
  """Offline (the suite sets HF_HUB_OFFLINE=1): a directory that is not there, and a hub id not
  in the (empty) Hugging Face cache; input errors, so exit status 2."""
  out, (returncode, _, stderr) = runs["missing_dir"]
  assert returncode == 2
  assert stderr == (f"error: DINO model: {out.parent / 'nowhere'} is neither a local directory "
                    "nor a hub id of the form owner/name\n")
  _, (returncode, _, stderr) = runs["missing_hub_id"]
  assert returncode == 2
  assert stderr == ("error: CLIP model: openai/clip-vit-large-patch14 is not in the Hugging "
                    "Face cache and the hub cannot be reached (offline?); download it once with "
                    "network access, or pass a local directory\n")


def test_a_subject_of_the_dataset_is_read_through_its_builder(runs):
  """--subject=dog --dataset_dir: its two photos, its class noun and the live templates."""
  out, _ = runs["self"]
  for side in ("a", "b"):
    metrics = _load(out / side / "metrics.json")
    assert metrics["class_name"] == "dog"
    assert [row["prompt"] for row in metrics["per_prompt"]] == [
        eval_prompts.LIVE_PROMPTS[0].format("sks", "dog")]
    names = sorted(os.listdir(out / side / "images"))
    assert names == ["class_00.png", "class_01.png", "prompt00_00.png", "prompt00_01.png",
                     "real_00.png", "real_01.png"]
    assert "a dog (PRES)" in (out / side / "report.html").read_text()
  # The fake copy's photos: a flat red and a flat green with a dark corner (JPEG-close).
  for name, color in (("real_00.png", (200, 30, 30)), ("real_01.png", (30, 200, 30))):
    photo = np.asarray(Image.open(out / "a" / "images" / name)).astype(int)
    assert photo.shape == (16, 24, 3)
    assert np.abs(photo[8:, 8:] - color).mean() < 4


def test_compare_samples_both_pipelines_with_the_same_seeds(runs):
  """A pipeline compared with itself: the same images and the same numbers in a and b."""
  out, (_, stdout, _) = runs["self"]
  names = sorted(os.listdir(out / "a" / "images"))
  for name in names:
    np.testing.assert_array_equal(np.asarray(Image.open(out / "a" / "images" / name)),
                                  np.asarray(Image.open(out / "b" / "images" / name)), name)
  a, b = _load(out / "a" / "metrics.json"), _load(out / "b" / "metrics.json")
  assert a == b
  compare = _load(out / "compare.json")
  assert list(compare.values())[0] == list(compare.values())[1] == {
      name: a[name] for name in evaluate.METRICS}
  rows = stdout.strip().splitlines()[-len(evaluate.METRICS):]  # the table ends the output
  assert [line.split()[0] for line in rows] == list(evaluate.METRICS)
  assert all(line.split()[1] == line.split()[2] for line in rows)


def test_evaluate_keeps_its_programs_in_the_default_cache_folder(runs):
  _, (_, _, stderr) = runs["self"]
  assert default_cache_used(runs["home"], stderr, "jit_sample")
