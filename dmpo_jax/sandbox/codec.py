"""Framing and the plain-data codec between the sandbox's processes (`docs/sandbox.md` §2).

Runs inside the sandbox processes (sent to them as source by :mod:`dmpo_jax.sandbox.runner`) and
in the tests; standard library only. Wire format: frames of a 4-byte big-endian length and a JSON
body. Values are tagged trees of plain data only (``["I", hex]`` for an int, ``["L", [...]]`` for a
list, ...); the judge rebuilds them with its own constructors, so nothing the program made (a
class, an ``__eq__``, a patched module) ever exists in the judge process.
"""

import json
import os
import struct

MAX_FRAME = 16 << 20
MAX_DEPTH = 100
MAX_NODES = 1 << 20
MAX_INT_HEX_DIGITS = 1 << 16
MAX_ITEMS_FROM_ITERATOR = 1 << 16

# Exceptions of the program that end its run as a failure wherever the tests call it: ones that
# stop an iteration (``StopIteration`` inside ``map``/``filter`` would end it silently and make
# ``all(map(...))`` true), and ones that are no ``Exception`` (a test's ``except Exception`` must
# not swallow them).
ABORTING_EXCEPTIONS = ("StopIteration", "StopAsyncIteration", "GeneratorExit", "KeyboardInterrupt",
                       "SystemExit")


class ProgramGone(BaseException):
  """The program process ended or closed its channel (not catchable by a test's ``except``)."""


class BadReply(BaseException):
  """The program process sent something that is not a valid frame of plain data."""


class Forbidden(BaseException):
  """The program process reported a forbidden operation (audit hook)."""


class ProgramAborted(BaseException):
  """A call of the program raised one of `ABORTING_EXCEPTIONS` (or any non-``Exception``)."""


def write_all(fd, data):
  while data:
    data = data[os.write(fd, data):]


def send(fd, message):
  body = json.dumps(message, separators=(",", ":")).encode("ascii")
  write_all(fd, struct.pack(">I", len(body)) + body)


def read_exact(fd, size):
  chunks, got = [], 0
  while got < size:
    chunk = os.read(fd, min(size - got, 1 << 20))
    if not chunk:
      return None
    chunks.append(chunk)
    got += len(chunk)
  return b"".join(chunks)


def receive(fd):
  """One frame as parsed JSON; None at end of file; BadReply for anything malformed."""
  head = read_exact(fd, 4)
  if head is None:
    return None
  (size,) = struct.unpack(">I", head)
  if size > MAX_FRAME:
    raise BadReply("frame of %d bytes is over the %d-byte limit" % (size, MAX_FRAME))
  body = read_exact(fd, size)
  if body is None:
    return None
  try:
    message = json.loads(body)
  except (ValueError, RecursionError) as e:
    raise BadReply("frame is not valid JSON: %s" % (type(e).__name__,)) from None
  if type(message) is not dict:  # pylint: disable=unidiomatic-typecheck
    raise BadReply("frame is not a JSON object")
  return message


class Opaque:
  """The judge's stand-in for an object of the program that is not plain data (a ``re.Match``, an
  instance of the program's class): equal only to itself, true or false as the program said, and
  passed back to the program as its handle. The program chooses nothing but that truth value."""
  __slots__ = ("handle", "type_name", "truth")

  def __init__(self, handle, type_name, truth):
    self.handle, self.type_name, self.truth = handle, type_name, truth

  def __bool__(self):
    return self.truth

  def __repr__(self):
    return "<%s object of the program>" % self.type_name

  __hash__ = object.__hash__


def encode(obj, depth=0, handles=None):
  """Tagged plain-data tree of ``obj``. Other objects: a handle into ``handles`` (the program
  side) or TypeError (the judge side, except for an ``Opaque``)."""
  import collections  # pylint: disable=import-outside-toplevel
  if depth > MAX_DEPTH:
    raise TypeError("value nested deeper than %d levels" % MAX_DEPTH)
  kind = type(obj)
  nested = lambda items: [encode(item, depth + 1, handles) for item in items]
  if obj is None:
    return ["N"]
  if kind is bool:
    return ["B", int(obj)]
  if kind is int:
    return ["I", format(obj, "x")]
  if kind is float:
    return ["F", obj.hex()]
  if kind is complex:
    return ["C", obj.real.hex(), obj.imag.hex()]
  if kind is str:
    return ["S", obj]
  if kind is bytes:
    return ["Y", obj.hex()]
  if kind is bytearray:
    return ["A", obj.hex()]
  if kind is list:
    return ["L", nested(obj)]
  if kind is tuple:
    return ["T", nested(obj)]
  if kind is set:
    return ["E", nested(obj)]
  if kind is frozenset:
    return ["Z", nested(obj)]
  if kind is range:
    return ["R", encode(obj.start), encode(obj.stop), encode(obj.step)]
  if kind is Opaque:
    return ["H", obj.handle]
  tags = {dict: "D", collections.OrderedDict: "O", collections.Counter: "K",
          collections.defaultdict: "D"}
  if kind in tags:
    return [tags[kind], [[encode(k, depth + 1, handles), encode(v, depth + 1, handles)]
                         for k, v in obj.items()]]
  if kind is collections.deque:
    return ["Q", nested(obj)]
  if hasattr(kind, "__next__") or kind.__name__ in ("dict_keys", "dict_values", "dict_items"):
    items = []
    for item in obj:
      if len(items) >= MAX_ITEMS_FROM_ITERATOR:
        raise TypeError("iterator longer than %d items" % MAX_ITEMS_FROM_ITERATOR)
      items.append(item)
    return ["G", nested(items)]
  if handles is not None and len(handles) < MAX_NODES:
    try:
      truth = bool(obj)
    except Exception:  # pylint: disable=broad-except
      truth = True
    handles.append(obj)
    return ["X", len(handles) - 1, str(kind.__name__)[:100], int(truth)]
  raise TypeError("a value of type %s is not plain data" % kind.__name__)


