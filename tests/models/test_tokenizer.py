"""ClipTokenizer against transformers' slow CLIPTokenizer (the Python one, ftfy absent), id for id.

Tokenizer folders are written by every writer we meet: by hand in the old hub layout (as SD 1.x /
2.x repos have them), by CLIPTokenizer.save_pretrained, by CLIPTokenizerFast.save_pretrained
(tokenizer.json too), by ClipTokenizer.save; plus the committed toy-world tokenizer. The
vocabulary is a small CLIP-style BPE learnt here from a corpus (no downloads).
"""

import ast
import collections
import hashlib
import json
import os
import random
import shutil

import numpy as np
import pytest
import regex
from transformers import CLIPTokenizer, CLIPTokenizerFast

from dreambooth_jax import models, toyworld
from dreambooth_jax.models import tokenizer as tokenizer_lib
from dreambooth_jax.models.tokenizer import ClipTokenizer

MAX_LENGTH = 77
DREAMBOOTH_PROMPTS = [
    "a photo of sks dog", "a sks dog in the jungle", "a sks dog in the snow",
    "a sks dog on the beach", "a sks dog wearing a red hat", "a cube shaped sks dog",
    "a sks dog with a city in the background", "a shiny sks dog", "a wet sks dog",
    "a photo of dog", "a dog", "a photo of a sks backpack on top of a purple rug in a forest",
    "a red sks backpack", "a sks teapot floating in milk", "a transparent sks teapot with milk "
    "inside", "a painting of sks dog in the style of Vincent van Gogh"]
RARE_IDENTIFIERS = ["sks", "vkq", "zwx", "olis", "phol", "a sks", "sks sks", "zwx vkq olis"]
LONG_PROMPTS = [
    " ".join(["a photo of a sks dog on the beach"] * 12),  # ~100 tokens: cut, EOS kept at 76
    "".join(random.Random(1).choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(600)),
    "x" * 500]  # one word of many tokens
UNICODE_PROMPTS = [
    "café", "naïve", "Straße", "STRASSE", "a cafe\u0301 in paris", "🐶 dog 🐕‍🦺", "日本語の犬",
    "狗 在 海滩上", "한국어 강아지", "ΣΊΣΥΦΟΣ σίσυφος", "İstanbul", "ǅemal", "'ſ and 'S",
    "ﬁne ﬂower", "Ⅻ ½ ①", "\u00a0non\u00a0breaking\u3000space", "zero\u200bwidth",
    "bad \ufffd char \x00 nul", "tab\tnew\nline\r\n", "\u2028line\u2029sep\u0085"]
WHITESPACE_CASE_PUNCTUATION = [
    "", " ", "   a   photo  of\t\tsks   dog  ", "A PHOTO OF SKS DOG", "A Sks Dog!!", "dog's toy",
    "it's, they're, we've, I'm, you'll, he'd", "DOG'S", "hello!!! ...?!", "(sks) [dog] {toy}",
    "a-b_c/d\\e", "1234567890", "3.14 kg", "#hashtag @user", "<|endoftext|>",
    "a <|endoftext|> b", "<|startoftext|>sks", "<|ENDOFTEXT|>", "!", "!!", "a!b", "sks!dog"]
ALL_PROMPTS = (DREAMBOOTH_PROMPTS + RARE_IDENTIFIERS + LONG_PROMPTS + UNICODE_PROMPTS
               + WHITESPACE_CASE_PUNCTUATION)
# Random strings over characters that each exercise one rule of the cleaner or the regex.
_FUZZ_ALPHABET = ("abcdegiklnoprstyz ABSK!?.,'-\t\n\x00\x7f\u00a0\u3000é\u0301ſKßİǅΣς日本犬"
                  "한🐶\u200b\ufffd09½\u2028ﬁ<|>")
FUZZ_PROMPTS = ["".join(random.Random(i).choice(_FUZZ_ALPHABET)
                        for _ in range(random.Random(-i).randint(0, 40))) for i in range(400)]

# The corpus the test vocabulary's merges are learnt from: common words merge fully, rare
# identifiers and foreign words end up split, as in CLIP's real vocabulary.
_CORPUS = (" ".join(DREAMBOOTH_PROMPTS) * 3 + " the quick brown fox jumps over the lazy dog "
           "photo photograph painting picture of a an in on with the dog dogs cat cats sky "
           "it's you're they've we'll i'm he'd café naïve straße strasse 123 3.14 !! ... ?! "
           "hello world hat hats red green blue beach snow jungle city background")
_NUM_MERGES = 250
_CLIP_PATTERN = regex.compile(r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|"
                              r"[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+", regex.IGNORECASE)


