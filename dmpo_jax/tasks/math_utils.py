"""Answer extraction and equivalence for MATH-style answers (`docs/tasks.md` §3.4-§3.5).

``last_boxed_only_string``/``remove_boxed``/``strip_string``/``is_equiv`` follow the behaviour of
the Hendrycks MATH utilities used by d1 (string normalisation, not symbolic). ``math_verify_equal``
wraps the optional `math-verify` grader (gold first; not symmetric).
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import List, Optional, Tuple

from dmpo_jax.tasks import text_scan

NUMBER = re.compile(r"-?\d[\d,]*\.?\d*|-?\.\d+")
_LEADING_NUMBER = re.compile(r"\s*\$?\s*(-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?)(?![\d,])")


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
  end = text_scan.first_balanced_close(text, start)
  return text[start:end + 1] if end >= 0 else None


def remove_boxed(boxed: Optional[str]) -> Optional[str]:
  """Strips ``\\boxed{`` ... ``}`` (or ``\\boxed ``); None when ``boxed`` has another shape."""
  if boxed is None:
    return None
  if boxed.startswith("\\boxed "):
    return boxed[len("\\boxed "):]
  if boxed.startswith("\\boxed{") and boxed.endswith("}"):
    return boxed[len("\\boxed{"):-1]
  return None


def boxed_spans(text: str, unclosed_leading_number: bool = False) -> List[Tuple[int, int]]:
  """(start, end) of every ``\\boxed{...}`` content in order (brace-matched, nested boxes
  included), found in one pass.

  With ``unclosed_leading_number`` a box whose braces never close contributes the span of the
  number it starts with (``\\boxed{360\\text{ hours}...`` -> ``360``), if any.
  """
  partners = text_scan.brace_partners(text)
  spans = []
  position = text.find("\\boxed{")
  while position >= 0:
    brace = position + len("\\boxed")
    end = partners.get(brace)
    if end is not None:
      spans.append((brace + 1, end))
    elif unclosed_leading_number:
      leading = _LEADING_NUMBER.match(text, brace + 1)
      if leading:
        spans.append(leading.span(1))
    position = text.find("\\boxed{", brace)
  return spans


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


def _fix_a_slash_b(string: str, reference_exact: bool = False) -> str:
  """``a/b`` (integers) -> ``\\frac{a}{b}``. ``reference_exact``: a non-integer side raises
  ``ValueError`` as in the Hendrycks code (so ``is_equiv`` falls back to raw equality)."""
  parts = string.split("/")
  if len(parts) != 2:
    return string
  try:
    a, b = int(parts[0]), int(parts[1])
  except ValueError:
    if reference_exact:
      raise
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


def strip_string(string: str, reference_exact: bool = False) -> str:
  """Hendrycks-MATH answer normalisation (`docs/tasks.md` §3.4, in that order); ``reference_exact``
  keeps the reference's ``ValueError`` on ``x/y`` with a non-integer side."""
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
  return _fix_a_slash_b(string, reference_exact)


def is_equiv(first: Optional[str], second: Optional[str], reference_exact: bool = False) -> bool:
  """d1/Hendrycks: equal after ``strip_string`` (raw equality if normalisation fails).

  Both None counts as equal (as in the reference); one None as different.
  """
  if first is None and second is None:
    return True
  if first is None or second is None:
    return False
  try:
    return strip_string(first, reference_exact) == strip_string(second, reference_exact)
  except Exception:  # pylint: disable=broad-except
    return first == second


def math_verify_equal(gold: str, prediction: str) -> bool:
  """`math-verify` equivalence, gold first; boxes are added so bare answers parse as LaTeX.

  Runs in a worker process killed past `math_verify_worker.CALL_TIMEOUT_S` (then False), so an
  answer such as ``9^{9^{9}}`` or ``1000000!`` cannot stall the caller. A prediction that offers
  alternatives or holds a scale word the gold lacks is refused first (math-verify reads
  ``17 \\text{ (or } 18)`` as 18 and ``18 \\text{ thousand}`` as 18).
  """
  for check in (states_alternatives, has_scale_word):
    if check(prediction) and not check(gold):
      return False
  from dmpo_jax.tasks import math_verify_worker  # pylint: disable=import-outside-toplevel
  return math_verify_worker.shared_worker().equal(gold, prediction)


def last_number(text: str) -> Optional[float]:
  matches = NUMBER.findall(text)
  return parse_number(matches[-1]) if matches else None


def parse_number(text: str) -> Optional[float]:
  """float() after removing commas, ``$`` and a trailing ``.``; None if it is no number."""
  cleaned = text.replace(",", "").replace("$", "").strip().rstrip(".")
  try:
    return float(cleaned)
  except ValueError:
    return None


# A final numeric answer in the forms models write inside <answer>: optional $ / \\$, a signed
# number with optional thousands commas (43,500 or LaTeX 43{,}500) and decimals, then optionally a
# percent sign, a unit (words, \\text{...}, \\mbox{...}) and a final period. A unit that starts
# with a scale word (`SCALES`: "18 thousand", "18k", "1.5 \\text{ million} dollars") scales the number.
_NUMERIC_ANSWER = re.compile(
    r"(?:\\?\$)?\s*(?P<number>[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+)\s*(?:\\?\$)?"
    r"\s*(?P<unit>\\?%|\\(?:text|mbox|mathrm)\{\s*[A-Za-z][A-Za-z .'/-]{0,40}\}|"
    r"[A-Za-z][A-Za-z .'/-]{0,40})?\s*\.?")
SCALES = {"k": 1000, "thousand": 1000, "hundred": 100, "million": 10 ** 6, "billion": 10 ** 9,
          "trillion": 10 ** 12, "dozen": 12}
_SCALE_WORD = re.compile(r"\b(?:thousand|hundred|million|billion|trillion|dozen)s?\b|\d\s*[kK]\b",
                         re.IGNORECASE)
# Words that state more than one answer ("17 (or 18)", "either 3 or 4").
_ALTERNATIVES = re.compile(r"\b(?:or|either)\b", re.IGNORECASE)
_MATH_DELIMITERS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))
MAX_NUMERIC_ANSWER_CHARS = 200


