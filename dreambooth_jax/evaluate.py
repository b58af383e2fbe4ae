"""The paper's evaluation of an exported pipeline: DINO, CLIP-I, CLIP-T, PRES and DIV.

python -m dreambooth_jax.evaluate --pipeline=runs/dog/export --real_dir=/data/dog \
    --class_name=dog --live --out=runs/dog/evaluation [--compare=runs/dog_noprior/export]

The pipeline samples num_images images for each of the paper's 25 prompt templates (objects, or
live subjects with --live) with the identifier filled in, plus num_images of the bare class
prompt for PRES. The subject's real photos come from --real_dir, or from the DreamBooth dataset
(--subject, read through its tfds builder from --dataset_dir). Writes metrics.json, the images
and report.html (real photos beside the samples of each prompt) per pipeline into --out; with
--compare, both pipelines go into --out/a and --out/b and a side-by-side table is printed and
written to --out/compare.json.
"""

from dreambooth_jax import quiet  # noqa: F401  pylint: disable=unused-import

import html
import json
import os
import sys
from typing import Any, Sequence

import numpy as np
from absl import app, flags, logging
from PIL import Image

from dreambooth_jax import atomic_files, cli_errors, compilation_cache, errors, models, sharding
from dreambooth_jax.data import demo_data, input_pipeline
from dreambooth_jax.evaluation import (dreambooth_dataset, features as eval_features,
                                       metrics as eval_metrics, prompts as eval_prompts)
