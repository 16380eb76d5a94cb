"""Answer extraction and equivalence for MATH-style answers (`tasks.md` §3.4-§3.5).

``last_boxed_only_string``/``remove_boxed``/``strip_string``/``is_equiv`` follow the behaviour of
the Hendrycks MATH utilities used by d1 (string normalisation, not symbolic). ``math_verify_equal``
wraps the optional `math-verify` grader (gold first; not symmetric).
"""

from __future__ import annotations

import re
from typing import Optional

_NUMBER = re.compile(r"-?\d[\d,]*\.?\d*|-?\.\d+")


def last_boxed_only_string(text: str) -> Optional[str]:
  """The last ``\\boxed{...}`` (or ``\\fbox{...}``) with matched braces, wrapper included.

  ``\\boxed `` followed by a space returns ``"\\boxed " + <text up to the next $>`` (Hendrycks).
  None when there is no box or its braces never close.
  """
  if "\\boxed " in text:
    return "\\boxed " + text.split("\\boxed ")[-1].split("$")[0]
  start = text.rfind("\\boxed")
  if start < 0:
    start = text.rfind("\\fbox")
    if start < 0:
      return None
  depth = 0
  for position in range(start, len(text)):
    if text[position] == "{":
      depth += 1
    elif text[position] == "}":
      depth -= 1
      if depth == 0:
        return text[start:position + 1]
  return None


def remove_boxed(boxed: Optional[str]) -> Optional[str]:
  """Strips ``\\boxed{`` ... ``}`` (or ``\\boxed ``); None when ``boxed`` has another shape."""
  if boxed is None:
    return None
  if boxed.startswith("\\boxed "):
    return boxed[len("\\boxed "):]
  if boxed.startswith("\\boxed{") and boxed.endswith("}"):
    return boxed[len("\\boxed{"):-1]
  return None


def boxed_contents(text: str):
  """All ``\\boxed{...}`` contents in order (brace-matched), for GSM8K's first-box rule."""
  contents = []
  start = text.find("\\boxed{")
  while start >= 0:
    depth = 0
    end = None
    for position in range(start + len("\\boxed"), len(text)):
      if text[position] == "{":
        depth += 1
      elif text[position] == "}":
        depth -= 1
        if depth == 0:
          end = position
          break
    if end is None:
      break
    contents.append(text[start + len("\\boxed{"):end])
    start = text.find("\\boxed{", end)
  return contents


def _fix_fracs(string: str) -> str:
  """``\\frac12`` -> ``\\frac{1}{2}``, ``\\frac1{72}`` -> ``\\frac{1}{72}``."""
  pieces = string.split("\\frac")
  out = pieces[0]
  for piece in pieces[1:]:
    out += "\\frac"
    if not piece:
      raise ValueError("\\frac without an argument")  # the reference raises here too
    if piece.startswith("{"):
      out += piece
      continue
    if len(piece) < 2:
      return string
    numerator, rest = piece[0], piece[1:]
    if rest.startswith("{"):
      out += "{" + numerator + "}" + rest
    else:
      out += "{" + numerator + "}{" + rest[0] + "}" + rest[1:]
  return out


def _fix_a_slash_b(string: str) -> str:
  parts = string.split("/")
  if len(parts) != 2:
    return string
  try:
    a, b = int(parts[0]), int(parts[1])
  except ValueError:
    return string
  if string != f"{a}/{b}":
    return string
  return "\\frac{" + str(a) + "}{" + str(b) + "}"


def _fix_sqrt(string: str) -> str:
  """``\\sqrt3`` -> ``\\sqrt{3}`` (only the first character after ``\\sqrt``)."""
  pieces = string.split("\\sqrt")
  out = pieces[0]
  for piece in pieces[1:]:
    if not piece:
      raise ValueError("\\sqrt without an argument")  # the reference raises here too
    if piece[0] != "{":
      out += "\\sqrt{" + piece[0] + "}" + piece[1:]
    else:
      out += "\\sqrt" + piece
  return out


def strip_string(string: str) -> str:
  """Hendrycks-MATH answer normalisation (`tasks.md` §3.4, in that order)."""
  string = string.replace("\n", "").replace("\\!", "")
  string = string.replace("\\\\", "\\")
  string = string.replace("tfrac", "frac").replace("dfrac", "frac")
  string = string.replace("\\left", "").replace("\\right", "")
  string = string.replace("^{\\circ}", "").replace("^\\circ", "")
  string = string.replace("\\$", "")
  if "\\text{ " in string:
    pieces = string.split("\\text{ ")
    if len(pieces) != 2:
      raise ValueError(f"ambiguous units in {string!r}")
    string = pieces[0]
  string = string.replace("\\%", "")
  string = string.replace(" .", " 0.").replace("{.", "{0.")
  if not string:
    return string
  if string[0] == ".":
    string = "0" + string
  sides = string.split("=")
  if len(sides) == 2 and len(sides[0]) <= 2:
    string = sides[1]
  string = _fix_sqrt(string)
  string = string.replace(" ", "")
  string = _fix_fracs(string)
  if string == "0.5":
    string = "\\frac{1}{2}"
  return _fix_a_slash_b(string)


def is_equiv(first: Optional[str], second: Optional[str]) -> bool:
  """d1/Hendrycks: equal after ``strip_string`` (raw equality if normalisation fails).

  Both None counts as equal (as in the reference); one None as different.
  """
  if first is None and second is None:
    return True
  if first is None or second is None:
    return False
  try:
    return strip_string(first) == strip_string(second)
  except Exception:  # pylint: disable=broad-except
    return first == second


def math_verify_equal(gold: str, prediction: str) -> bool:
  """`math-verify` equivalence, gold first; boxes are added so bare answers parse as LaTeX.

  Timeouts are disabled (math-verify's ``signal.alarm`` only works in a main thread); call it from
  worker processes with their own wall-clock limit for untrusted inputs.
  """
  from math_verify import parse, verify  # pylint: disable=import-outside-toplevel
  try:
    gold_parsed = parse("\\boxed{" + gold + "}", parsing_timeout=None)
    pred_parsed = parse("\\boxed{" + prediction + "}", parsing_timeout=None)
    if not gold_parsed or not pred_parsed:
      return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=None))
  except Exception:  # pylint: disable=broad-except
    return False


def first_number(text: str) -> Optional[float]:
  match = _NUMBER.search(text)
  return parse_number(match.group(0)) if match else None


def last_number(text: str) -> Optional[float]:
  matches = _NUMBER.findall(text)
  return parse_number(matches[-1]) if matches else None


def parse_number(text: str) -> Optional[float]:
  """float() after removing commas, ``$`` and a trailing ``.``; None if it is no number."""
  cleaned = text.replace(",", "").replace("$", "").strip().rstrip(".")
  try:
    return float(cleaned)
  except ValueError:
    return None