def unwrap_answer(text: str) -> str:
  """The final answer inside an answer region: the content of its last ``\\boxed{}`` (an unclosed
  box: the text after ``\\boxed{``), without math delimiters (``$``, ``\\(...\\)``,
  ``\\[...\\]``) and a final period."""
  text = text.strip()
  boxed = remove_boxed(last_boxed_only_string(text))
  if boxed is None and "\\boxed{" in text:
    boxed = text[text.rfind("\\boxed{") + len("\\boxed{"):]
  if boxed is not None:
    text = boxed.strip()
  for opening, closing in _MATH_DELIMITERS:
    if len(text) > len(opening) + len(closing) and text.startswith(opening) and text.endswith(
        closing):
      text = text[len(opening):-len(closing)].strip()
      break
  return text[:-1].rstrip() if text.endswith(".") else text


def _scale(unit: Optional[str]) -> int:
  """The factor of a unit's first word when it is a scale word (``k``, ``thousand(s)``, ...)."""
  if not unit or unit.startswith(("%", "\\%")):
    return 1
  if unit.startswith("\\"):
    unit = unit[unit.index("{") + 1:-1]
  words = unit.split()
  first = words[0] if words else ""
  if first in ("k", "K"):
    return SCALES["k"]
  first = first.lower()
  return SCALES.get(first, SCALES.get(first[:-1], 1) if first.endswith("s") else 1)


def numeric_answer(text: Optional[str], units: bool = True) -> Optional[Fraction]:
  """Exact value of a numeric final answer in any common form (``43500``, ``\\boxed{43500}``,
  ``$43,500``, ``43{,}500``, ``43500.``, ``43500 dollars``, ``43500\\text{ dollars}``, ``50\\%``),
  scaled by a scale word (``18 thousand`` = 18000, ``18k`` = 18000, ``2 dozen`` = 24); None when
  the text is anything else (two numbers, an expression, prose). ``units=False``: a plain number
  only (no unit, no scale, no percent), as a gold answer must be to compare by value."""
  if text is None or len(text) > 10 * MAX_NUMERIC_ANSWER_CHARS:
    return None
  text = unwrap_answer(text)
  if len(text) > MAX_NUMERIC_ANSWER_CHARS:
    return None
  match = _NUMERIC_ANSWER.fullmatch(text.replace("{,}", ","))
  if match is None or not units and match.group("unit"):
    return None
  try:
    return Fraction(match.group("number").replace(",", "")) * _scale(match.group("unit"))
  except (ValueError, ZeroDivisionError):
    return None


def has_scale_word(text: str) -> bool:
  """Whether ``text`` holds a scale word (``thousand``, ``million``, ``18k``, ...)."""
  return _SCALE_WORD.search(text) is not None


def states_alternatives(text: str) -> bool:
  """Whether ``text`` offers more than one answer (the word ``or`` / ``either``)."""
  return _ALTERNATIVES.search(text) is not None