def _learn_vocabulary(corpus: str, num_merges: int) -> tuple[dict[str, int], list[str]]:
  """A CLIP-layout BPE vocabulary (bytes, bytes</w>, merges, specials) learnt greedily."""
  byte_chars = tokenizer_lib.bytes_to_unicode()
  words = collections.Counter(
      tuple("".join(byte_chars[b] for b in piece.encode("utf-8")))
      for piece in _CLIP_PATTERN.findall(corpus.lower()))
  words = collections.Counter({w[:-1] + (w[-1] + "</w>",): n for w, n in words.items()})
  symbols = list(byte_chars.values())
  vocab = symbols + [s + "</w>" for s in symbols]
  merges = []
  for _ in range(num_merges):
    pairs = collections.Counter()
    for word, count in words.items():
      for pair in zip(word, word[1:]):
        pairs[pair] += count
    if not pairs:
      break
    best = max(pairs, key=lambda p: (pairs[p], p))
    merges.append(" ".join(best))
    vocab.append("".join(best))
    merged_words = collections.Counter()
    for word, count in words.items():
      out, i = [], 0
      while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == best:
          out.append(word[i] + word[i + 1])
          i += 2
        else:
          out.append(word[i])
          i += 1
      merged_words[tuple(out)] += count
    words = merged_words
  vocab += ["<|startoftext|>", "<|endoftext|>"]
  return {token: i for i, token in enumerate(vocab)}, merges


def _write_hub_folder(directory: str, vocab: dict[str, int], merges: list[str], pad: str):
  """The tokenizer folder of an SD 1.x (pad "<|endoftext|>") or 2.x (pad "!") hub repo."""
  os.makedirs(directory)
  with open(os.path.join(directory, "vocab.json"), "w", encoding="utf-8") as f:
    json.dump(vocab, f, ensure_ascii=False)
  with open(os.path.join(directory, "merges.txt"), "w", encoding="utf-8") as f:
    f.write("#version: 0.2 - Trained by `huggingface/tokenizers`\n" + "\n".join(merges) + "\n")
  token = lambda content: {"content": content, "lstrip": False, "normalized": True,
                           "rstrip": False, "single_word": False}
  special_map = {"bos_token": token("<|startoftext|>"), "eos_token": token("<|endoftext|>"),
                 "pad_token": pad if pad == "!" else "<|endoftext|>",
                 "unk_token": token("<|endoftext|>")}
  config = {"add_prefix_space": False, "bos_token": dict(token("<|startoftext|>"),
                                                          __type="AddedToken"),
            "do_lower_case": True, "eos_token": dict(token("<|endoftext|>"), __type="AddedToken"),
            "errors": "replace", "model_max_length": MAX_LENGTH,
            "name_or_path": "openai/clip-vit-large-patch14", "pad_token": pad,
            "special_tokens_map_file": None, "tokenizer_class": "CLIPTokenizer",
            "unk_token": dict(token("<|endoftext|>"), __type="AddedToken")}
  for name, value in (("special_tokens_map.json", special_map), ("tokenizer_config.json", config)):
    with open(os.path.join(directory, name), "w", encoding="utf-8") as f:
      json.dump(value, f, indent=2)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, tuple[str, str]]:
  """name -> (folder ClipTokenizer reads, folder the slow reference reads)."""
  root = tmp_path_factory.mktemp("tokenizers")
  vocab, merges = _learn_vocabulary(_CORPUS, _NUM_MERGES)
  result = {}
  for family, pad in (("sd1", "<|endoftext|>"), ("sd2", "!")):
    hub = str(root / f"hub_{family}")
    _write_hub_folder(hub, vocab, merges, pad)
    slow_dir, fast_dir = str(root / f"slow_{family}"), str(root / f"fast_{family}")
    CLIPTokenizer.from_pretrained(hub).save_pretrained(slow_dir)
    CLIPTokenizerFast.from_pretrained(hub).save_pretrained(fast_dir)
    json_only = str(root / f"tokenizer_json_only_{family}")
    shutil.copytree(fast_dir, json_only)
    os.remove(os.path.join(json_only, "vocab.json"))
    os.remove(os.path.join(json_only, "merges.txt"))
    result.update({f"hub_{family}": (hub, hub), f"slow_{family}": (slow_dir, slow_dir),
                   f"fast_{family}": (fast_dir, fast_dir),
                   f"tokenizer_json_only_{family}": (json_only, hub)})
  toy = os.path.join(toyworld.PRETRAINED_DIR, "tokenizer")
  result["toyworld"] = (toy, toy)
  return result


@pytest.fixture(scope="module")
def pairs(folders) -> dict[str, tuple[ClipTokenizer, CLIPTokenizer]]:
  return {name: (ClipTokenizer.from_directory(ours), CLIPTokenizer.from_pretrained(reference))
          for name, (ours, reference) in folders.items()}


