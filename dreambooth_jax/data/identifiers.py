"""Rare-token identifiers (DreamBooth §3.2) and the {identifier}/{class} prompt placeholders.

The paper binds the subject to a token that the model knows little about: a rare token of the
vocabulary that decodes to at most 3 characters without spaces. CLIP's tokenizer is byte-level
BPE, whose merges are numbered in the order they were learned, most frequent pair first; so a
whole-word token with a high id was learned late, from text where it is rare. The candidates
are whole-word tokens of 2 to 3 lowercase ASCII letters, highest id first, minus common short
English words and abbreviations (strong priors, see COMMON_SHORT_WORDS), each checked to stay a
single token inside a prompt. `python -m dreambooth_jax.identifiers` (the command) lists them.
"""

from __future__ import annotations

import dataclasses
import re
import string

import numpy as np

AUTO = "auto"
_LETTERS = re.compile(r"^[a-z]{2,3}$")

# Words and abbreviations of 2-3 letters whose meaning the text encoder knows well: an
# identifier among them would start from that meaning instead of from (almost) nothing.
COMMON_SHORT_WORDS = frozenset("""
ab ad ah ai am an as at aw ax ay be bi bo by da de do eh el em en er es ex fa go ha he hi
hm ho id if in is it jo ka la li lo ma me mi mm mo mu my na no nu ob of oh oi ok om on op or
os ou ow ox oy pa pe pi po qi re sh si so ta te ti to uh um un up us ut we wo xi xu ya ye yo
ace act add ado ads aft age ago aid ail aim air ale all amp and ant any ape app apt arc are
ark arm art ash ask asp ate awe axe aye bad bag ban bar bat bay bed bee beg bet bib bid big
bin bit boa bob bog boo bop bow box boy bra bro bud bug bum bun bus but buy bye cab cad cam
can cap car cat caw cob cod cog con coo cop cot cow coy cry cub cud cue cup cur cut dab dad
dam day den dew did die dig dim din dip doc doe dog don dot dry dub dud due dug duh dun duo
dye ear eat ebb eel egg ego eke elf elk elm emu end eon era ere erg err eve ewe eye fab fad
fag fan far fat fax fay fed fee fen few fey fez fib fig fin fir fit fix flu fly fob foe fog
fop for fox fro fry fun fur gab gag gal gap gas gay gee gel gem get gig gin gnu gob god goo
got gum gun gut guy gym had hag ham has hat haw hay hem hen her hew hex hey hid him hip his
hit hob hoe hog hop hot how hub hue hug huh hum hut ice icy ill imp ink inn ion ire irk its
ivy jab jag jam jar jaw jay jet jig job jog jot joy jug jut keg ken key kid kin kit lab lad
lag lap law lax lay lea led leg let lid lie lip lit lob log loo lop lot low lug lux mad man
map mar mat maw max may men met mew mid mix mob mod mom moo mop mow mud mug mum nab nag nap
nay neb net new nib nil nip nit nod nor not now nub nun nut oaf oak oar oat odd ode off oft
ohm oil old one opt orb ore our out owe owl own pad pal pan pap par pat paw pay pea peg pen
pep per pet pew pie pig pin pit ply pod pop pot pow pro pry pub pug pun pup pus put rag ram
ran rap rat raw ray red rib rid rig rim rip rob rod roe rot row rub rue rug rum run rut rye
sac sad sag sap sat saw sax say sea see set sew sex she shy sip sir sis sit six ski sky sly
sob sod son sop sot sow soy spa spy sty sub sue sum sun sup tab tad tag tan tap tar tat tau
tax tea tee ten the thy tic tie tin tip toe tog tom ton too top tot tow toy try tub tug tux
two urn use van vat vet vex via vie vim vow wad wag wan war was wax way web wed wee wet who
why wig win wit woe wok won woo wow wry yak yam yap yaw yea yen yes yet yew yin you yum zap
zed zen zip zit zoo
abc aka atm bbc bmw cbs cd cia cnn cpu dc dj dna dvd eu fbi fm gb gps hd hiv hp ibm jpg kg
km lcd led mba mp mph mr mrs ms mtv nasa nba nfl nyc pc pdf phd pm png ps psd rgb sf sms tv
uk un ups usa usb vip vr wifi www xl xxl
""".split())


@dataclasses.dataclass(frozen=True)
class Candidate:
  text: str  # what the user writes in a prompt
  token_id: int


def rank_identifiers(tokenizer, exclude: frozenset[str] = COMMON_SHORT_WORDS) -> list[Candidate]:
  """Rare-token candidates, rarest (highest BPE id) first."""
  candidates = []
  for token, token_id in tokenizer.get_vocab().items():
    if not token.endswith("</w>"):
      continue  # only whole-word tokens stay one token when followed by a space
    text = token[:-len("</w>")]
    if not _LETTERS.match(text) or text in exclude:
      continue
    if is_single_token(tokenizer, text):
      candidates.append(Candidate(text, token_id))
  return sorted(candidates, key=lambda c: -c.token_id)


def is_single_token(tokenizer, text: str) -> bool:
  """Whether `text` is one token in a prompt (between words)."""
  return len(tokenizer.tokenize(f"a {text} b")) == 3


def choose_identifier(tokenizer, seed: int, top: int = 50,
                      exclude: frozenset[str] = COMMON_SHORT_WORDS) -> str:
  """A candidate among the `top` rarest, chosen by `seed`, so a rerun picks the same one."""
  candidates = rank_identifiers(tokenizer, exclude)[:top]
  if not candidates:
    raise ValueError("data.identifier=auto: the tokenizer has no rare 2-3 letter token")
  return candidates[np.random.default_rng(seed).integers(len(candidates))].text


def placeholder_names(prompt: str) -> set[str]:
  return {name for _, name, _, _ in string.Formatter().parse(prompt) if name is not None}


def fill(prompt: str, identifier: str, class_name: str) -> str:
  """Replaces {identifier} and {class} in a prompt."""
  return prompt.format(**{"identifier": identifier, "class": class_name})


@dataclasses.dataclass(frozen=True)
class Prompts:
  identifier: str
  instance_prompt: str
  class_prompt: str

  def fill(self, prompt: str, class_name: str) -> str:
    return fill(prompt, self.identifier, class_name)


def resolve_prompts(data_config, tokenizer, seed: int) -> Prompts:
  """The identifier (picked if "auto") and the instance and class prompts with it filled in."""
  identifier = data_config.identifier
  if identifier == AUTO:
    identifier = choose_identifier(tokenizer, seed)
  elif not is_single_token(tokenizer, identifier):
    from absl import logging  # pylint: disable=g-import-not-at-top
    logging.warning("data.identifier %r is %d tokens, not one; a single rare token binds best "
                    "(python -m dreambooth_jax.identifiers lists some)", identifier,
                    len(tokenizer.tokenize(identifier)))
  return Prompts(identifier,
                 fill(data_config.instance_prompt, identifier, data_config.class_name),
                 fill(data_config.class_prompt, identifier, data_config.class_name))
