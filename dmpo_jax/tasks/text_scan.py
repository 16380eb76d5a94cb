"""Linear-time text scanning for rewards and evaluation scorers (bounded reward time).

Every reward and scorer sees at most ``MAX_TEXT_CHARS`` characters (:func:`bounded_text`) and
extracts with ``str.find`` scans whose total work is linear in the text, never with a regex that
can backtrack (``<answer>(.*?)</answer>`` with ``findall`` is quadratic on unclosed tags, the
d1 format regexes are quadratic on repeated tags, ``\\[BEGIN\\]\\s*(.*?)\\s*\\[DONE\\]`` is cubic
on whitespace). Each helper states the regex whose *exact* result it returns;
``tests/test_reward_bounds.py`` checks every one against the regex on generated text.
"""

from __future__ import annotations

import functools
import re
from typing import Callable, List, Optional, Tuple

import numpy as np

# Completions longer than this are scored on their first MAX_TEXT_CHARS characters (64 KiB of
# ASCII; a 512-token completion is about 2-3 thousand characters).
MAX_TEXT_CHARS = 65536
_SURROGATE = re.compile("[\ud800-\udfff]")
_WHITESPACE_RUN = re.compile(r"\s*")


def bounded_text(text: object) -> str:
  """The text a reward sees: ``str(text)`` cut to ``MAX_TEXT_CHARS`` characters, lone surrogates
  (which cannot be encoded, e.g. written to a file or a pipe as UTF-8) replaced by U+FFFD."""
  if not isinstance(text, str):
    text = str(text)
  text = text[:MAX_TEXT_CHARS]
  if not text.isascii():
    text = _SURROGATE.sub("\ufffd", text)
  return text


def bounded(function: Callable) -> Callable:
  """Decorator: the first argument (the completion) goes through :func:`bounded_text`."""

  @functools.wraps(function)
  def wrapper(completion, *args, **kwargs):
    return function(bounded_text(completion), *args, **kwargs)

  return wrapper


class NextFinder:
  """``find(needle, pos)`` for non-decreasing ``pos`` in amortised linear total time."""

  def __init__(self, text: str, needle: str):
    self.text, self.needle = text, needle
    self._pos, self._found = -1, -1

  def at(self, pos: int) -> int:
    if self._pos >= 0 and pos >= self._pos and (self._found < 0 or self._found >= pos):
      return self._found
    self._pos, self._found = pos, self.text.find(self.needle, pos)
    return self._found


def tag_blocks(text: str, open_tag: str, close_tag: str) -> List[Tuple[int, int]]:
  """(start, end) of every ``re.findall(open + "(.*?)" + close, text, re.DOTALL)`` group."""
  spans = []
  position = 0
  while True:
    start = text.find(open_tag, position)
    if start < 0:
      return spans
    start += len(open_tag)
    end = text.find(close_tag, start)
    if end < 0:
      return spans
    spans.append((start, end))
    position = end + len(close_tag)


def last_answer_block(text: str) -> Optional[str]:
  """Content of the last complete ``<answer>...</answer>`` block (the last group of
  ``findall(r"<answer>(.*?)</answer>", DOTALL)``), stripped; None if there is none."""
  spans = tag_blocks(text, "<answer>", "</answer>")
  if not spans:
    return None
  start, end = spans[-1]
  return text[start:end].strip()


def first_answer_block(text: str) -> Optional[str]:
  """Group of ``re.search(r"<answer>(.*?)</answer>", text, re.DOTALL)`` (not stripped)."""
  start = text.find("<answer>")
  if start < 0:
    return None
  end = text.find("</answer>", start + len("<answer>"))
  return None if end < 0 else text[start + len("<answer>"):end]


def answer_region(text: str) -> Optional[str]:
  """The answer a fixed-style reward reads: the text between the *last* ``<answer>`` and the next
  ``</answer>``, or the end of the text when it is never closed (a completion cut at EOS);
  stripped. None without an ``<answer>`` tag."""
  last_open = text.rfind("<answer>")
  if last_open < 0:
    return None
  start = last_open + len("<answer>")
  end = text.find("</answer>", start)
  return (text[start:end] if end >= 0 else text[start:]).strip()


def skip_whitespace(text: str, position: int) -> int:
  """End of the (possibly empty) run of ``\\s`` characters starting at ``position``."""
  return _WHITESPACE_RUN.match(text, position).end()


