"""The command-line convention shared by every `launch/` script.

Each script defines its absl flags on its own `absl.flags.FlagValues` (so several scripts can be
imported into one process, e.g. by the tests) and ends with::

    def main(argv=None) -> int:
      return cli.run_main(_run, FLAGS, argv, doc=__doc__)

    if __name__ == "__main__":
      sys.exit(main())

`run_main` parses the flags, answers ``--help`` (exit 0), sets up logging (our INFO lines on,
library INFO lines off) and turns a user mistake into ONE line on stderr with exit code 2:

  * a flag or config error (unknown flag, unknown config key with the closest known key, bad
    value, missing config file), found while parsing, before anything heavy is imported;
  * a `UserError` raised by the script (missing checkpoint, malformed input file, a config that
    cannot run, ...).

A `Fault` (the environment failed: a read-only or full disk, a file where a folder belongs, a
missing permission) is also one line, naming the path and the operation, with exit code 1; an
`OSError` of that kind that reaches `run_main` unwrapped gets the same treatment. Ctrl-C prints
one line and exits with 130 (without unwinding into JAX's compile threads, see `run_main`).

Any other exception is a bug and keeps its traceback. ``--debug`` shows the traceback for user
errors too and turns library INFO logging back on.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Callable, Optional, Sequence

from absl import flags

# The error types and one-line helpers live in `dmpo_jax.errors` (the library raises them without
# importing this module); they stay reachable as `cli.<name>` for the launch scripts.
from dmpo_jax.errors import (EXIT_FAULT, EXIT_USER_ERROR, FILESYSTEM_ERRNOS, WRITE_ERRNOS,  # noqa: F401
                             Fault, UserError, check, closest, file_operation, filesystem_fault,
                             model_folder_problem, one_line as _one_line, user_input)

EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C
HELP_ARGS = ("-h", "--help", "--helpshort", "--helpfull", "-?")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def require_path(flag: str, path: Optional[str], what: str = "path") -> None:
  """Raises a `UserError` unless ``path`` is set and exists."""
  if not path:
    raise UserError(f"--{flag} is required ({what})")
  if not os.path.exists(path):
    raise UserError(f"--{flag}: {what} {path} does not exist")


def require_model_folder(flag: str, path: Optional[str]) -> None:
  """Raises a `UserError` unless ``path`` is an HF folder or a project model checkpoint."""
  if not path:
    raise UserError(f"--{flag} is required (model checkpoint)")
  problem = model_folder_problem(path)
  if problem:
    raise UserError(f"--{flag}: model checkpoint {problem}")


# ------------------------------------------------------------------------------------------------
# Flag parsing
# ------------------------------------------------------------------------------------------------

def _flag_value(argv: Sequence[str], name: str) -> Optional[str]:
  """The value of ``--name=value`` / ``--name value`` in ``argv`` (last one wins)."""
  value = None
  for i, arg in enumerate(argv):
    if arg.startswith(f"--{name}="):
      value = arg.split("=", 1)[1]
    elif arg == f"--{name}" and i + 1 < len(argv):
      value = argv[i + 1]
  return value


def _config_keys(config) -> list[str]:
  """Every dotted key of a ConfigDict (sub-dicts included)."""
  keys = []
  for key, value in config.items():
    keys.append(key)
    if hasattr(value, "items") and hasattr(value, "to_dict"):
      keys += [f"{key}.{sub}" for sub in _config_keys(value)]
  return keys


def _load_config_file(path: str):
  """``get_config()`` of a config file, as ml_collections' config flag loads it."""
  from ml_collections.config_flags import config_flags  # pylint: disable=import-outside-toplevel
  return config_flags.ConfigFileFlagParser(name="config").parse(path)


def _config_error(fv: flags.FlagValues, argv: Sequence[str]) -> Optional[str]:
  """A one-line diagnosis of the config flags (missing file, unknown key), or None."""
  from ml_collections.config_flags import config_flags  # pylint: disable=import-outside-toplevel
  for flag_name in [name for name in fv if config_flags.is_config_flag(fv[name])]:
    path = _flag_value(argv, flag_name)
    if path is None:
      continue
    file_part = path.split(":", 1)[0]
    if not os.path.isfile(file_part):
      return f"--{flag_name}: config file {file_part} not found"
    try:
      config = _load_config_file(path)
      known = _config_keys(config)
    except Exception as e:  # pylint: disable=broad-except  # any failure of the user's file
      last = (str(e).strip().splitlines() or [type(e).__name__])[-1]  # ml_collections adds the traceback
      return f"--{flag_name}: cannot load {path}: {last.strip()}"
    for arg in argv:
      prefix = f"--{flag_name}."
      if arg.startswith(prefix) or arg.startswith(f"--no{flag_name}."):
        key = arg.split("=", 1)[0].split(".", 1)[1]
        if key not in known:
          return f"unknown config key {key!r} in {arg}{closest(key, known)}"
  return None