def _reference_ids(reference: CLIPTokenizer, texts, max_length=None) -> np.ndarray:
  return np.array(reference(list(texts), padding="max_length", truncation=True,
                            max_length=max_length or reference.model_max_length).input_ids)


def test_the_test_vocabulary_splits_rare_words_and_keeps_common_ones(pairs):
  ours, _ = pairs["hub_sd1"]
  assert ours.tokenize("photo") == ["photo</w>"]
  assert ours.tokenize("dog") == ["dog</w>"]
  assert all(len(ours.tokenize(w)) > 1 for w in ("vkq", "zwx", "olis", "phol"))


@pytest.mark.parametrize("name", ["hub_sd1", "hub_sd2", "slow_sd1", "slow_sd2", "fast_sd1",
                                  "fast_sd2", "tokenizer_json_only_sd1",
                                  "tokenizer_json_only_sd2", "toyworld"])
def test_ids_and_tokens_equal_the_slow_reference(pairs, name):
  ours, reference = pairs[name]
  texts = ALL_PROMPTS + FUZZ_PROMPTS
  ids = ours.encode(texts)
  assert ids.dtype == np.int32 and ids.shape == (len(texts), reference.model_max_length)
  np.testing.assert_array_equal(ids, _reference_ids(reference, texts))
  for text in texts:
    assert ours.tokenize(text) == reference.tokenize(text), text
  assert ours.get_vocab() == reference.get_vocab()
  assert len(ours) == len(reference)
  assert ours.model_max_length == reference.model_max_length
  assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (
      reference.bos_token_id, reference.eos_token_id, reference.pad_token_id)
  every_id = list(range(len(reference) + 2))  # the last two: unknown ids
  assert ours.convert_ids_to_tokens(every_id) == reference.convert_ids_to_tokens(every_id)
  assert ours.convert_ids_to_tokens(3) == reference.convert_ids_to_tokens(3)


def test_padding_truncation_and_special_tokens(pairs):
  sd1, _ = pairs["hub_sd1"]
  sd2, _ = pairs["hub_sd2"]
  vocab = sd1.get_vocab()
  assert sd1.pad_token_id == sd1.eos_token_id == vocab["<|endoftext|>"]
  assert sd2.pad_token_id == vocab["!"] == 0  # SD 2.x pads with "!"
  long_ids = sd1.encode(LONG_PROMPTS[:1])[0]
  assert long_ids[0] == sd1.bos_token_id and long_ids[76] == sd1.eos_token_id
  assert sd1.eos_token_id not in long_ids[1:76]
  short = sd2.encode(["a dog"])[0]
  n = len(sd2.tokenize("a dog"))
  assert list(short[:n + 2]) == [sd2.bos_token_id, *sd2.convert_tokens_to_ids(
      sd2.tokenize("a dog")), sd2.eos_token_id]
  assert (short[n + 2:] == 0).all()
  # As the slow tokenizer does once "!" is a special (pad) token: every "!" is that token.
  assert sd2.tokenize("dog!!") == ["dog</w>", "!", "!"]
  assert sd1.tokenize("dog!!")[-1] != "!"
  np.testing.assert_array_equal(sd1.encode("a sks dog"), sd1.encode(["a sks dog"]))


@pytest.mark.parametrize("max_length", [3, 5, 16])
def test_explicit_max_length(pairs, max_length):
  ours, reference = pairs["hub_sd2"]
  texts = DREAMBOOTH_PROMPTS + LONG_PROMPTS + ["", "sks"]
  np.testing.assert_array_equal(ours.encode(texts, max_length=max_length),
                                _reference_ids(reference, texts, max_length))


def test_tokenizer_json_is_preferred(folders, tmp_path):
  """A folder whose tokenizer.json and vocab.json disagree is read from tokenizer.json."""
  fast_dir, _ = folders["fast_sd1"]
  folder = tmp_path / "both"
  shutil.copytree(fast_dir, folder)
  with open(folder / "vocab.json", "w", encoding="utf-8") as f:
    json.dump({"<|startoftext|>": 0, "<|endoftext|>": 1}, f)
  with open(folder / "merges.txt", "w", encoding="utf-8") as f:
    f.write("#version: 0.2\n")
  np.testing.assert_array_equal(ClipTokenizer.from_directory(folder).encode(ALL_PROMPTS),
                                ClipTokenizer.from_directory(fast_dir).encode(ALL_PROMPTS))