def decode(node, handles=None):
  """Rebuilds a value from an untrusted tagged tree with the judge's own constructors; ``X``
  nodes become ``Opaque`` (judge side), ``H`` nodes the program's objects (program side)."""
  import collections  # pylint: disable=import-outside-toplevel
  budget = [MAX_NODES]

  def text(value):
    if type(value) is not str:  # pylint: disable=unidiomatic-typecheck
      raise BadReply("expected a string in the value tree")
    return value

  def items(value, depth):
    if type(value) is not list:  # pylint: disable=unidiomatic-typecheck
      raise BadReply("expected a list in the value tree")
    return [build(item, depth + 1) for item in value]

  def build(value, depth):
    budget[0] -= 1
    if budget[0] < 0 or depth > MAX_DEPTH + 2:
      raise BadReply("value tree too large or too deep")
    if type(value) is not list or not value or type(value[0]) is not str:  # pylint: disable=unidiomatic-typecheck
      raise BadReply("malformed value node")
    tag, args = value[0], value[1:]
    try:
      if tag == "N" and not args:
        return None
      if tag == "B" and len(args) == 1 and type(args[0]) is int and args[0] in (0, 1):  # pylint: disable=unidiomatic-typecheck
        return args[0] == 1
      if tag == "I" and len(args) == 1:
        digits = text(args[0])
        if len(digits) > MAX_INT_HEX_DIGITS:
          raise BadReply("integer too large")
        return int(digits, 16)
      if tag == "F" and len(args) == 1:
        return float.fromhex(text(args[0]))
      if tag == "C" and len(args) == 2:
        return complex(float.fromhex(text(args[0])), float.fromhex(text(args[1])))
      if tag == "S" and len(args) == 1:
        return text(args[0])
      if tag in ("Y", "A") and len(args) == 1:
        data = bytes.fromhex(text(args[0]))
        return data if tag == "Y" else bytearray(data)
      if tag == "X" and handles is None and len(args) == 3 and type(args[0]) is int and (  # pylint: disable=unidiomatic-typecheck
          type(args[2]) is int and args[2] in (0, 1)):  # pylint: disable=unidiomatic-typecheck
        return Opaque(args[0], text(args[1])[:100], args[2] == 1)
      if tag == "H" and handles is not None and len(args) == 1 and type(args[0]) is int:  # pylint: disable=unidiomatic-typecheck
        return handles[args[0]]
      if tag == "R" and len(args) == 3:
        start, stop, step = (build(a, depth + 1) for a in args)
        if not all(type(x) is int for x in (start, stop, step)):  # pylint: disable=unidiomatic-typecheck
          raise BadReply("range bounds must be integers")
        return range(start, stop, step)
      if len(args) == 1:
        if tag in ("L", "T", "E", "Z", "Q", "G"):
          built = items(args[0], depth)
          maker = {"L": list, "T": tuple, "E": set, "Z": frozenset, "Q": collections.deque,
                   "G": iter}[tag]
          return maker(built)
        if tag in ("D", "O", "K"):
          if type(args[0]) is not list:  # pylint: disable=unidiomatic-typecheck
            raise BadReply("expected a list of pairs")
          pairs = []
          for pair in args[0]:
            if type(pair) is not list or len(pair) != 2:  # pylint: disable=unidiomatic-typecheck
              raise BadReply("malformed key/value pair")
            pairs.append((build(pair[0], depth + 1), build(pair[1], depth + 1)))
          maker = {"D": dict, "O": collections.OrderedDict, "K": collections.Counter}[tag]
          return maker(dict(pairs)) if tag == "K" else maker(pairs)
    except (ValueError, TypeError, OverflowError, IndexError) as e:
      raise BadReply("invalid %r node: %s" % (tag, e)) from None
    raise BadReply("unknown value node %r" % (tag,))

  return build(node, 0)


def describe(error):
  """[type name, message] of an exception, as plain strings."""
  try:
    message = str(error)
  except BaseException:  # pylint: disable=broad-except
    message = "<unprintable>"
  return [type(error).__name__, message[:500]]


def rebuild_exception(error):
  """The exception the judge raises for the program's [type name, message]: a builtin
  ``Exception`` type rebuilt (so a test may expect, e.g., ``ValueError``), `ProgramAborted` for
  `ABORTING_EXCEPTIONS` and every other non-``Exception`` (no test can catch it, no iteration
  ends on it), ``RuntimeError`` for the rest (an ``AssertionError`` never passes for the judge's)."""
  import builtins  # pylint: disable=import-outside-toplevel
  if (type(error) is not list or len(error) != 2 or  # pylint: disable=unidiomatic-typecheck
      not all(type(x) is str for x in error)):  # pylint: disable=unidiomatic-typecheck
    raise BadReply("malformed exception report")
  name, message = error[0][:100], error[1][:500]
  kind = getattr(builtins, name, None)
  is_base = isinstance(kind, type) and issubclass(kind, BaseException)
  if name in ABORTING_EXCEPTIONS or is_base and not issubclass(kind, Exception):
    return ProgramAborted("the program raised %s: %s" % (name, message))
  if is_base and name != "AssertionError":
    try:
      return kind(message)
    except Exception:  # pylint: disable=broad-except
      pass
  return RuntimeError("the program raised %s: %s" % (name, message))