def parse_flags(fv: flags.FlagValues, argv: Sequence[str]) -> list[str]:
  """Parses ``argv`` (``argv[0]`` is the program) into ``fv``; raises `UserError` in one line."""
  argv = list(argv)
  diagnosis = _config_error(fv, argv[1:])
  if diagnosis:
    raise UserError(diagnosis)
  saved = sys.argv
  sys.argv = argv  # ml_collections' config flag reads its overrides from sys.argv
  try:
    fv.unparse_flags()
    return fv(argv)
  except flags.UnrecognizedFlagError as e:
    name = getattr(e, "flagname", "") or ""
    raise UserError(f"unknown flag --{name}{closest(name, list(fv))}") from e
  except Exception as e:  # pylint: disable=broad-except  # absl and ml_collections parse errors
    raise UserError(_one_line(e)) from e
  finally:
    sys.argv = saved


def help_text(fv: flags.FlagValues, doc: Optional[str]) -> str:
  lines = [doc.strip(), ""] if doc else []
  lines.append("Flags:")
  for name in sorted(fv):
    flag = fv[name]
    if flag.name != name:  # short aliases
      continue
    default = "" if flag.default is None else f" (default: {flag.default_as_str})"
    lines.append(f"  --{name}: {flag.help}{default}")
  return "\n".join(lines)


def setup_logging(debug: bool = False) -> None:
  """Our loggers (``dmpo_jax``) at INFO, libraries (orbax through absl, jax) at WARNING unless
  ``debug``; one plain format on stderr."""
  from absl import logging as absl_logging  # pylint: disable=import-outside-toplevel
  logging.basicConfig(level=logging.INFO if debug else logging.WARNING, format=LOG_FORMAT,
                      stream=sys.stderr, force=True)
  absl_logging.set_verbosity(absl_logging.INFO if debug else absl_logging.WARNING)
  logging.getLogger("absl").setLevel(logging.INFO if debug else logging.WARNING)
  logging.getLogger("dmpo_jax").setLevel(logging.INFO)


def run_main(main: Callable[[], Optional[int]], fv: flags.FlagValues,
             argv: Optional[Sequence[str]] = None, *, doc: Optional[str] = None) -> int:
  """Parses ``argv`` (default ``sys.argv``; without the program name when given) into ``fv``,
  runs ``main()`` and returns the exit code: ``main``'s (None = 0), 0 for ``--help``, 2 with one
  line on stderr for a `UserError` (a traceback too with ``--debug``)."""
  if "debug" not in fv:
    flags.DEFINE_bool("debug", False, "Show tracebacks for user errors and library INFO logs.",
                      flag_values=fv)
  from_command_line = argv is None
  argv = list(sys.argv if argv is None else [sys.argv[0]] + list(argv))
  program = os.path.basename(argv[0]) if argv else "dmpo_jax"
  if any(arg in HELP_ARGS for arg in argv[1:]):
    print(help_text(fv, doc))
    return 0
  debug = any(arg.lower() in ("--debug", "--debug=true", "--debug=1") for arg in argv[1:])
  try:
    extra = parse_flags(fv, argv)
    if len(extra) > 1:
      raise UserError(f"unexpected argument(s) {extra[1:]}; flags are written --name=value")
    if from_command_line:  # in-process calls (tests) keep the caller's logging
      setup_logging(debug)
    code = main()
  except UserError as e:
    if debug:
      raise
    print(f"error: {_one_line(e)}", file=sys.stderr)
    if isinstance(e, Fault) and from_command_line:
      # The environment failed under a running program (a full disk under orbax's writer
      # threads): end now rather than tear down libraries whose writes are still in flight.
      # What was written completely stays; outputs are written atomically.
      sys.stdout.flush()
      sys.stderr.flush()
      os._exit(e.exit_code)  # pylint: disable=protected-access
    return e.exit_code
  except OSError as e:
    if debug or e.errno not in FILESYSTEM_ERRNOS:
      raise
    print(f"error: {_one_line(filesystem_fault('access', e.filename or '?', e))}", file=sys.stderr)
    return EXIT_FAULT
  except KeyboardInterrupt:
    if not from_command_line or debug:
      raise
    # Exit at once: unwinding lets the interpreter tear down JAX's runtime while one of its
    # threads may still be compiling for the interrupted call, which then dereferences the freed
    # client (a segmentation fault). Files are written atomically, so there is nothing to undo.
    print(f"error: {program} interrupted (Ctrl-C)", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(EXIT_INTERRUPTED)  # pylint: disable=protected-access
  return 0 if code is None else int(code)
