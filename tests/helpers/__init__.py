"""Helpers shared by the tests, imported as ``from tests.helpers import <module>``.

* ``hf_fixtures``: tiny HF-format checkpoints and tokenizers with the real tensor names and ids.
* ``reference_impl``: an independent numpy re-implementation of the reference trainers' losses.
* ``small_runs``: the demo config at test size and readers of a finished run.
* ``objective_setup``: a tiny transformer, batch and parameters for the objective tests (built on
  first use, never at import).
* ``sandbox_attacks`` / ``sandbox_users``: forged completions, and running code as an
  unprivileged user.
* Scripts run in a fresh process (the device count is fixed at jax import, or another uid):
  ``fsdp_check.py``, ``sharded_step_check.py``, ``untrusted_trainer.py``.

This package imports nothing at import time (scripts run as another user import it too)."""
