"""Converting a Stable Diffusion model between the forms people share it in.

python -m dreambooth_jax.convert --source=<model> --out=<path> [--to=diffusers|single_file]

--source is anything model.pretrained takes: a diffusers folder (PyTorch safetensors, or this
project's earlier Flax exports), a hub id, a builtin name, or one original-layout .safetensors
file. --to=diffusers writes a diffusers PyTorch folder (`StableDiffusionPipeline.
from_pretrained` loads it); --to=single_file writes one original-layout .safetensors that
ComfyUI, A1111/Forge and `from_single_file` load. Nothing is written unless the whole
conversion succeeds.
"""

from dreambooth_jax import quiet  # noqa: F401  pylint: disable=unused-import

import os
import sys

from absl import app, flags
from tqdm import tqdm

from dreambooth_jax import cli_errors, models
from dreambooth_jax.models import pipeline

FLAGS = flags.FLAGS
FORMATS = ("diffusers", "single_file")


def define_flags() -> None:
  """Defined only when run as a program, so that importing this module adds no flags."""
  flags.DEFINE_string("source", None, "Model to read: diffusers folder, hub id, builtin name "
                      "or single .safetensors file.")
  flags.DEFINE_string("out", None, "Folder (diffusers) or .safetensors file (single_file).")
  flags.DEFINE_enum("to", "diffusers", FORMATS, "Form to write.")
  flags.DEFINE_enum("dtype", "", ["", "float32", "float16"], "Weights' dtype: default float32 "
                    "for diffusers, float16 for single_file.")
  flags.DEFINE_bool("fp16_variant", False, "diffusers: also write the fp16 variant files.")
  flags.DEFINE_string("single_file_config", "", "For a single-file --source: a diffusers folder "
                      "with its configs and tokenizer (default: the shipped architecture).")
  flags.DEFINE_string("revision", "", "Hub revision of --source.")
  flags.mark_flags_as_required(["source", "out"])


def convert(source: str, out: str, to: str, dtype: str = "", fp16_variant: bool = False,
            single_file_config: str = "", revision: str = "") -> None:
  """Loads `source` with our loaders and writes it in the form `to`."""
  if to not in FORMATS:
    raise models.ModelLoadError(f"--to: {to!r} is not one of {', '.join(FORMATS)}")
  if to == "single_file" and not out.endswith(".safetensors"):
    raise models.ModelLoadError(f"--out: a single file must end in .safetensors, got {out}")
  if to == "diffusers" and os.path.isfile(out):
    raise models.ModelLoadError(f"--out: {out} is a file; a diffusers pipeline is a folder")
  with tqdm(total=2, desc="convert", unit="stage") as bar:
    bar.set_postfix_str("reading")
    components, params = models.load_pretrained(source, revision or None,
                                                single_file_config=single_file_config or None)
    bar.update()
    bar.set_postfix_str("writing")
    if to == "diffusers":
      if dtype == "float16":
        raise models.ModelLoadError("--dtype=float16: a diffusers folder keeps float32 weights; "
                                    "use --fp16_variant for float16 copies")
      models.export_pipeline(components, params, out, fp16_variant)
    else:
      pipeline.write_single_file(components, params, out, dtype or "float16")
    bar.update()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  with cli_errors.one_line_errors():
    convert(FLAGS.source, FLAGS.out, FLAGS.to, FLAGS.dtype, FLAGS.fp16_variant,
            FLAGS.single_file_config, FLAGS.revision)
  print(f"Wrote {FLAGS.out}", file=sys.stderr)


if __name__ == "__main__":
  define_flags()
  app.run(main)
