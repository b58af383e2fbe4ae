"""CLIP's byte-level BPE tokenizer on Hugging Face's `tokenizers` (Rust) package.

It reproduces transformers' slow (Python) CLIPTokenizer id for id, as it runs where ftfy is not
installed: text is cleaned by its BERT-style basic cleaner (control characters dropped,
whitespace collapsed, CJK ideographs spaced apart, NFC, lower case) rather than by ftfy; this
cleaning happens here in Python, then `tokenizers` splits off special tokens, pre-tokenizes
with CLIP's regex and applies the BPE merges. Reads tokenizer folders in both layouts
(vocab.json + merges.txt, and tokenizer.json, preferred when present), writes the former.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import tokenizers
from tokenizers import models as bpe_models
from tokenizers import pre_tokenizers

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
# CLIP's pre-tokenizer: the special tokens, English contractions, runs of letters, single
# digits, runs of other non-space characters. The reference compiles it case-insensitively;
# on already lower-cased text that only lets "'s" match the long s "'ſ" too, spelled out here.
_SPLIT_PATTERN = (r"<\|startoftext\|>|<\|endoftext\|>|'[sſ]|'t|'re|'ve|'m|'ll|'d|"
                  r"[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+")
# The reference reads at most this many merges from merges.txt (CLIP's 49408-token vocabulary:
# 512 byte symbols, the merges and two special tokens); later lines are ignored.
MAX_MERGES = 49152 - 256 - 2
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")
_DEFAULT_SPECIALS = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN,
                     "pad_token": EOS_TOKEN}
_TOKENIZER_CLASS = "CLIPTokenizer"


def bytes_to_unicode() -> dict[int, str]:
  """CLIP's (and GPT-2's) reversible table from bytes to printable characters.

  Bytes that are printable Latin-1 characters stand for themselves; the remaining ones (space,
  controls, ...) take the characters from U+0100 on, in byte order. Insertion order (the
  printable bytes first) is the vocabulary's order of its first 256 entries.
  """
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
               *range(ord("®"), ord("ÿ") + 1)]
  table = {byte: chr(byte) for byte in printable}
  spare = iter(range(256, 512))
  for byte in range(256):
    if byte not in table:
      table[byte] = chr(next(spare))
  return table


def _is_cjk_ideograph(code_point: int) -> bool:
  """The CJK Unified/Compatibility Ideograph blocks (not kana or hangul), as BERT defines."""
  return (0x4E00 <= code_point <= 0x9FFF or 0x3400 <= code_point <= 0x4DBF
          or 0x20000 <= code_point <= 0x2A6DF or 0x2A700 <= code_point <= 0x2B73F
          or 0x2B740 <= code_point <= 0x2B81F or 0x2B820 <= code_point <= 0x2CEAF
          or 0xF900 <= code_point <= 0xFAFF or 0x2F800 <= code_point <= 0x2FA1F)


def clean_text(text: str) -> str:
  """The text the reference tokenizer runs its regex on (its fallback cleaner, no ftfy).

  Drops NUL, U+FFFD and control/format characters, turns whitespace into spaces, puts spaces
  around CJK ideographs, NFC-normalises, then lower-cases word by word and joins the words
  with single spaces.
  """
  pieces = []
  for char in text:
    category = unicodedata.category(char)
    if char in " \t\n\r" or category == "Zs":
      pieces.append(" ")
    elif char in "\x00\ufffd" or category.startswith("C"):
      continue
    elif _is_cjk_ideograph(ord(char)):
      pieces.append(f" {char} ")
    else:
      pieces.append(char)
  words = unicodedata.normalize("NFC", "".join(pieces)).split()
  return " ".join(word.lower() for word in words)


@dataclasses.dataclass(frozen=True)
class AddedToken:
  """A token matched in the text before BPE (special tokens and the like), with transformers'
  flags; `normalized` is only carried through to the files we write."""
  content: str
  special: bool = True
  lstrip: bool = False
  rstrip: bool = False
  single_word: bool = False
  normalized: bool = False

  @classmethod
  def from_json(cls, value: str | Mapping[str, Any], special: bool = True) -> AddedToken:
    if isinstance(value, str):
      return cls(value, special=special)
    return cls(value["content"], special=value.get("special", special),
               lstrip=value.get("lstrip", False), rstrip=value.get("rstrip", False),
               single_word=value.get("single_word", False),
               normalized=value.get("normalized", False))

  def to_json(self) -> dict[str, Any]:
    return {"content": self.content, "lstrip": self.lstrip, "normalized": self.normalized,
            "rstrip": self.rstrip, "single_word": self.single_word, "special": self.special}


class ClipTokenizer:
  """A CLIP tokenizer: text -> fixed-length int32 id rows (BOS, tokens, EOS, padding)."""

  def __init__(self, vocab: Mapping[str, int], merges: Sequence[tuple[str, str]], *,
               model_max_length: int | None, special_tokens: Mapping[str, str] | None = None,
               added_tokens: Sequence[AddedToken] = ()):
    """`special_tokens` maps bos_token/eos_token/unk_token/pad_token to contents (CLIP's
    defaults for those left out); each must be in `vocab` or among `added_tokens`."""
    self._vocab = dict(vocab)
    self._merges = [tuple(merge) for merge in merges]
    self.model_max_length = model_max_length
    self.special_tokens = {**_DEFAULT_SPECIALS, **(special_tokens or {})}
    added = list(added_tokens)
    for content in self.special_tokens.values():
      if all(token.content != content for token in added):
        added.append(AddedToken(content))
    self.added_tokens = tuple(added)

    self._tokenizer = tokenizers.Tokenizer(bpe_models.BPE(
        vocab=self._vocab, merges=self._merges, unk_token=self.special_tokens["unk_token"],
        end_of_word_suffix="</w>", fuse_unk=False))
    self._tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(_SPLIT_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    self._tokenizer.add_special_tokens([
        tokenizers.AddedToken(t.content, single_word=t.single_word, lstrip=t.lstrip,
                              rstrip=t.rstrip, normalized=False, special=t.special)
        for t in self.added_tokens])
    for key, content in self.special_tokens.items():
      if self._tokenizer.token_to_id(content) is None:
        raise ValueError(f"tokenizer: {key} {content!r} has no id")

  # ---------------------------------------------------------------------------------------
  # Reading and writing folders.

  @classmethod
  def from_directory(cls, directory: str | os.PathLike) -> ClipTokenizer:
    """Reads a model's tokenizer/ folder (tokenizer.json if present, else vocab.json and
    merges.txt; special tokens and model_max_length from the two config files)."""
    directory = os.fspath(directory)
    config = _read_json_if_present(os.path.join(directory, "tokenizer_config.json"))
    special_map = _read_json_if_present(os.path.join(directory, "special_tokens_map.json"))
    tokenizer_json = os.path.join(directory, "tokenizer.json")
    if os.path.isfile(tokenizer_json):
      vocab, merges, added = _read_tokenizer_json(tokenizer_json)
    else:
      vocab_file = os.path.join(directory, "vocab.json")
      merges_file = os.path.join(directory, "merges.txt")
      for path in (vocab_file, merges_file):
        if not os.path.isfile(path):
          raise FileNotFoundError(f"tokenizer: {directory} has neither tokenizer.json nor "
                                  f"{os.path.basename(path)}")
      with open(vocab_file, encoding="utf-8") as f:
        vocab = json.load(f)
      merges = read_merges(merges_file)
      decoder = config.get("added_tokens_decoder", {})
      added = [AddedToken.from_json(decoder[i]) for i in sorted(decoder, key=int)]

    # As transformers: special_tokens_map.json wins over tokenizer_config.json.
    specials, special_flags = {}, {}
    for key in _SPECIAL_KEYS:
      value = special_map.get(key) or config.get(key)
      if value:
        token = AddedToken.from_json(value)
        specials[key] = token.content
        special_flags[token.content] = token
    for value in (special_map.get("additional_special_tokens")
                  or config.get("additional_special_tokens") or []):
      token = AddedToken.from_json(value)
      special_flags.setdefault(token.content, token)
    known = {token.content for token in added}
    added += [token for content, token in special_flags.items() if content not in known]
    max_length = config.get("model_max_length")
    return cls(vocab, merges, model_max_length=int(max_length) if max_length else None,
               special_tokens=specials, added_tokens=added)

  def save(self, directory: str | os.PathLike) -> None:
    """Writes vocab.json, merges.txt, special_tokens_map.json and tokenizer_config.json (the
    old hub layout, which transformers' CLIPTokenizer and `from_directory` both read)."""
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    _write_text(os.path.join(directory, "vocab.json"),
                json.dumps(self._vocab, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    _write_text(os.path.join(directory, "merges.txt"),
                "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in self._merges))
    _write_text(os.path.join(directory, "special_tokens_map.json"),
                _dumps(dict(sorted(self.special_tokens.items()))))
    decoder = {str(self._tokenizer.token_to_id(t.content)): t.to_json()
               for t in self.added_tokens}
    config = {"added_tokens_decoder": dict(sorted(decoder.items(), key=lambda kv: int(kv[0]))),
              **self.special_tokens, "model_max_length": self.model_max_length,
              "tokenizer_class": _TOKENIZER_CLASS}
    if self.model_max_length is None:
      del config["model_max_length"]
    _write_text(os.path.join(directory, "tokenizer_config.json"), _dumps(config))

  # ---------------------------------------------------------------------------------------
  # Tokenizing.

  def tokenize(self, text: str) -> list[str]:
    """The BPE tokens of `text` (no BOS/EOS), as CLIPTokenizer.tokenize."""
    return self._tokenizer.encode(clean_text(text), add_special_tokens=False).tokens

  def encode(self, texts: Sequence[str] | str, max_length: int | None = None) -> np.ndarray:
    """int32 ids [len(texts), max_length]: BOS, the tokens cut to fit, EOS, then padding.

    `max_length` defaults to model_max_length; one str counts as a batch of one text.
    """
    if isinstance(texts, str):
      texts = [texts]
    length = max_length or self.model_max_length
    if not length or length < 2:
      raise ValueError(f"tokenizer: max_length must be at least 2, got {length}")
    encodings = self._tokenizer.encode_batch([clean_text(t) for t in texts],
                                             add_special_tokens=False)
    ids = np.full((len(texts), length), self.pad_token_id, np.int32)
    for row, encoding in zip(ids, encodings):
      tokens = [self.bos_token_id, *encoding.ids[:length - 2], self.eos_token_id]
      row[:len(tokens)] = tokens
    return ids

  def convert_ids_to_tokens(self, ids: int | Iterable[int]) -> str | None | list[str | None]:
    if isinstance(ids, (int, np.integer)):
      return self._tokenizer.id_to_token(int(ids))
    return [self._tokenizer.id_to_token(int(i)) for i in ids]

  def convert_tokens_to_ids(self, tokens: str | Iterable[str]) -> int | list[int]:
    """Unknown tokens map to the unknown token's id, as in transformers."""
    unk = self._tokenizer.token_to_id(self.special_tokens["unk_token"])
    lookup = lambda token: (i if (i := self._tokenizer.token_to_id(token)) is not None else unk)
    return lookup(tokens) if isinstance(tokens, str) else [lookup(t) for t in tokens]

  def get_vocab(self) -> dict[str, int]:
    return self._tokenizer.get_vocab(with_added_tokens=True)

  def __len__(self) -> int:
    return self._tokenizer.get_vocab_size(with_added_tokens=True)

  @property
  def vocab_size(self) -> int:
    """The BPE vocabulary alone (transformers' vocab_size); len() also counts added tokens."""
    return len(self._vocab)

  @property
  def bos_token_id(self) -> int:
    return self._tokenizer.token_to_id(self.special_tokens["bos_token"])

  @property
  def eos_token_id(self) -> int:
    return self._tokenizer.token_to_id(self.special_tokens["eos_token"])

  @property
  def pad_token_id(self) -> int:
    return self._tokenizer.token_to_id(self.special_tokens["pad_token"])

  @property
  def unk_token_id(self) -> int:
    return self._tokenizer.token_to_id(self.special_tokens["unk_token"])


def read_merges(path: str) -> list[tuple[str, str]]:
  """merges.txt as the reference reads it: the first line (#version) and any line past
  MAX_MERGES skipped."""
  with open(path, encoding="utf-8") as f:
    lines = f.read().strip().split("\n")[1:MAX_MERGES + 1]
  return [tuple(line.split()) for line in lines if line.strip()]


def _read_tokenizer_json(path: str) -> tuple[dict[str, int], list[tuple[str, str]],
                                             list[AddedToken]]:
  with open(path, encoding="utf-8") as f:
    data = json.load(f)
  model = data.get("model", {})
  if model.get("type") != "BPE" or model.get("end_of_word_suffix") != "</w>":
    raise ValueError(f"tokenizer: {path} is not a CLIP byte-level BPE (model type "
                     f"{model.get('type')!r}, end_of_word_suffix "
                     f"{model.get('end_of_word_suffix')!r})")
  merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
  added = [AddedToken.from_json(t) for t in sorted(data.get("added_tokens", []),
                                                   key=lambda t: t["id"])]
  return dict(model["vocab"]), merges, added


def _read_json_if_present(path: str) -> dict[str, Any]:
  if not os.path.isfile(path):
    return {}
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _dumps(value: Any) -> str:
  return json.dumps(value, indent=2, ensure_ascii=False) + "\n"


def _write_text(path: str, text: str) -> None:
  with open(path, "w", encoding="utf-8") as f:
    f.write(text)


# -------------------------------------------------------------------------------------------
# Word tokenizers: the tiny and toy-world models' vocabularies.

def write_word_tokenizer_files(directory: str, words: Sequence[str]) -> None:
  """vocab.json and merges.txt of a CLIP byte-level BPE that keeps each of `words` whole.

  The vocabulary is the 256 byte symbols, the same with the end-of-word mark, then one token
  per merge, then BOS and EOS. A word's merges join its characters left to right; merges are
  numbered in the order of `words`, so a later word's tokens are rarer (which is what
  `identifiers` looks for). Any text still tokenizes: every byte has a symbol.
  """
  byte_symbols = list(bytes_to_unicode().values())
  vocab = byte_symbols + [symbol + "</w>" for symbol in byte_symbols]
  merges, seen = [], set()
  for word in words:
    symbols = [*word[:-1], word[-1] + "</w>"]
    merged = symbols[0]
    for right in symbols[1:]:
      merge = f"{merged} {right}"
      merged += right
      if merge not in seen:
        seen.add(merge)
        merges.append(merge)
        vocab.append(merged)
  vocab += [BOS_TOKEN, EOS_TOKEN]
  os.makedirs(directory, exist_ok=True)
  # Formatting as written before (json.dump defaults, one merge per line): the committed
  # tokenizers stay byte-identical.
  with open(os.path.join(directory, "vocab.json"), "w") as f:
    json.dump({token: i for i, token in enumerate(vocab)}, f)
  with open(os.path.join(directory, "merges.txt"), "w") as f:
    f.write("#version: 0.2\n" + "\n".join(merges) + "\n")


def build_word_tokenizer(words: Sequence[str], model_max_length: int) -> ClipTokenizer:
  """A ClipTokenizer that keeps each of `words` whole (SD 1.x specials: pads with EOS)."""
  with tempfile.TemporaryDirectory() as scratch:
    write_word_tokenizer_files(scratch, words)
    with open(os.path.join(scratch, "vocab.json"), encoding="utf-8") as f:
      vocab = json.load(f)
    merges = read_merges(os.path.join(scratch, "merges.txt"))
  return ClipTokenizer(vocab, merges, model_max_length=model_max_length)
