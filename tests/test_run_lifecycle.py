"""A training run's life in its workdir, as `launch/train.py` users meet it: one run at a time,
Ctrl-C and SIGTERM at any point (compile included) followed by the same command, kill -9 while
the final model is written, and a resume whose config changes the model's structure."""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import pytest

from dmpo_jax import checkpointing, workdir as workdir_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
DEMO = str(REPO / "configs" / "demo.py")
# The demo at test size: a 2-step warm-up (its compile is the run's first), small batches, no
# evaluation during RL, a checkpoint every step.
SMALL = ["--config.sft.num_steps=2", "--config.sft.batch_size=8", "--config.prompts_per_step=2",
         "--config.group_size=2", "--config.eval.num_examples=4", "--config.eval.batch_size=4",
         "--config.eval.every_steps=0", "--config.checkpoint.every_steps=1",
         "--config.log_every_steps=1", "--plot=false"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  """One jax compilation cache for every run of this module (the same programs each time)."""
  return tmp_path_factory.mktemp("jax_cache")


def _env(cache):
  # Runs one after the other share jax's compilation cache: re-runs compile (almost) nothing.
  return dict(os.environ, PYTHONPATH=str(REPO), JAX_COMPILATION_CACHE_DIR=str(cache),
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")


def _command(workdir, *flags):
  return [sys.executable, str(REPO / "launch" / "train.py"), f"--config={DEMO}",
          f"--workdir={workdir}", *SMALL, *flags]


def _start(command, cache, cwd):
  return subprocess.Popen(command, cwd=cwd, env=_env(cache), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def _run(command, cache, cwd):
  return subprocess.run(command, cwd=cwd, env=_env(cache), capture_output=True, text=True,
                        timeout=600)


def _wait_for(condition, process, timeout=300):
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline and process.poll() is None:
    if condition():
      return
    time.sleep(0.01)
  process.kill()
  out, err = process.communicate()
  raise AssertionError(f"condition not met (exit {process.returncode}): {err[-3000:]}")


def _metric_steps(workdir):
  path = workdir / "metrics.jsonl"
  if not path.is_file():
    return []
  steps = []
  for line in path.read_text().splitlines():
    try:
      steps.append(json.loads(line)["step"])
    except (ValueError, KeyError):
      pass  # a line being written
  return steps


def _steps(workdir):
  return checkpointing.TrainCheckpointer.steps_in(workdir / "checkpoints")


def _last_line(stderr):
  lines = stderr.strip().splitlines()
  return lines[-1] if lines else ""


@pytest.mark.slow
def test_interrupts_at_every_stage_then_the_same_command(tmp_path, cache):
  """Ctrl-C during the first compile: one line, exit 130 (it was a segmentation fault: Python
  unwound while XLA still compiled on its own thread). SIGTERM while the RL step compiles (after
  the step-0 metrics row): one line, exit 143, and the same command is not refused. Ctrl-C
  after a step: the step is saved, exit 130. The same command then resumes and finishes, each
  metric step written once."""
  workdir = tmp_path / "run"
  command = _command(workdir, "--config.num_steps=8")

  first = _start(command, cache, tmp_path)
  # The run record is written right before the warm-up, whose step is compiled first.
  _wait_for(lambda: (workdir / workdir_lib.RUN_CONFIG_FILE).is_file(), first)
  first.send_signal(signal.SIGINT)
  _, err = first.communicate(timeout=300)
  assert first.returncode == 130, err[-3000:]
  assert _last_line(err) == ("error: interrupted by Ctrl-C (SIGINT): nothing to save yet; re-run "
                             "the same command to start again"), err[-3000:]
  assert "Traceback" not in err and _steps(workdir) == []

  second = _start(command, cache, tmp_path)
  _wait_for(lambda: _metric_steps(workdir) == [0], second)
  second.send_signal(signal.SIGTERM)
  _, err = second.communicate(timeout=300)
  assert second.returncode == 128 + signal.SIGTERM, err[-3000:]
  assert _last_line(err) == ("error: interrupted by SIGTERM: nothing to save yet; re-run the same "
                             "command to start again")

  third = _start(command, cache, tmp_path)
  _wait_for(lambda: max(_metric_steps(workdir), default=0) >= 1, third)
  third.send_signal(signal.SIGINT)
  out, err = third.communicate(timeout=300)
  assert third.returncode == 130, err[-3000:]
  assert "stopped before its first checkpoint: starting from scratch" in err
  stopped = json.loads(out)["interrupted_at"]
  assert 1 <= stopped < 8 and _steps(workdir)[-1] == stopped
  assert _last_line(err) == (f"error: interrupted by Ctrl-C (SIGINT) at step {stopped}: "
                             "checkpoint saved; re-run the same command to resume")
  assert "Traceback" not in err and not (workdir / "final_model").exists()

  fourth = _run(command, cache, tmp_path)
  assert fourth.returncode == 0, fourth.stderr[-3000:]
  assert f"resumed from step {stopped}" in fourth.stderr
  assert _metric_steps(workdir) == list(range(9))
  final = json.loads(fourth.stdout)["final_model"]
  assert final == str(workdir.absolute() / "final_model")  # absolute, like every path it prints


@pytest.mark.slow
def test_one_run_per_workdir(tmp_path, cache):
  """A workdir locked by another process: one line naming it (pid, host), exit 2, nothing
  touched; a lock left by a killed process does not block. Two runs started together: one
  trains, the other is refused, and every metric row is written once."""
  workdir = tmp_path / "run"
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time; from dmpo_jax import workdir; "
       "held = workdir.RunFolder(sys.argv[1]).__enter__(); print('locked', flush=True); "
       "time.sleep(300)",
       str(workdir)], env=_env(cache), stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    refused = _run(_command(workdir, "--config.num_steps=1"), cache, tmp_path)
    assert refused.returncode == 2, refused.stderr[-3000:]
    line = _last_line(refused.stderr)
    assert line.startswith(f"error: --workdir {workdir} is in use by another run (process "
                           f"{holder.pid} on host {socket.gethostname()}, started "), line
    assert line.endswith("wait for it to finish or stop it, or use another --workdir")
    assert sorted(p.name for p in workdir.iterdir()) == [workdir_lib.LOCK_FILE]
  finally:
    holder.kill()
    holder.wait()
  with workdir_lib.RunFolder(workdir):  # the dead holder's lock is gone with its process
    pass

  together = [_start(_command(workdir, "--config.num_steps=2"), cache, tmp_path) for _ in range(2)]
  results = [(p.wait(timeout=600), p.communicate()) for p in together]
  codes = sorted(code for code, _ in results)
  assert codes == [0, 2], [err[-2000:] for _, (_, err) in results]
  refused_err = next(err for code, (_, err) in results if code == 2)
  assert "is in use by another run" in _last_line(refused_err)
  assert _metric_steps(workdir) == [0, 1, 2]


@pytest.mark.slow
def test_kill_9_during_the_final_model_then_a_structural_change(tmp_path, cache):
  """The process dies (SIGKILL) while writing final_model: the re-run does not call the run
  finished; it writes the final model again from the last checkpoint. Resuming the finished
  run with another objective or LoRA setting: one line listing the differing keys and naming
  --overwrite (also for a workdir without its run record, as older versions wrote it: the
  checkpoint holds its config), which then starts from scratch."""
  workdir = tmp_path / "run"
  command = _command(workdir, "--config.num_steps=1")
  # The same command, killed when the final model's config file (written last) is being written.
  killer = ("import os, signal, sys\n"
            "from dmpo_jax import checkpointing\n"
            "from dmpo_jax.checkpointing import integrity\n"
            "write = integrity.write_bytes_atomic\n"
            "def dying(path, data):\n"
            "  if 'final_model' in str(path) and path.name == checkpointing.MODEL_CONFIG_FILE:\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n"
            "  write(path, data)\n"
            "integrity.write_bytes_atomic = dying\n"
            "sys.argv = sys.argv[1:]\n"
            "sys.path.insert(0, os.path.dirname(os.path.dirname(sys.argv[0])))\n"
            "from launch import train\n"
            "sys.exit(train.main())\n")
  killed = _run([sys.executable, "-c", killer] + command[1:], cache, tmp_path)
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  assert _steps(workdir) == [1]
  again = _run(command, cache, tmp_path)
  assert again.returncode == 0, again.stderr[-3000:]
  results = json.loads(again.stdout)
  assert "finished" not in results and "resumed from step 1" in again.stderr
  model = checkpointing.load_model_checkpoint(results["final_model"])  # complete and verified
  assert model.config.vocab_size == 264
  assert not list(workdir.glob(".final_model*"))  # no temporary left behind
  finished = _run(command, cache, tmp_path)
  assert finished.returncode == 0 and json.loads(finished.stdout)["finished"] == 1

  changed = _command(workdir, "--config.num_steps=2", "--config.objective=dmpo",
                     "--config.model.lora_rank=4", "--config.model.lora_targets=('q_proj',)")
  expected = [
      f"error: {workdir} holds checkpoints of a run that differs in structural key(s) objective: "
      '"bgpo" -> "dmpo"; model.lora_rank: 0 -> 4; model.lora_targets: '
      '["q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out"] -> ["q_proj"]: '
      "a resume needs the same values; use another --workdir, or pass --overwrite to discard this "
      "workdir's checkpoints, metrics and final model and start from scratch"]
  refused = _run(changed, cache, tmp_path)
  assert refused.returncode == 2 and refused.stderr.strip().splitlines() == expected, refused.stderr
  (workdir / workdir_lib.RUN_CONFIG_FILE).unlink()  # a workdir of an older version
  old = _run(changed, cache, tmp_path)
  assert old.returncode == 2 and old.stderr.strip().splitlines() == expected, old.stderr
  fresh = _run(changed + ["--overwrite"], cache, tmp_path)
  assert fresh.returncode == 0, fresh.stderr[-3000:]
  assert "resumed" not in fresh.stderr and _metric_steps(workdir) == [0, 1, 2]
  assert json.loads((workdir / workdir_lib.RUN_CONFIG_FILE).read_text())["objective"] == "dmpo"