from dreambooth_jax.models import sampling, schedulers

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defined only when run as a program, so that importing this module adds no flags."""
  flags.DEFINE_string("pipeline", None, "Exported pipeline directory (or hub id) to evaluate.")
  flags.DEFINE_string("compare", None, "A second pipeline, evaluated the same way, side by side.")
  flags.DEFINE_string("real_dir", None, "Folder of the subject's real photos (or a builtin "
                      "one: builtin:demo-toy, builtin:toyworld-subject).")
  flags.DEFINE_string("subject", None, "A DreamBooth-dataset subject (e.g. dog2), instead of "
                      "--real_dir; its class noun and live flag come from the dataset.")
  flags.DEFINE_string("dataset_dir", None, "The dataset/ folder of a clone of "
                      f"{dreambooth_dataset.SOURCE_URL} (tfds manual_dir), for --subject.")
  flags.DEFINE_string("tfds_data_dir", None, "Where tfds keeps the prepared dataset "
                      "(default: tfds's own, ~/tensorflow_datasets).")
  flags.DEFINE_string("class_name", None, "The class noun ('dog'); required with --real_dir.")
  flags.DEFINE_string("identifier", None, "The identifier the pipeline was tuned with (default: "
                      "from prompts.json beside the export, else 'sks').")
  flags.DEFINE_bool("live", False, "Use the 25 live-subject templates (dogs, cats) instead of the "
                    "25 object templates (ignored with --subject).")
  flags.DEFINE_integer("num_prompts", 0, "Use the first N templates only (0 = all 25).")
  flags.DEFINE_integer("num_images", eval_prompts.IMAGES_PER_PROMPT, "Images per prompt.")
  flags.DEFINE_string("out", None, "Output folder.")
  flags.DEFINE_integer("seed", 0, "Sampling seed; image k of every prompt starts from noise k.")
  flags.DEFINE_enum("scheduler", "ddim", sorted(schedulers.SAMPLERS), "Sampler.")
  flags.DEFINE_integer("steps", 50, "Denoising steps.")
  flags.DEFINE_float("guidance_scale", 7.5, "Classifier-free guidance scale.")
  flags.DEFINE_integer("resolution", 0, "Sample size in px; 0 = the UNet's native size.")
  flags.DEFINE_string("dino", eval_features.DINO_DEFAULT, "DINO model: hub id or directory.")
  flags.DEFINE_string("clip", eval_features.CLIP_DEFAULT, "CLIP model: hub id or directory.")
  flags.DEFINE_string("lpips", eval_features.LPIPS_DEFAULT,
                      "LPIPS weights: 'alex', 'vgg', a directory or a hub id.")
  flags.mark_flags_as_required(["pipeline", "out"])


METRICS = ("dino", "clip_i", "clip_t", "pres", "div")


class Extractors:
  """The three feature networks, loaded once and shared by every pipeline evaluated."""

  def __init__(self, dino: str, clip: str, lpips: str):
    self.dino = eval_features.load_dino(dino)
    self.clip = eval_features.load_clip(clip)
    self.lpips = eval_features.load_lpips(lpips)


def generate(pipeline: str, prompts: Sequence[str], num_images: int, seed: int, scheduler: str,
             steps: int, guidance_scale: float, resolution: int) -> np.ndarray:
  """[len(prompts), num_images, H, W, 3] uint8 samples, as many prompts per batch as fill it."""
  components, params = models.load_pretrained(pipeline)
  resolution = sampling.sample_resolution(components, resolution)
  mesh = sharding.make_mesh()
  params = sharding.put_replicated(params, mesh)
  sampler = sampling.make_sampler(components, mesh, resolution, scheduler, steps, guidance_scale)
  per_batch = max(1, mesh.size // num_images)  # fill the devices, one compiled batch shape
  return np.concatenate([
      sampling.sample_grid(sampler, params, mesh, components.tokenizer,
                           prompts[start:start + per_batch], num_images, seed)
      for start in range(0, len(prompts), per_batch)])


def score(extractors: Extractors, real: Sequence[np.ndarray], prompts: Sequence[str],
          samples: np.ndarray, class_samples: np.ndarray) -> dict[str, Any]:
  """The five metrics, overall and per prompt (samples: [prompts, images, H, W, 3])."""
  num_prompts, num_images = samples.shape[:2]
  flat = samples.reshape(-1, *samples.shape[2:])
  real_dino, real_clip = extractors.dino(real), extractors.clip.embed_images(real)
  dino_emb, clip_emb = extractors.dino(flat), extractors.clip.embed_images(flat)
  text_emb = np.repeat(extractors.clip.embed_texts(list(prompts)), num_images, axis=0)
  metrics = {
      "dino": eval_metrics.dino(dino_emb, real_dino),
      "clip_i": eval_metrics.clip_i(clip_emb, real_clip),
      "clip_t": eval_metrics.clip_t(clip_emb, text_emb),
      "pres": eval_metrics.pres(extractors.dino(class_samples), real_dino),
      "div": (eval_metrics.div(extractors.lpips.within_groups(list(samples)))
              if num_images > 1 else float("nan")),
  }
  rows = lambda emb, k: emb[k * num_images:(k + 1) * num_images]
  metrics["per_prompt"] = [
      {"prompt": prompt,
       "dino": eval_metrics.dino(rows(dino_emb, k), real_dino),
       "clip_i": eval_metrics.clip_i(rows(clip_emb, k), real_clip),
       "clip_t": eval_metrics.clip_t(rows(clip_emb, k), rows(text_emb, k))}
      for k, prompt in enumerate(prompts)]
  return metrics


def write_report(out_dir: str, title: str, real: Sequence[np.ndarray], prompts: Sequence[str],
                 samples: np.ndarray, class_prompt: str, class_samples: np.ndarray,
                 metrics: dict[str, Any]) -> None:
  """metrics.json, every image as PNG, and report.html: real photos, then a row per prompt."""
  image_dir = os.path.join(out_dir, "images")
  os.makedirs(image_dir, exist_ok=True)

  def pngs(prefix: str, images: Sequence[np.ndarray]) -> list[str]:
    names = []
    for k, image in enumerate(images):
      names.append(f"images/{prefix}_{k:02d}.png")
      sampling.write_png(np.asarray(image), os.path.join(out_dir, names[-1]))
    return names

  def row(label: str, names: list[str], extra: str = "") -> str:
    cells = "".join(f'<td><img src="{n}" width="128"></td>' for n in names)
    return f"<tr><th>{html.escape(label)}{extra}</th>{cells}</tr>"

  thumbnails = []
  for image in real:
    thumbnail = Image.fromarray(np.asarray(image))
    thumbnail.thumbnail((256, 256))
    thumbnails.append(np.asarray(thumbnail))
  body = [row("real photos", pngs("real", thumbnails))]
  for k, prompt in enumerate(prompts):
    per = metrics["per_prompt"][k]
    body.append(row(prompt, pngs(f"prompt{k:02d}", samples[k]),
                    f"<br><small>DINO {per['dino']:.3f} · CLIP-I {per['clip_i']:.3f} · "
                    f"CLIP-T {per['clip_t']:.3f}</small>"))
  body.append(row(f"{class_prompt} (PRES)", pngs("class", class_samples)))
  summary = " · ".join(f"{name.upper().replace('_', '-')} {metrics[name]:.4f}"
                       for name in METRICS)
  page = (f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>"
          f"<h1>{html.escape(title)}</h1><p>{summary}</p><table>{''.join(body)}</table>")
  atomic_files.write_text(os.path.join(out_dir, "report.html"), page)
  atomic_files.write_json(os.path.join(out_dir, "metrics.json"), metrics)


def default_identifier(pipeline: str) -> str:
  """The identifier a dreambooth_jax run recorded beside its export, else 'sks'."""
  recorded = os.path.join(os.path.dirname(os.path.abspath(pipeline)), "prompts.json")
  if os.path.isfile(recorded):
    with open(recorded) as f:
      return json.load(f)["identifier"]
  return "sks"


def _short_name(pipeline: str) -> str:
  """A run's workdir name for its export/ folder; else the pipeline as given."""
  path = os.path.abspath(pipeline)
  if os.path.basename(path) == "export":
    return os.path.basename(os.path.dirname(path))
  return pipeline.rstrip("/")