@pytest.mark.parametrize("name", ["hub_sd1", "hub_sd2", "fast_sd2", "toyworld"])
def test_save_is_read_back_identically_by_both(pairs, name, tmp_path):
  ours, original_reference = pairs[name]
  ours.save(tmp_path)
  assert sorted(os.listdir(tmp_path)) == ["merges.txt", "special_tokens_map.json",
                                          "tokenizer_config.json", "vocab.json"]
  again, reference = ClipTokenizer.from_directory(tmp_path), CLIPTokenizer.from_pretrained(tmp_path)
  texts = ALL_PROMPTS + FUZZ_PROMPTS[:100]
  expected = _reference_ids(original_reference, texts)
  np.testing.assert_array_equal(again.encode(texts), expected)
  np.testing.assert_array_equal(_reference_ids(reference, texts), expected)
  for tokenizer in (again, reference):
    assert tokenizer.get_vocab() == original_reference.get_vocab()
    assert tokenizer.model_max_length == original_reference.model_max_length
    assert tokenizer.pad_token_id == original_reference.pad_token_id


# SHA-256 of the files the project's earlier writer (transformers' bytes_to_unicode and
# CLIPTokenizer, before the model layer) wrote for TINY_WORDS: the tiny model's tokenizer files
# must not change.
EARLIER_WRITER_SHA256 = {
    "vocab.json": "0cc67a56cbd32e6bf6431d3bb46a03add024d14a64cfc99e5cc96fd920689f09",
    "merges.txt": "514b693a092328edb4890cbf37b675b82e0fc5d8fd43d52eba31c146ab8809be",
}


def test_word_tokenizer_files_are_byte_identical_to_the_earlier_writer(tmp_path):
  tokenizer_lib.write_word_tokenizer_files(str(tmp_path), models.TINY_WORDS)
  for name, digest in EARLIER_WRITER_SHA256.items():
    assert hashlib.sha256((tmp_path / name).read_bytes()).hexdigest() == digest, name


def test_byte_table_equals_transformers_in_content_and_order():
  from transformers.models.clip import tokenization_clip  # pylint: disable=g-import-not-at-top
  assert (list(tokenizer_lib.bytes_to_unicode().items())
          == list(tokenization_clip.bytes_to_unicode().items()))


def test_word_tokenizer_matches_the_slow_clip_tokenizer_on_its_files(tmp_path):
  from transformers import CLIPTokenizer  # pylint: disable=g-import-not-at-top
  ours = tokenizer_lib.build_word_tokenizer(models.TINY_WORDS, model_max_length=MAX_LENGTH)
  tokenizer_lib.write_word_tokenizer_files(str(tmp_path), models.TINY_WORDS)
  existing = CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"),
                           model_max_length=MAX_LENGTH)
  texts = DREAMBOOTH_PROMPTS + WHITESPACE_CASE_PUNCTUATION + UNICODE_PROMPTS
  np.testing.assert_array_equal(ours.encode(texts), _reference_ids(existing, texts))
  assert ours.get_vocab() == existing.get_vocab()
  for word in models.TINY_WORDS:
    assert ours.tokenize(word) == existing.tokenize(word)


def test_committed_toyworld_tokenizer_is_what_the_word_writer_writes(tmp_path):
  from dreambooth_jax.toyworld import pretrain  # pylint: disable=g-import-not-at-top
  tokenizer_lib.write_word_tokenizer_files(str(tmp_path), pretrain.tokenizer_words())
  committed = os.path.join(toyworld.PRETRAINED_DIR, "tokenizer")
  for name in ("vocab.json",):
    with open(tmp_path / name) as f, open(os.path.join(committed, name)) as g:
      assert json.load(f) == json.load(g)
  assert (tokenizer_lib.read_merges(str(tmp_path / "merges.txt"))
          == tokenizer_lib.read_merges(os.path.join(committed, "merges.txt")))
  built = tokenizer_lib.build_word_tokenizer(pretrain.tokenizer_words(), pretrain.MAX_LENGTH)
  loaded = ClipTokenizer.from_directory(committed)
  np.testing.assert_array_equal(built.encode(DREAMBOOTH_PROMPTS), loaded.encode(DREAMBOOTH_PROMPTS))
  assert all(len(loaded.tokenize(word)) == 1 for word in pretrain.tokenizer_words())


def test_clean_text_is_the_slow_tokenizers_fallback_cleaner():
  assert tokenizer_lib.clean_text("  A\tB\u00a0C\n") == "a b c"
  assert tokenizer_lib.clean_text("日本語") == "日 本 語"  # ideographs spaced, kana not
  assert tokenizer_lib.clean_text("の犬") == "の 犬"
  assert tokenizer_lib.clean_text("cafe\u0301") == "caf\u00e9"  # NFC
  assert tokenizer_lib.clean_text("a\x00b\u200bc\ufffd") == "abc"
