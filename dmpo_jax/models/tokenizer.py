"""Tokenizers and chat templates (`docs/llada.md` §4, §9, §10.2).

One interface, `Tokenizer`, with two implementations:

* `HFTokenizer`: a ``tokenizer.json`` loaded with the `tokenizers` library (no network, no custom
  code); special ids come from the checkpoint folder (`hf_io.resolve_special_token_ids`:
  config.json > tokenizer_config.json > token strings in tokenizer.json > family defaults).
* `ByteTokenizer`: ids 0..255 are bytes, 256.. the special tokens of the ``tiny`` preset
  (vocabulary 264); exact and dependency-free, for unit tests and the demo.

Chat templates are rendered with plain string formatting (no jinja):

* ``llama3`` (LLaDA, `docs/llada.md` §4): ``BOS`` then, for every message (system included),
  ``<|start_header_id|>{role}<|end_header_id|>\\n\\n{content.strip()}<|eot_id|>``, then the
  assistant header ``<|start_header_id|>assistant<|end_header_id|>\\n\\n`` unconditionally.
* ``chatml`` (Dream / Qwen2.5): ``<|im_start|>system\\n{system or "You are a helpful
  assistant."}<|im_end|>\\n``, then ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per remaining
  message, then ``<|im_start|>assistant\\n``.

An optional ``prefill`` (d1 evaluation uses ``<reasoning>``) is appended after the assistant
header. The rendered string is encoded without adding special tokens; the special-token strings
it contains are recognised as single ids.
"""

from __future__ import annotations

import abc
import os
import pathlib
import re
from typing import Any, Mapping, Optional, Sequence, Union

from dmpo_jax.models import hf_io

PathLike = Union[str, os.PathLike]
Message = Mapping[str, str]

CHAT_FORMATS = ("llama3", "chatml")
_FAMILY_CHAT_FORMAT = {"llada": "llama3", "dream": "chatml"}
CHATML_DEFAULT_SYSTEM = "You are a helpful assistant."
START_HEADER, END_HEADER = "<|start_header_id|>", "<|end_header_id|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"


def _check_messages(messages: Sequence[Message]) -> None:
  if not messages:
    raise ValueError("chat template needs at least one message")
  for i, message in enumerate(messages):
    if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
      raise ValueError(f"message {i} must be a mapping with 'role' and 'content', got {message!r}")


def render_llama3_chat(messages: Sequence[Message], *, bos_token: str, eot_token: str,
                       prefill: str = "") -> str:
  """LLaDA-8B-Instruct's template (`docs/llada.md` §4); the assistant header is always appended."""
  _check_messages(messages)
  turns = "".join(f"{START_HEADER}{m['role']}{END_HEADER}\n\n{m['content'].strip()}{eot_token}"
                  for m in messages)
  return f"{bos_token}{turns}{START_HEADER}assistant{END_HEADER}\n\n{prefill}"


def render_chatml(messages: Sequence[Message], *, prefill: str = "",
                  default_system: str = CHATML_DEFAULT_SYSTEM) -> str:
  """Dream's ChatML template (Qwen2.5 without tools): a leading system message replaces the default
  system prompt; contents are not stripped; the generation prompt is appended."""
  _check_messages(messages)
  if messages[0]["role"] == "system":
    system, rest = messages[0]["content"], messages[1:]
  else:
    system, rest = default_system, messages
  parts = [f"{IM_START}system\n{system}{IM_END}\n"]
  parts += [f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in rest]
  return "".join(parts) + f"{IM_START}assistant\n{prefill}"


