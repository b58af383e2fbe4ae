"""Rare-token identifiers and prompt placeholders, with the tiny pipeline's CLIP tokenizer."""

import json
import subprocess
import sys
from unittest import mock

import pytest
from absl import logging

from configs import common
from dreambooth_jax import models
from dreambooth_jax.data import identifiers
from dreambooth_jax.training import config_check


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
  return models.ClipTokenizer.from_directory(f"{tiny_dir}/tokenizer")


def test_ranking_keeps_rare_short_whole_words_rarest_first(tokenizer):
  ranked = identifiers.rank_identifiers(tokenizer)
  # The tiny vocabulary's whole-word tokens of 2-3 letters are all common English words
  # ("an", "the", "dog", "toy", "red", ...) except "sks".
  assert [c.text for c in ranked] == ["sks"]
  assert ranked[0].token_id == tokenizer.convert_tokens_to_ids("sks</w>")
  # Without the common-word list: every 2-3 letter whole word, highest id (latest merge) first.
  everything = identifiers.rank_identifiers(tokenizer, exclude=frozenset())
  ids = [c.token_id for c in everything]
  assert ids == sorted(ids, reverse=True)
  texts = {c.text for c in everything}
  assert {"sks", "toy", "dog", "an", "the", "new", "old"} <= texts
  assert not texts & {"a", "photo", "checkered", "<|endoftext|>"}  # 1 letter, long, special
  assert all(identifiers.is_single_token(tokenizer, t) for t in texts)


def test_single_token_check(tokenizer):
  assert identifiers.is_single_token(tokenizer, "sks")
  assert not identifiers.is_single_token(tokenizer, "zqx")  # not in the tiny vocabulary
  assert not identifiers.is_single_token(tokenizer, "sks toy")


def test_auto_identifier_is_deterministic_and_rare(tokenizer):
  picks = {identifiers.choose_identifier(tokenizer, seed) for seed in range(5)}
  assert picks == {"sks"}  # the only candidate
  # With the common-word list off there are many candidates: each seed keeps its pick, picks
  # vary with the seed, and all come from the 5 rarest.
  top5 = [c.text for c in identifiers.rank_identifiers(tokenizer, exclude=frozenset())[:5]]
  picks = [identifiers.choose_identifier(tokenizer, seed, top=5, exclude=frozenset())
           for seed in range(10)]
  assert picks == [identifiers.choose_identifier(tokenizer, seed, top=5, exclude=frozenset())
                   for seed in range(10)]
  assert set(picks) <= set(top5) and len(set(picks)) > 1


def test_placeholders_are_filled_from_identifier_and_class(tokenizer):
  data = common.get_config().data
  data.identifier, data.class_name = "auto", "toy"
  prompts = identifiers.resolve_prompts(data, tokenizer, seed=0)
  assert prompts == identifiers.Prompts("sks", "a photo of sks toy", "a photo of toy")
  assert prompts.fill("a {identifier} {class} in the snow", "toy") == "a sks toy in the snow"
  data.identifier, data.instance_prompt = "sks", "a sks {class} on the beach"
  assert identifiers.resolve_prompts(data, tokenizer, 0).instance_prompt == (
      "a sks toy on the beach")


@pytest.mark.parametrize("field,value,message", [
    ("data.instance_prompt", "a photo of {subject}", r"unknown placeholder\(s\) \{subject\}"),
    ("data.instance_prompt", "a photo of {identifier", "not a valid template"),
    ("data.instance_prompt", "a photo of {class}", "does not contain the identifier"),
    ("data.class_prompt", "a photo of {identifier} {class}",
     r"unknown placeholder\(s\) \{identifier\}"),
    ("data.identifier", "two words", "must be one word or 'auto'"),
    ("data.class_name", "", "must be set: a prompt uses {class}"),
    ("sample.prompts", ("a {ident} on the beach",), r"unknown placeholder\(s\) \{ident\}"),
])
def test_bad_prompt_templates_are_refused(small_config, field, value, message):
  section, name = field.split(".")
  small_config[section][name] = value
  with pytest.raises(config_check.ConfigError, match=f"config.{field}: .*{message}"):
    config_check.check_config(small_config)


def test_auto_needs_the_placeholder(small_config):
  small_config.data.identifier = "auto"
  small_config.data.instance_prompt = "a photo of auto toy"
  with pytest.raises(config_check.ConfigError, match="placeholder {identifier}"):
    config_check.check_config(small_config)
  small_config.data.instance_prompt = "a photo of {identifier} {class}"
  config_check.check_config(small_config)


def test_identifiers_cli_lists_candidates(tiny_dir):
  result = subprocess.run([sys.executable, "-m", "dreambooth_jax.identifiers",
                           f"--pretrained={tiny_dir}", "--top=5", "--seed=3"],
                          capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr
  sks_id = models.load_tokenizer(tiny_dir).convert_tokens_to_ids("sks</w>")
  assert result.stdout.splitlines() == ["rank\ttoken_id\tidentifier", f"1\t{sks_id}\tsks"]
  assert "data.identifier=auto with seed=3 picks: sks" in result.stderr


def test_auto_draws_from_the_50_rarest_by_default(tokenizer, monkeypatch):
  """The README's "one of the 50 rarest", seen through a made-up ranking of 60 candidates."""
  ranking = [identifiers.Candidate(f"w{k}", 1000 - k) for k in range(60)]
  monkeypatch.setattr(identifiers, "rank_identifiers", lambda tokenizer, exclude: ranking)
  picks = {identifiers.choose_identifier(tokenizer, seed) for seed in range(400)}
  assert picks <= {f"w{k}" for k in range(50)}
  assert picks & {f"w{k}" for k in range(40, 50)}  # the pool reaches the 50th


def test_an_identifier_of_several_tokens_is_accepted_with_a_warning(tokenizer):
  data = common.get_config().data
  data.identifier, data.class_name = "sks toy", "dog"
  with mock.patch.object(logging, "warning") as warning:
    prompts = identifiers.resolve_prompts(data, tokenizer, seed=0)
  assert prompts.identifier == "sks toy"
  assert prompts.instance_prompt == "a photo of sks toy dog"
  message = warning.call_args.args[0] % warning.call_args.args[1:]
  assert message.startswith("data.identifier 'sks toy' is 2 tokens, not one")


class _StopAfterPrompts(Exception):
  pass


def test_a_run_with_auto_writes_the_identifier_it_used_to_prompts_json(tmp_path, monkeypatch):
  """The demo's run (whose toy-world tokenizer keeps three unused rare words) with
  data.identifier=auto, stopped where it lays out the mesh, just after prompts.json. Seed 0
  picks "zwx", not the default "sks"."""
  from configs import demo  # pylint: disable=g-import-not-at-top
  from dreambooth_jax import sharding, train  # pylint: disable=g-import-not-at-top

  def stop(*args, **kwargs):
    raise _StopAfterPrompts()

  monkeypatch.setattr(sharding, "make_mesh", stop)
  config = demo.get_config()
  config.data.identifier, config.seed, picked = "auto", 0, "zwx"
  with pytest.raises(_StopAfterPrompts):
    train.train_and_evaluate(config, str(tmp_path))
  tokenizer = models.load_tokenizer(config.model.pretrained)
  assert picked in [c.text for c in identifiers.rank_identifiers(tokenizer)][:50]
  with open(tmp_path / "prompts.json") as f:
    assert json.load(f) == {"identifier": picked, "instance_prompt": f"a {picked} ball",
                            "class_prompt": "a ball"}
