"""DreamBooth measured in the toy world: does the paper's method do what it claims?

  python -m dreambooth_jax.toyworld.experiment --out=/tmp/toy_experiment [--seeds=3]

Each variant fine-tunes the pretrained toy-world model (`builtin:toyworld`) on the subject's 4
photos with the project's own trainer (`train.train_and_evaluate`, the demo config), for every
seed, then samples the export and scores the samples with the judges:

- rare identifier ("sks", never in a pretraining caption) or a common word ("blue", a colour
  the model knows), each with and without prior preservation (λ = 1 on class images that the
  frozen model drew from "a ball");
- the base model, untuned, prompted with the rare identifier, as the reference row.

The columns are the toy analogues of the paper's (see `judges`): subject fidelity (DINO /
CLIP-I analogue: judge-feature similarity to the real photos, and the subject head's
probability) on "a [V] ball [scene]" for all five scenes; prompt fidelity (CLIP-T analogue:
the requested scene's probability) and recontextualisation (the subject *and* the requested
scene, in the four scenes the photos never show); PRES (subject similarity of "a ball" samples;
lower = prior kept) and DIV (judge-feature diversity of "a ball" samples); and "blue kept": how
often "a blue box/tree/cup" is still judged blue, the cost of binding a common word.

Everything is deterministic from the seeds. Finished runs are kept (workdir per variant and
seed, class images per seed shared by the variants), so a rerun only does what is missing.
Writes results.json, table.md and a sample grid per variant (first seed) into --out.
"""

from __future__ import annotations

from dreambooth_jax import quiet  # noqa: F401  pylint: disable=unused-import

import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np

from configs import demo
from dreambooth_jax import atomic_files, models, sharding, train
from dreambooth_jax.models import sampling
from dreambooth_jax.toyworld import judges as judges_lib
from dreambooth_jax.toyworld import world

RARE_IDENTIFIER = "sks"
COMMON_IDENTIFIER = "blue"
# Scenes the subject's photos never show: putting it there is recontextualisation.
NOVEL_SCENES = tuple(s for s in world.SCENES if s != world.SUBJECT_SCENE)
BLUE_CLASSES = tuple(c for c in world.CLASSES if c != world.SUBJECT_CLASS)
SCORES_FILE = "experiment_scores.json"


@dataclasses.dataclass(frozen=True)
class Variant:
  key: str
  label: str
  identifier: str
  prior_preservation: bool
  fine_tune: bool = True


BASE = Variant("base", "base model (no fine-tuning)", RARE_IDENTIFIER, False, fine_tune=False)
VARIANTS = (
    Variant("rare_prior", "rare id + prior preservation", RARE_IDENTIFIER, True),
    Variant("rare", "rare id, no prior preservation", RARE_IDENTIFIER, False),
    Variant("common_prior", "common word + prior preservation", COMMON_IDENTIFIER, True),
    Variant("common", "common word, no prior preservation", COMMON_IDENTIFIER, False),
)
VARIANTS_BY_KEY = {v.key: v for v in (BASE,) + VARIANTS}

# (column key, header, higher is better?)
COLUMNS = (
    ("subject_similarity", "subject sim. (DINO/CLIP-I)", True),
    ("subject_prob", "subject prob.", True),
    ("scene_prob", "scene prob. (CLIP-T)", True),
    ("recontext", "recontext.", True),
    ("pres_similarity", "PRES sim.", False),
    ("pres_subject_prob", "PRES subject prob.", False),
    ("div", "DIV", True),
    ("blue_kept", "blue kept", True),
)


@dataclasses.dataclass(frozen=True)
class Settings:
  """The experiment's size; the defaults made the README table, the test shrinks them."""
  seeds: tuple[int, ...] = (0, 1, 2)
  variants: tuple[str, ...] = ("base",) + tuple(v.key for v in VARIANTS)
  images_per_prompt: int = 8
  # Overrides of configs/demo.py for the runs (field path -> value), e.g. fewer steps.
  config_overrides: tuple[tuple[str, Any], ...] = ()


def run_config(variant: Variant, seed: int, out_dir: str,
               overrides: Sequence[tuple[str, Any]] = ()) -> ml_collections.ConfigDict:
  """The demo config with the variant's identifier and λ; class images shared per seed."""
  config = demo.get_config()
  config.seed = seed
  config.data.identifier = variant.identifier
  config.data.class_dir = os.path.join(out_dir, "class_images", f"seed_{seed}")
  config.train.with_prior_preservation = variant.prior_preservation
  config.sample.prompts = ()  # the experiment samples for itself
  config.eval.every_steps = 0
  config.update_from_flattened_dict(dict(overrides))
  return config


# --------------------------------------------------------------------------------------------
# Sampling and scoring.

@dataclasses.dataclass(frozen=True, eq=False)
class Samples:
  """uint8 pictures drawn for the metrics."""
  subject: dict[str, np.ndarray]  # scene -> [n, H, W, 3] of "a [V] ball [scene]"
  class_prior: np.ndarray  # [n, H, W, 3] of "a ball"
  blue: dict[str, np.ndarray]  # class -> [n, H, W, 3] of "a blue [class]"


