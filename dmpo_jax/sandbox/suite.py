"""The trusted tests of a sandbox run, and which of the program's functions they call.

Trainer side; standard library only.
"""

from __future__ import annotations

import ast
import builtins
import dataclasses
from typing import Optional, Tuple


@dataclasses.dataclass(frozen=True)
class TestSuite:
  """Trusted test code run by the judge: ``setup`` (imports, helpers from the prompt), then
  ``code``; each name in ``calls`` is bound (after ``setup``) to a proxy of the program's
  function of that name."""
  code: str
  calls: Tuple[str, ...] = ()
  setup: str = ""

  def __post_init__(self):
    for name in self.calls:
      if not name.isidentifier():
        raise ValueError(f"TestSuite.calls: {name!r} is not an identifier")


def called_names(test_code: str, setup: str = "", reference: Optional[str] = None
                 ) -> Tuple[str, ...]:
  """The program's functions the tests call (e.g. MBPP's ``assert similar_elements(...) == ...``),
  parsed from trusted code: with a ``reference`` solution, the names it defines at top level;
  without, the names neither the tests, the setup nor builtins define."""
  if reference is not None:
    tree = ast.parse(reference)
    own = {node.name for node in tree.body
           if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
    calls = [node.func.id for node in ast.walk(ast.parse(test_code))
             if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)]
    found = tuple(dict.fromkeys(name for name in calls if name in own))
    if found:
      return found
  defined = set(dir(builtins))
  called = []
  for source in (setup, test_code):
    for node in ast.walk(ast.parse(source)):
      if isinstance(node, (ast.Import, ast.ImportFrom)):
        defined.update((a.asname or a.name).split(".")[0] for a in node.names)
      elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        defined.add(node.name)
      elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
        defined.add(node.id)
      elif (source is test_code and isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
            and node.func.id not in called):
        called.append(node.func.id)
  return tuple(name for name in called if name not in defined)
