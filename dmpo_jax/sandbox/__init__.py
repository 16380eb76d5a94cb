"""A sandbox for model-generated Python code whose verdict the code cannot reach (`docs/sandbox.md`).

Standard library only (the package also runs under a bare system Python). Trainer side:
``limits`` (configuration, result, exit classification), ``suite`` (the trusted tests),
``runner`` (one run: start, collect, kill, clean), ``workdir`` (host folders, linear removal),
``modes`` (which isolation this machine gives, refusal when none). Inside the sandbox processes
(sent to them as source): ``codec`` (framing and plain-data values), ``isolation``
(namespaces, minimal root, Landlock, rlimits, uid), ``seccomp`` (the filter), ``judge`` (the
program and judge roles).
"""

from .limits import ExecutionResult, SandboxConfig, STATUSES, classify_exit, signal_name
from .modes import Mode, SandboxRefused, check, detect, protection_report
from .runner import protect_process, run_program, run_programs
from .suite import TestSuite, called_names
from .workdir import REAPER, remove_tree

__all__ = ["ExecutionResult", "SandboxConfig", "STATUSES", "classify_exit", "signal_name", "Mode",
           "SandboxRefused", "check", "detect", "protection_report", "protect_process",
           "run_program", "run_programs", "TestSuite", "called_names", "REAPER", "remove_tree"]