class Tokenizer(abc.ABC):
  """Common interface of the project's tokenizers."""

  chat_format: str

  @abc.abstractmethod
  def encode(self, text: str) -> list[int]:
    """Token ids of ``text``; no special tokens are added, special-token strings in ``text`` map
    to their single ids."""

  @abc.abstractmethod
  def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    """Text of ``ids``; special tokens are dropped when ``skip_special_tokens``."""

  @abc.abstractmethod
  def token_string(self, token_id: int) -> str:
    """The string of one token id (used to render special tokens in templates)."""

  @property
  @abc.abstractmethod
  def vocab_size(self) -> int:
    """Largest id the tokenizer can produce + 1 (the model's embedding may have more rows)."""

  @property
  @abc.abstractmethod
  def special_ids(self) -> Mapping[str, Optional[int]]:
    """{mask,eos,pad,eot,bos}_token_id."""

  @property
  def mask_token_id(self) -> int:
    return self.special_ids["mask_token_id"]

  @property
  def eos_token_id(self) -> int:
    return self.special_ids["eos_token_id"]

  @property
  def pad_token_id(self) -> int:
    return self.special_ids["pad_token_id"]

  @property
  def eot_token_id(self) -> Optional[int]:
    return self.special_ids["eot_token_id"]

  @property
  def bos_token_id(self) -> Optional[int]:
    return self.special_ids["bos_token_id"]

  def batch_decode(self, batch: Sequence[Sequence[int]], skip_special_tokens: bool = True) -> list[str]:
    return [self.decode(ids, skip_special_tokens=skip_special_tokens) for ids in batch]

  def apply_chat_template(self, messages: Sequence[Message], prefill: str = "") -> str:
    """The prompt string for ``messages`` (`render_llama3_chat` or `render_chatml`)."""
    if self.chat_format == "llama3":
      if self.bos_token_id is None or self.eot_token_id is None:
        raise ValueError("the llama3 chat template needs BOS and EOT tokens; this tokenizer has "
                         f"bos={self.bos_token_id}, eot={self.eot_token_id}")
      return render_llama3_chat(messages, bos_token=self.token_string(self.bos_token_id),
                                eot_token=self.token_string(self.eot_token_id), prefill=prefill)
    return render_chatml(messages, prefill=prefill)

  def encode_chat(self, messages: Sequence[Message], prefill: str = "") -> list[int]:
    """`encode(apply_chat_template(messages, prefill))`."""
    return self.encode(self.apply_chat_template(messages, prefill=prefill))


class HFTokenizer(Tokenizer):
  """A ``tokenizer.json`` (HF fast tokenizer format) through the `tokenizers` library."""

  def __init__(self, tokenizer: Any, special_ids: Mapping[str, Optional[int]], chat_format: str):
    if chat_format not in CHAT_FORMATS:
      raise ValueError(f"chat_format must be one of {CHAT_FORMATS}, got {chat_format!r}")
    missing = set(hf_io.SPECIAL_TOKEN_FIELDS) - set(special_ids)
    if missing:
      raise ValueError(f"special_ids is missing {sorted(missing)}")
    for field, token_id in special_ids.items():
      if token_id is not None and tokenizer.id_to_token(token_id) is None and field != "pad_token_id":
        raise ValueError(f"{field}={token_id} is not a token of this tokenizer")
    self._tokenizer = tokenizer
    self._special_ids = dict(special_ids)
    self.chat_format = chat_format
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    self._vocab_size = max(vocab.values()) + 1

  @classmethod
  def from_dir(cls, path: PathLike, family: Optional[str] = None) -> "HFTokenizer":
    """Loads ``path/tokenizer.json``; the family (chat format, default special tokens) comes from
    ``family``, else ``config.json``'s model_type, else the vocabulary (``<|im_start|>`` -> Dream)."""
    import tokenizers
    folder = pathlib.Path(path)
    file = folder / hf_io.TOKENIZER_FILE
    if not file.is_file():
      raise FileNotFoundError(f"Tokenizer file {file} not found")
    tokenizer = tokenizers.Tokenizer.from_file(str(file))
    hf_config = hf_io.read_hf_config(folder) if (folder / hf_io.CONFIG_FILE).is_file() else None
    if family is None:
      if hf_config is not None:
        family = hf_io.family_of(hf_config, str(folder / hf_io.CONFIG_FILE))
      else:
        family = "dream" if tokenizer.token_to_id(IM_START) is not None else "llada"
    special_ids = hf_io.resolve_special_token_ids(folder, family, hf_config, tokenizer=tokenizer)
    return cls(tokenizer, special_ids, _FAMILY_CHAT_FORMAT[family])

  @property
  def backend(self) -> Any:
    """The underlying `tokenizers.Tokenizer`."""
    return self._tokenizer

  @property
  def vocab_size(self) -> int:
    return self._vocab_size

  @property
  def special_ids(self) -> Mapping[str, Optional[int]]:
    return self._special_ids

  def token_string(self, token_id: int) -> str:
    token = self._tokenizer.id_to_token(token_id)
    if token is None:
      raise ValueError(f"token id {token_id} is not in the vocabulary")
    return token

  def encode(self, text: str) -> list[int]:
    return list(self._tokenizer.encode(text, add_special_tokens=False).ids)

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    # Ids without a token (embedding padding rows) are dropped by the library.
    return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def batch_decode(self, batch: Sequence[Sequence[int]], skip_special_tokens: bool = True) -> list[str]:
    return self._tokenizer.decode_batch([[int(i) for i in ids] for ids in batch],
                                        skip_special_tokens=skip_special_tokens)