def comparison_table(labels: Sequence[str], results: Sequence[dict[str, Any]]) -> str:
  width = max(12, *(len(label) for label in labels))
  lines = ["metric  " + "".join(f"{label:>{width}}" for label in labels)]
  for name in METRICS:
    lines.append(f"{name:<8}" + "".join(f"{r[name]:>{width}.4f}" for r in results))
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  for name in ("num_images", "steps"):
    if FLAGS[name].value < 1:
      raise app.UsageError(f"--{name} must be >= 1")
  if (FLAGS.real_dir is None) == (FLAGS.subject is None):
    raise app.UsageError("give either --real_dir (with --class_name) or --subject")
  compilation_cache.enable()
  with cli_errors.one_line_errors():
    if FLAGS.subject:
      real, class_name, live = dreambooth_dataset.load_subject(
          FLAGS.tfds_data_dir, FLAGS.dataset_dir, FLAGS.subject)
    else:
      if not FLAGS.class_name:
        raise app.UsageError("--class_name is required with --real_dir")
      real_dir = demo_data.resolve_instance_dir(FLAGS.real_dir)
      real = [input_pipeline.load_image(path, None) for path in
              input_pipeline.list_images(real_dir, "--real_dir")]
      if not real:
        raise errors.DataError(f"--real_dir: {FLAGS.real_dir} holds no images")
      class_name, live = FLAGS.class_name, FLAGS.live
    templates = eval_prompts.LIVE_PROMPTS if live else eval_prompts.OBJECT_PROMPTS
    templates = templates[:FLAGS.num_prompts or len(templates)]
    extractors = Extractors(FLAGS.dino, FLAGS.clip, FLAGS.lpips)
    pipelines = [FLAGS.pipeline] + ([FLAGS.compare] if FLAGS.compare else [])
    results = []
    for index, pipeline in enumerate(pipelines):
      identifier = FLAGS.identifier or default_identifier(pipeline)
      prompts = [t.format(identifier, class_name) for t in templates]
      class_prompt = eval_prompts.class_prompt(class_name)
      logging.info("Sampling %d prompts × %d images from %s", len(prompts) + 1,
                   FLAGS.num_images, pipeline)
      images = generate(pipeline, prompts + [class_prompt], FLAGS.num_images, FLAGS.seed,
                        FLAGS.scheduler, FLAGS.steps, FLAGS.guidance_scale, FLAGS.resolution)
      metrics = score(extractors, real, prompts, images[:-1], images[-1])
      metrics.update(pipeline=pipeline, identifier=identifier, class_name=class_name,
                     num_images=FLAGS.num_images)
      out_dir = os.path.join(FLAGS.out, "ab"[index]) if FLAGS.compare else FLAGS.out
      write_report(out_dir, f"DreamBooth evaluation of {pipeline}", real, prompts, images[:-1],
                   class_prompt, images[-1], metrics)
      results.append(metrics)
  labels = [f"{'ab'[i]}: {_short_name(p)}" for i, p in enumerate(pipelines)
            ] if FLAGS.compare else ["value"]
  table = comparison_table(labels, results)
  print(table)
  if FLAGS.compare:
    atomic_files.write_json(
        os.path.join(FLAGS.out, "compare.json"),
        {label: {name: r[name] for name in METRICS} for label, r in zip(labels, results)})
  print(f"Wrote {FLAGS.out}", file=sys.stderr)


if __name__ == "__main__":
  define_flags()
  app.run(main)
