"""The toy-world DreamBooth experiment: its scoring on known pictures, and a test-sized run.

The research outcome (does prior preservation keep "a ball" generic?) is in the README's table;
here only the machinery is asserted: that each column scores pictures whose answer we know, and
that the whole experiment runs, writes its files and resumes without redoing finished runs.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from dreambooth_jax.toyworld import experiment, judges, world

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 4


def _pictures(class_name, scene, colour=None, stripes=None, seed=0, n=N):
  return np.stack([world.render_example(class_name, colour, scene, world.SIZES[k % 2], 1,
                                        seed * 100 + k, 32, stripes=stripes).image
                   for k in range(n)])


def _samples(subject_is_striped: bool, class_prior_is_striped: bool, blue_colour: str):
  stripes = world.SUBJECT_COLOURS
  colours = [c for c in world.COLOURS if c not in world.SUBJECT_COLOURS]
  subject = {scene: (_pictures("ball", scene, stripes=stripes, seed=i) if subject_is_striped
                     else _pictures("ball", scene, colour=colours[i % len(colours)], seed=i))
             for i, scene in enumerate(world.SCENES)}
  if class_prior_is_striped:
    class_prior = _pictures("ball", world.SUBJECT_SCENE, stripes=stripes, seed=7)
  else:
    class_prior = np.concatenate([_pictures("ball", world.SCENES[k], colour=colours[k], seed=8,
                                            n=1) for k in range(N)])
  blue = {c: _pictures(c, "on grass", colour=blue_colour, seed=9) for c in experiment.BLUE_CLASSES}
  return experiment.Samples(subject=subject, class_prior=class_prior, blue=blue)


@pytest.fixture(scope="module")
def judge():
  return judges.load_judges()


@pytest.fixture(scope="module")
def real_photos():
  return np.stack(world.subject_photos(32))


def test_scores_of_an_ideal_dreambooth(judge, real_photos):
  """The subject everywhere it was asked for, plain balls for "a ball", blue kept blue."""
  scores = experiment.score_samples(_samples(True, False, "blue"), real_photos, judge)
  assert set(scores) == {c for c, _, _ in experiment.COLUMNS}
  assert scores["subject_prob"] > 0.9
  assert scores["scene_prob"] > 0.9
  assert scores["recontext"] == 1.0
  assert scores["pres_subject_prob"] < 0.1
  assert scores["blue_kept"] == 1.0
  assert scores["div"] > 0.1
  assert scores["subject_similarity"] > scores["pres_similarity"]


def test_scores_of_a_failed_dreambooth(judge, real_photos):
  """No subject anywhere, every "a ball" the subject (prior lost), "blue" turned red."""
  ideal = experiment.score_samples(_samples(True, False, "blue"), real_photos, judge)
  failed = experiment.score_samples(_samples(False, True, "red"), real_photos, judge)
  assert failed["subject_prob"] < 0.1
  assert failed["recontext"] == 0.0
  assert failed["pres_subject_prob"] > 0.9
  assert failed["pres_similarity"] > ideal["pres_similarity"]
  assert failed["blue_kept"] == 0.0
  assert failed["div"] < ideal["div"]  # one scene, one pattern: less diverse


def test_prompts_follow_the_pretraining_grammar():
  prompts = experiment.prompts_for("sks")
  assert prompts[:len(world.SCENES)] == [f"a sks ball {s}" for s in world.SCENES]
  assert prompts[len(world.SCENES)] == "a ball"
  assert prompts[len(world.SCENES) + 1:] == ["a blue box", "a blue tree", "a blue cup"]


def test_table_format():
  summary = {"base": {c: [0.5, 0.0] for c, _, _ in experiment.COLUMNS},
             "rare_prior": {c: [0.25, 0.125] for c, _, _ in experiment.COLUMNS}}
  table = experiment.format_table(summary, seeds=3).splitlines()
  assert table[0].startswith("| variant | subject sim. (DINO/CLIP-I) ↑ |")
  assert "PRES sim. ↓" in table[0]
  assert table[2] == "| base model (no fine-tuning) | " + " | ".join(
      ["0.500 ± 0.000"] * len(experiment.COLUMNS)) + " |"
  assert table[3].startswith("| rare id + prior preservation | 0.250 ± 0.125 |")
  assert table[-1] == "Mean ± std over 3 seed(s)."


TEST_OVERRIDES = (("train.steps", 2), ("train.warmup_steps", 1), ("data.num_class_images", 2),
                  ("class_images.num_inference_steps", 2), ("sample.num_inference_steps", 2),
                  ("checkpoint.every_steps", 2), ("log.every_steps", 1))


def test_test_sized_experiment_runs_writes_and_resumes(tmp_path):
  out = str(tmp_path / "experiment")
  settings = experiment.Settings(seeds=(0,), variants=("base", "rare_prior", "common"),
                                 images_per_prompt=2, config_overrides=TEST_OVERRIDES)
  results = experiment.run_experiment(out, settings)
  assert sorted(os.listdir(out)) == ["class_images", "grid_base.png", "grid_common.png",
                                     "grid_rare_prior.png", "results.json", "runs", "table.md"]
  # Class images only for the run with prior preservation, generated once per seed.
  assert sorted(os.listdir(os.path.join(out, "class_images", "seed_0"))) == [
      "class_00000.png", "class_00001.png"]
  for key, identifier in (("rare_prior", "sks"), ("common", "blue")):
    workdir = os.path.join(out, "runs", key, "seed_0")
    with open(os.path.join(workdir, "prompts.json")) as f:
      assert json.load(f)["instance_prompt"] == f"a {identifier} ball"
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows] == [1, 2]
    assert ("prior_loss" in rows[0]) and (rows[0]["prior_loss"] > 0) == (key == "rare_prior")
    assert os.path.isfile(os.path.join(workdir, "export", "model_index.json"))
  assert not os.path.exists(os.path.join(out, "runs", "base", "seed_0", "export"))
  with open(os.path.join(out, "results.json")) as f:
    saved = json.load(f)
  assert set(saved["runs"]) == {"base", "rare_prior", "common"}
  for scores in saved["runs"].values():
    for column, _, _ in experiment.COLUMNS:
      assert -1.0 <= scores["0"][column] <= 2.0  # cosine similarities may be negative
  assert saved["summary"]["common"]["div"] == [saved["runs"]["common"]["0"]["div"], 0.0]
  table = open(os.path.join(out, "table.md")).read().splitlines()
  assert len(table) == 2 + 3 + 2 and table[2].startswith("| base model (no fine-tuning) |")
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with Image.open(os.path.join(out, "grid_common.png")) as grid:
    assert grid.size[1] == len(experiment.prompts_for("blue")) * (2 * 32 + 2)

  # A rerun reuses every finished run: same numbers, no run's files touched.
  export = os.path.join(out, "runs", "common", "seed_0", "export", "model_index.json")
  before = os.stat(export).st_mtime_ns
  again = experiment.run_experiment(out, settings)
  assert again["summary"] == results["summary"]
  assert os.stat(export).st_mtime_ns == before


def test_cli_rejects_bad_arguments():
  result = subprocess.run([sys.executable, "-m", "dreambooth_jax.toyworld.experiment",
                           "--out=/tmp/unused", "--seeds=0"], cwd=REPO, capture_output=True,
                          text=True, timeout=300, check=False)
  assert result.returncode == 2
  assert "--seeds must be >= 1" in result.stderr
  assert not os.path.exists("/tmp/unused")


def test_the_cli_flags_shrink_the_experiment(monkeypatch, capsys, tmp_path):
  """The command line's --seeds, --variants, --images_per_prompt and --steps become the
  Settings that run_experiment is given (run_experiment itself honours them: the test-sized
  run above), and --steps reaches every run's config."""
  given = []
  monkeypatch.setattr(experiment, "run_experiment",
                      lambda out, settings: given.append((out, settings)) or {"table": "T"})
  monkeypatch.setattr("dreambooth_jax.compilation_cache.enable", lambda: None)
  out = str(tmp_path / "small")
  experiment.main([f"--out={out}", "--seeds=2", "--variants=base,rare_prior",
                   "--images_per_prompt=3", "--steps=7"])
  assert given == [(out, experiment.Settings(seeds=(0, 1), variants=("base", "rare_prior"),
                                             images_per_prompt=3,
                                             config_overrides=(("train.steps", 7),)))]
  assert capsys.readouterr().out == "T\n"
  rare_prior = experiment.VARIANTS_BY_KEY["rare_prior"]
  assert experiment.run_config(rare_prior, 1, out, given[0][1].config_overrides).train.steps == 7
  # Without the flags: the README table's size (3 seeds, base + 4 variants, 8 images per
  # prompt, the demo's 600 steps).
  experiment.main([f"--out={out}"])
  assert given[1][1] == experiment.Settings()
  assert experiment.run_config(rare_prior, 0, out, ()).train.steps == 600
  assert len(experiment.Settings().seeds) == 3 and len(experiment.Settings().variants) == 5