class ByteTokenizer(Tokenizer):
  """Byte-level vocabulary of the ``tiny`` preset: ids 0..255 are UTF-8 bytes, then the specials
  below (256..263), vocabulary 264. Uses LLaDA's chat format and special-token strings."""

  SPECIAL_TOKENS = ("<|mdm_mask|>", "<|endoftext|>", "<|eot_id|>", "<|startoftext|>",
                    START_HEADER, END_HEADER, "<|reserved_token_0|>", "<|reserved_token_1|>")
  FIRST_SPECIAL_ID = 256

  def __init__(self):
    self.chat_format = "llama3"
    self._special_to_id = {t: self.FIRST_SPECIAL_ID + i for i, t in enumerate(self.SPECIAL_TOKENS)}
    self._split = re.compile("(" + "|".join(re.escape(t) for t in self.SPECIAL_TOKENS) + ")")
    ids = self._special_to_id
    eos = ids["<|endoftext|>"]
    self._special_ids = {"mask_token_id": ids["<|mdm_mask|>"], "eos_token_id": eos,
                         "pad_token_id": eos, "eot_token_id": ids["<|eot_id|>"],
                         "bos_token_id": ids["<|startoftext|>"]}

  @property
  def vocab_size(self) -> int:
    return self.FIRST_SPECIAL_ID + len(self.SPECIAL_TOKENS)

  @property
  def special_ids(self) -> Mapping[str, Optional[int]]:
    return self._special_ids

  def token_string(self, token_id: int) -> str:
    if self.FIRST_SPECIAL_ID <= token_id < self.vocab_size:
      return self.SPECIAL_TOKENS[token_id - self.FIRST_SPECIAL_ID]
    if 0 <= token_id < self.FIRST_SPECIAL_ID:
      return bytes([token_id]).decode("latin-1")
    raise ValueError(f"token id {token_id} is outside the byte vocabulary [0, {self.vocab_size})")

  def encode(self, text: str) -> list[int]:
    ids: list[int] = []
    for piece in self._split.split(text):
      if piece in self._special_to_id:
        ids.append(self._special_to_id[piece])
      else:
        ids.extend(piece.encode("utf-8"))
    return ids

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    """Invalid UTF-8 (possible in model samples) decodes to U+FFFD."""
    out, pending = [], bytearray()
    for token_id in (int(i) for i in ids):
      if 0 <= token_id < self.FIRST_SPECIAL_ID:
        pending.append(token_id)
        continue
      if not self.FIRST_SPECIAL_ID <= token_id < self.vocab_size:
        raise ValueError(f"token id {token_id} is outside the byte vocabulary [0, {self.vocab_size})")
      out.append(pending.decode("utf-8", errors="replace"))
      pending = bytearray()
      if not skip_special_tokens:
        out.append(self.SPECIAL_TOKENS[token_id - self.FIRST_SPECIAL_ID])
    out.append(pending.decode("utf-8", errors="replace"))
    return "".join(out)


def load_tokenizer(path_or_name: PathLike, family: Optional[str] = None) -> Tokenizer:
  """``"byte"`` -> `ByteTokenizer`; a folder with ``tokenizer.json`` -> `HFTokenizer`; a project
  model checkpoint converted from HF (``<folder>/hf_files/tokenizer.json``) -> its `HFTokenizer`."""
  if str(path_or_name) == "byte":
    return ByteTokenizer()
  folder = pathlib.Path(path_or_name)
  for candidate in (folder, folder / hf_io.HF_FILES_DIR):
    if candidate.is_dir() and (candidate / hf_io.TOKENIZER_FILE).is_file():
      return HFTokenizer.from_dir(candidate, family=family)
  if folder.is_dir():
    raise FileNotFoundError(f"{folder} has no {hf_io.TOKENIZER_FILE}")
  raise FileNotFoundError(f"Unknown tokenizer {str(path_or_name)!r}: expected 'byte' or a folder "
                          f"with {hf_io.TOKENIZER_FILE}")
