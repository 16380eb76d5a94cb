"""Which isolation mode the sandbox gets on this machine, said once, and refused when unprotected.

Trainer side; standard library only. Modes (`docs/sandbox.md` §4): ``namespaces`` (root, or a
non-root user with unprivileged user namespaces: a minimal root of its own), ``landlock`` (no
namespaces, the kernel's Landlock restricts the program to the same paths), ``unisolated``
(neither: refused unless ``SandboxConfig.allow_unisolated``). A probe run decides, as reported
by its judge; the result is cached per process and configuration.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Dict, Tuple

from . import limits
from . import runner
from . import suite as suite_lib

_log = logging.getLogger(__name__)
PROTECTED_MODES = ("namespaces", "landlock")


class SandboxRefused(RuntimeError):
  """Code rewards are refused: no isolation holds and unisolated runs were not allowed."""


@dataclasses.dataclass(frozen=True)
class Mode:
  """``name``: namespaces, landlock, unisolated, or unavailable (the probe did not pass);
  ``protected``: one of `PROTECTED_MODES`; ``layers``: the probe judge's report."""
  name: str
  protected: bool
  euid: int
  interpreter: str
  layers: Dict[str, object]
  reason: str

  def describe(self) -> str:
    held = sorted(k for k, v in self.layers.items() if v is True)
    return (f"code sandbox mode: {self.name} ({'protected' if self.protected else 'NOT protected'}"
            f"; {'root' if self.euid == 0 else 'uid %d' % self.euid}; interpreter "
            f"{self.interpreter}; layers: {', '.join(held) or 'none'})"
            + (f"; {self.reason}" if self.reason else ""))


_MODES: Dict[Tuple, Mode] = {}
_ANNOUNCED: set = set()


def _key(config: limits.SandboxConfig) -> Tuple:
  return (os.geteuid(), config.use_namespaces, config.require_namespaces, config.use_landlock,
          config.python)


def detect(config: limits.SandboxConfig = limits.SandboxConfig()) -> Mode:
  """The mode runs with ``config`` get here (one probe run per process and configuration)."""
  key = _key(config)
  if key not in _MODES:
    probe_config = dataclasses.replace(config, allow_unisolated=True, cpu_time_s=5,
                                       wall_time_s=max(float(config.wall_time_s), 30.0))
    probe = runner.run_program("def probe():\n  return 1\n", probe_config,
                               suite_lib.TestSuite("assert probe() == 1\n", ("probe",)))
    layers = dict(probe.protections)
    if probe.status != "passed":
      name, reason = "unavailable", f"probe run: {probe.status}: {probe.reason}"
    else:
      name = ("namespaces" if layers.get("namespaces") else "landlock" if layers.get("landlock")
              else "unisolated")
      errors = layers.get("errors") or []
      reason = "; ".join(str(e) for e in errors)[:1000] if name != "namespaces" else ""
    _MODES[key] = Mode(name, name in PROTECTED_MODES, os.geteuid(), runner.interpreter(config),
                       layers, reason)
  return _MODES[key]


def check(config: limits.SandboxConfig = limits.SandboxConfig()) -> Mode:
  """Logs the mode once per process and configuration; raises `SandboxRefused` when it is not
  protected and ``config.allow_unisolated`` is off (or when no run works at all)."""
  mode = detect(config)
  key = _key(config) + (config.allow_unisolated,)
  if key not in _ANNOUNCED:
    _ANNOUNCED.add(key)
    (_log.info if mode.protected else _log.warning)("%s", mode.describe())
  if mode.name == "unavailable" or not (mode.protected or config.allow_unisolated):
    raise SandboxRefused(
        f"{mode.describe()}. Code rewards refused: neither namespaces nor Landlock isolate the "
        "program on this machine, so it could read the benchmark data and the trainer's files; "
        "set sandbox.allow_unisolated=True to run them anyway (docs/sandbox.md §4)"
        if mode.name != "unavailable" else f"{mode.describe()}: the sandbox does not work here")
  return mode


def protection_report(config: limits.SandboxConfig = limits.SandboxConfig()) -> Dict[str, object]:
  """The mode and every layer that held for a probe run, with the machine's facts."""
  mode = detect(config)
  return {"mode": mode.name, "protected": mode.protected, "euid": mode.euid,
          "interpreter": mode.interpreter, "reason": mode.reason, **mode.layers}
