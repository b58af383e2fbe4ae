"""Lists rare-token identifier candidates of a Stable Diffusion tokenizer (DreamBooth §3.2).

  python -m dreambooth_jax.identifiers --pretrained=runwayml/stable-diffusion-v1-5 --top=20

The command only; the ranking and the prompts it feeds are data/identifiers.py, which training
imports (no module imports a command).
"""

from __future__ import annotations

import argparse
import sys

from dreambooth_jax import cli_errors, models
from dreambooth_jax.data import identifiers


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(
      prog="python -m dreambooth_jax.identifiers",
      description="Lists rare-token identifier candidates of a Stable Diffusion tokenizer.")
  parser.add_argument("--pretrained", default=models.BUILTIN_TINY,
                      help="hub id, local diffusers directory or builtin:tiny-sd")
  parser.add_argument("--revision", default=None, help="hub branch, tag or commit")
  parser.add_argument("--top", type=int, default=20, help="how many candidates to print")
  parser.add_argument("--seed", type=int, default=0,
                      help="also print the one data.identifier=auto picks for this seed")
  args = parser.parse_args(argv)
  with cli_errors.one_line_errors():
    tokenizer = models.load_tokenizer(args.pretrained, args.revision)
  candidates = identifiers.rank_identifiers(tokenizer)
  print("rank\ttoken_id\tidentifier")
  for rank, candidate in enumerate(candidates[:args.top], 1):
    print(f"{rank}\t{candidate.token_id}\t{candidate.text}")
  print(f"data.identifier=auto with seed={args.seed} picks: "
        f"{identifiers.choose_identifier(tokenizer, args.seed)}", file=sys.stderr)


if __name__ == "__main__":
  main()