def prompts_for(identifier: str) -> list[str]:
  """The prompts of `Samples`, in its order: subject per scene, the class, blue objects."""
  return ([world.prompt_for(world.SUBJECT_CLASS, scene, identifier) for scene in world.SCENES]
          + [world.prompt_for(world.SUBJECT_CLASS)]
          + [world.caption_for(c, 1, colour="blue") for c in BLUE_CLASSES])


def draw_samples(sampler, params: dict[str, Any], mesh, tokenizer, identifier: str,
                 images_per_prompt: int, seed: int) -> Samples:
  images = sampling.sample_grid(sampler, sharding.put_replicated(params, mesh), mesh,
                                tokenizer, prompts_for(identifier), images_per_prompt, seed)
  scenes = len(world.SCENES)
  return Samples(subject=dict(zip(world.SCENES, images[:scenes])),
                 class_prior=images[scenes],
                 blue=dict(zip(BLUE_CLASSES, images[scenes + 1:])))


def score_samples(samples: Samples, real_photos: np.ndarray,
                  judges: judges_lib.Judges) -> dict[str, float]:
  """The table's columns for one run (see the module docstring)."""
  subject_images = np.concatenate([samples.subject[s] for s in world.SCENES])
  subject_scenes = [s for s in world.SCENES for _ in samples.subject[s]]
  fidelity = judges_lib.subject_fidelity(subject_images, real_photos, judges)
  scene = judges_lib.prompt_fidelity(subject_images, subject_scenes, judges)
  novel = np.concatenate([samples.subject[s] for s in NOVEL_SCENES])
  novel_out = judges.outputs(novel)
  novel_wanted = np.array([world.SCENES.index(s) for s in NOVEL_SCENES
                           for _ in samples.subject[s]])
  recontext = np.mean((novel_out["subject_prob"] > 0.5)
                      & (novel_out["scene_probs"].argmax(1) == novel_wanted))
  prior = judges_lib.pres(samples.class_prior, real_photos, judges)
  blue_images = np.concatenate([samples.blue[c] for c in BLUE_CLASSES])
  blue_index = list(world.COLOURS).index("blue")
  blue_kept = np.mean(judges.outputs(blue_images)["colour_probs"].argmax(1) == blue_index)
  return {"subject_similarity": fidelity.feature_similarity,
          "subject_prob": fidelity.subject_prob,
          "scene_prob": scene.scene_prob,
          "recontext": float(recontext),
          "pres_similarity": prior.feature_similarity,
          "pres_subject_prob": prior.subject_prob,
          "div": judges_lib.div([samples.class_prior], judges),
          "blue_kept": float(blue_kept)}


def samples_grid(samples: Samples, identifier: str) -> tuple[np.ndarray, list[str]]:
  """[rows, n, H, W, 3] in `prompts_for` order, and the row labels."""
  rows = ([samples.subject[s] for s in world.SCENES] + [samples.class_prior]
          + [samples.blue[c] for c in BLUE_CLASSES])
  return np.stack(rows), prompts_for(identifier)


# --------------------------------------------------------------------------------------------
# Runs and the table.

def run_one(variant: Variant, seed: int, settings: Settings, out_dir: str, sampler, mesh,
            base: tuple[models.Components, dict[str, Any]], real_photos: np.ndarray,
            judges: judges_lib.Judges) -> dict[str, float]:
  """Fine-tunes (unless the base row), samples and scores one run; cached in its workdir."""
  workdir = os.path.join(out_dir, "runs", variant.key, f"seed_{seed}")
  scores_path = os.path.join(workdir, SCORES_FILE)
  if os.path.isfile(scores_path):
    with open(scores_path) as f:
      return json.load(f)
  components, params = base
  if variant.fine_tune:
    train.train_and_evaluate(run_config(variant, seed, out_dir, settings.config_overrides),
                             workdir)
    _, params = models.load_pretrained(os.path.join(workdir, "export"))
  samples = draw_samples(sampler, params, mesh, components.tokenizer, variant.identifier,
                         settings.images_per_prompt, seed)
  scores = score_samples(samples, real_photos, judges)
  if seed == settings.seeds[0]:
    grid, labels = samples_grid(samples, variant.identifier)
    sampling.write_png(sampling.labelled_grid(grid, labels),
                       os.path.join(out_dir, f"grid_{variant.key}.png"))
  os.makedirs(workdir, exist_ok=True)  # the base row trains nothing, so has no workdir yet
  atomic_files.write_json(scores_path, scores)
  return scores


def summarise(runs: dict[str, dict[int, dict[str, float]]]) -> dict[str, dict[str, list[float]]]:
  """variant -> column -> [mean, std over seeds]."""
  return {key: {column: [float(np.mean([r[column] for r in per_seed.values()])),
                         float(np.std([r[column] for r in per_seed.values()]))]
                for column, _, _ in COLUMNS}
          for key, per_seed in runs.items()}