def soft_format_matches(text: str, dotall: bool) -> bool:
  """``re.match(r"<reasoning>.*?</reasoning>\\s*<answer>.*?</answer>", text, flags)``."""
  if not text.startswith("<reasoning>"):
    return False
  newline = NextFinder(text, "\n")
  close_answer = NextFinder(text, "</answer>")
  first_line_end = -1 if dotall else newline.at(len("<reasoning>"))
  position = len("<reasoning>")
  while True:
    close_reasoning = text.find("</reasoning>", position)
    if close_reasoning < 0:
      return False
    if not dotall and 0 <= first_line_end < close_reasoning:
      return False  # `.` cannot cross the newline
    after = skip_whitespace(text, close_reasoning + len("</reasoning>"))
    if text.startswith("<answer>", after):
      content = after + len("<answer>")
      end = close_answer.at(content)
      if end < 0:
        return False  # no later candidate can find a closing tag either
      if dotall:
        return True
      line_end = newline.at(content)
      if line_end < 0 or line_end >= end:
        return True
    position = close_reasoning + 1


_STRICT_OPEN = "<reasoning>\n"
_STRICT_MIDDLE = "\n</reasoning>\n<answer>\n"
_STRICT_CLOSE = "\n</answer>\n"


def strict_format_matches(text: str, dotall: bool) -> bool:
  """``re.match(r"^<reasoning>\\n.*?\\n</reasoning>\\n<answer>\\n.*?\\n</answer>\\n$", text,
  flags)`` (``$`` also matches before a final newline)."""
  if not text.startswith(_STRICT_OPEN):
    return False
  # `$` matches at the end and before a final newline.
  ends = [e for e in (len(text) - len(_STRICT_CLOSE), len(text) - len(_STRICT_CLOSE) - 1)
          if e >= 0 and text.startswith(_STRICT_CLOSE, e)
          and text[e + len(_STRICT_CLOSE):] in ("", "\n")]
  if not ends:
    return False
  start = len(_STRICT_OPEN)
  if dotall:
    middle = text.find(_STRICT_MIDDLE, start)
    return middle >= 0 and middle + len(_STRICT_MIDDLE) <= max(ends)
  middle = text.find("\n", start)
  if middle < 0 or not text.startswith(_STRICT_MIDDLE, middle):
    return False
  content = middle + len(_STRICT_MIDDLE)
  line_end = text.find("\n", content)
  return line_end in ends


def _braces(text: str, start: int):
  """(positions, signs) of the ``{`` (+1) and ``}`` (-1) at or after ``start``, found with numpy
  (one C pass; a Python loop over 64 Ki braces alone would take ~15 ms)."""
  codes = np.frombuffer(text[start:].encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
  positions = np.flatnonzero((codes == 123) | (codes == 125))
  signs = np.where(codes[positions] == 123, 1, -1).astype(np.int64)
  return positions + start, signs


def first_balanced_close(text: str, start: int) -> int:
  """Index of the first ``}`` at or after ``start`` where the running count (+1 per ``{``, -1 per
  ``}``, from ``start``) returns to 0; -1 if none (the Hendrycks ``last_boxed_only_string`` scan)."""
  positions, signs = _braces(text, start)
  hits = np.flatnonzero((signs < 0) & (np.cumsum(signs) == 0))
  return int(positions[hits[0]]) if hits.size else -1


def brace_partners(text: str, start: int = 0) -> dict:
  """``{index of "{": index of its matching "}"}`` for the braces at or after ``start``, as a
  stack would pair them (a ``}`` with no open brace is ignored; unmatched ``{`` are absent).

  Vectorised: the stack depth is the running sum reflected at 0 (depth = raw - min(0, running
  min of raw)); an opening brace at depth d pairs with the next non-ignored closing brace that
  starts at depth d, so a stable sort by depth puts partners next to each other.
  """
  positions, signs = _braces(text, start)
  if not positions.size:
    return {}
  raw = np.cumsum(signs)
  depth_after = raw - np.minimum.accumulate(np.minimum(raw, 0))
  depth_before = np.concatenate([[0], depth_after[:-1]])
  is_open = signs > 0
  counted = is_open | (depth_before > 0)  # closing braces on an empty stack are ignored
  level = np.where(is_open, depth_after, depth_before)[counted]
  kinds, places = is_open[counted], positions[counted]
  order = np.argsort(level, kind="stable")
  level, kinds, places = level[order], kinds[order], places[order]
  pair = kinds[:-1] & ~kinds[1:] & (level[:-1] == level[1:])
  return dict(zip(places[:-1][pair].tolist(), places[1:][pair].tolist()))