def format_table(summary: dict[str, dict[str, list[float]]], seeds: int) -> str:
  """A Markdown table like the paper's Tables 1 and 3: mean ± std over the seeds."""
  header = "| variant | " + " | ".join(
      f"{name} {'↑' if higher else '↓'}" for _, name, higher in COLUMNS) + " |"
  lines = [header, "|" + "---|" * (len(COLUMNS) + 1)]
  for key, columns in summary.items():
    cells = [f"{columns[c][0]:.3f} ± {columns[c][1]:.3f}" for c, _, _ in COLUMNS]
    lines.append(f"| {VARIANTS_BY_KEY[key].label} | " + " | ".join(cells) + " |")
  lines.append(f"\nMean ± std over {seeds} seed(s).")
  return "\n".join(lines)


def run_experiment(out_dir: str, settings: Settings = Settings()) -> dict[str, Any]:
  """Every variant x seed; writes results.json, table.md and the grids; returns the results."""
  unknown = [k for k in settings.variants if k not in VARIANTS_BY_KEY]
  if unknown:
    raise ValueError(f"unknown variants {unknown}; choose from {sorted(VARIANTS_BY_KEY)}")
  os.makedirs(out_dir, exist_ok=True)
  config = run_config(BASE, settings.seeds[0], out_dir, settings.config_overrides)
  base = models.load_pretrained(models.resolve_pretrained(config.model.pretrained))
  mesh = sharding.make_mesh()
  # One sampler serves every run: the exports share the base model's architecture.
  sampler = sampling.make_sampler(base[0], mesh, config.data.resolution, config.sample.scheduler,
                                  config.sample.num_inference_steps, config.sample.guidance_scale)
  judges = judges_lib.load_judges()
  real_photos = np.stack(world.subject_photos(judges_lib.JUDGE_SIZE))
  runs: dict[str, dict[int, dict[str, float]]] = {}
  for key in settings.variants:
    for seed in settings.seeds:
      print(f"experiment: {VARIANTS_BY_KEY[key].label}, seed {seed}", file=sys.stderr,
            flush=True)
      runs.setdefault(key, {})[seed] = run_one(VARIANTS_BY_KEY[key], seed, settings, out_dir,
                                               sampler, mesh, base, real_photos, judges)
  summary = summarise(runs)
  table = format_table(summary, len(settings.seeds))
  results = {"settings": dataclasses.asdict(settings), "runs": runs, "summary": summary,
             "table": table}
  atomic_files.write_json(os.path.join(out_dir, "results.json"), results)
  atomic_files.write_text(os.path.join(out_dir, "table.md"), table + "\n")
  return results


# --------------------------------------------------------------------------------------------
# Command line.

def main(argv: list[str] | None = None) -> None:
  import argparse  # pylint: disable=g-import-not-at-top
  from dreambooth_jax import cli_errors, compilation_cache  # pylint: disable=g-import-not-at-top
  defaults = Settings()
  parser = argparse.ArgumentParser(
      prog="python -m dreambooth_jax.toyworld.experiment",
      description="DreamBooth on the toy world: rare vs common identifier, with and without "
                  "prior preservation, several seeds; prints the table of toy metrics.")
  parser.add_argument("--out", required=True, help="output directory (runs are kept there; "
                      "a rerun only does what is missing)")
  parser.add_argument("--seeds", type=int, default=len(defaults.seeds),
                      help="number of seeds (0, 1, ...)")
  parser.add_argument("--variants", default=",".join(defaults.variants),
                      help=f"comma-separated, from {','.join(VARIANTS_BY_KEY)}")
  parser.add_argument("--images_per_prompt", type=int, default=defaults.images_per_prompt)
  parser.add_argument("--steps", type=int, default=0,
                      help="training steps per run (0 = configs/demo.py's)")
  args = parser.parse_args(argv)
  if args.seeds < 1 or args.images_per_prompt < 2 or args.steps < 0:
    parser.error("--seeds must be >= 1, --images_per_prompt >= 2 (DIV needs pairs), "
                 "--steps >= 0")
  unknown = [v for v in args.variants.split(",") if v and v not in VARIANTS_BY_KEY]
  if unknown:
    parser.error(f"--variants: unknown {unknown}; choose from {','.join(VARIANTS_BY_KEY)}")
  settings = Settings(seeds=tuple(range(args.seeds)),
                      variants=tuple(v for v in args.variants.split(",") if v),
                      images_per_prompt=args.images_per_prompt,
                      config_overrides=(("train.steps", args.steps),) if args.steps else ())
  compilation_cache.enable()
  with cli_errors.one_line_errors():
    results = run_experiment(args.out, settings)
  print(results["table"])
  print(f"wrote {args.out}/results.json, table.md and grid_<variant>.png", file=sys.stderr)


if __name__ == "__main__":
  main()
