"""Trainer: config validation, non-finite skip, bit-identical resume after preemption, CLI errors."""

import json
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmpo_jax import checkpointing
from dmpo_jax.rl import loop, train_state as ts
from tests.helpers.small_runs import (final_params, metrics_without_times, small_config,
                                      small_config_flags)

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_validate_config_names_each_problem(tmp_path):
  config = small_config(**{"rollout.gen_length": 6, "rollout.block_length": 4,
                           "objective": "nope", "model.checkpoint": str(tmp_path / "missing")})
  with pytest.raises(loop.ConfigError) as err:
    loop.validate_config(config, num_devices=1)
  message = str(err.value)
  assert "rollout.gen_length=6 is not a multiple of rollout.block_length=4" in message
  assert "objective='nope' is unknown" in message and "\n" not in message
  assert "model.checkpoint" in message and "does not exist" in message
  config = small_config(**{"eval.gen_length": 10, "eval.steps": 7})
  with pytest.raises(loop.ConfigError, match="eval.steps=7"):
    loop.validate_config(config, num_devices=1)
  config = small_config(**{"mesh.data": 3, "mesh.fsdp": 1})
  with pytest.raises(loop.ConfigError, match="mesh"):
    loop.validate_config(config, num_devices=1)


def test_nonfinite_gradient_skips_update():
  params = {"w": jnp.arange(3.0)}
  optimizer = ts.make_optimizer(0.1)
  state = ts.init_train_state(params, optimizer, 0)
  bad = {"w": jnp.array([1.0, jnp.nan, 0.0])}
  new, metrics = ts.apply_gradients(state, bad, optimizer, jnp.float32(1.0))
  np.testing.assert_array_equal(new.params["w"], params["w"])
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), new.opt_state, state.opt_state))
  assert float(metrics["train/skipped_nonfinite"]) == 1.0 and int(new.step) == 1
  good, metrics = ts.apply_gradients(state, {"w": jnp.ones(3)}, optimizer, jnp.float32(1.0))
  assert float(metrics["train/skipped_nonfinite"]) == 0.0
  # AdamW's first step moves every coordinate by lr (sign of the gradient).
  np.testing.assert_allclose(good.params["w"], params["w"] - 0.1, rtol=1e-5)
  _, metrics = ts.apply_gradients(state, {"w": jnp.ones(3)}, optimizer, jnp.float32(jnp.inf))
  assert float(metrics["train/skipped_nonfinite"]) == 1.0


@pytest.mark.slow
def test_cli_rejects_unknown_key_and_bad_value(tmp_path):
  base = [sys.executable, str(REPO / "launch" / "train.py"), "--config=configs/demo.py",
          f"--workdir={tmp_path}"]
  unknown = subprocess.run(base + ["--config.not_a_key=1"], cwd=REPO, capture_output=True,
                           text=True, timeout=120)
  assert unknown.returncode != 0 and "not_a_key" in unknown.stderr
  bad = subprocess.run(base + ["--config.rollout.block_length=3"], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
  assert bad.returncode == 2, bad.stderr[-2000:]
  assert "rollout.gen_length=5 is not a multiple of rollout.block_length=3" in bad.stderr


@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO / "configs").glob("*.py")
                                        if p.stem not in ("__init__", "base", "recipes")))
def test_every_published_config_validates(name):
  import importlib  # pylint: disable=import-outside-toplevel
  config = importlib.import_module(f"configs.{name}").get_config()
  if name != "demo":  # the published settings need their weights (or an explicit random init)
    with pytest.raises(loop.ConfigError, match="model.checkpoint is not set"):
      loop.validate_config(config, num_devices=8)
    config.model.init = "random"
    config.tokenizer = "byte"  # random weights still need a tokenizer
  loop.validate_config(config, num_devices=8 if name != "demo" else 1)


@pytest.mark.slow
def test_lora_run_trains_only_adapters_and_exports_merged_model(tmp_path):
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from dmpo_jax.models import lora  # pylint: disable=import-outside-toplevel
  from dmpo_jax.models.config import get_preset  # pylint: disable=import-outside-toplevel
  from dmpo_jax.models.transformer import create_model  # pylint: disable=import-outside-toplevel
  config = small_config(**{"num_steps": 2, "eval.every_steps": 2, "model.lora_rank": 4,
                           "model.lora_targets": ("q_proj", "v_proj", "ff_out")})
  results = loop.train(config, str(tmp_path))
  state = final_params(tmp_path)["params"]
  base = nnx.split(create_model(get_preset("tiny", remat=False), seed=config.seed))[1]
  # Base weights are frozen (bit-identical), adapters moved away from their zero B init.
  np.testing.assert_array_equal(state["blocks"]["q_proj"]["value"], base["blocks"]["q_proj"][...])
  np.testing.assert_array_equal(state["embed"]["value"], base["embed"][...])
  adapter_b = state["blocks"]["lora"]["q_proj"]["b"]["value"]
  assert np.abs(adapter_b).max() > 0
  assert not (tmp_path / "reference_model" / "model_config.json").exists()
  # The exported model has the adapters folded in: W_q + A B alpha / r.
  final = checkpointing.load_model_checkpoint(results["final_model"])
  assert final.config.lora_rank == 0
  a = np.asarray(state["blocks"]["lora"]["q_proj"]["a"]["value"], np.float64)
  b = np.asarray(adapter_b, np.float64)
  expected = np.asarray(base["blocks"]["q_proj"][...], np.float64) + np.einsum(
      "ldr,lrhk->ldhk", a, b) * (config.model.lora_alpha / 4)
  np.testing.assert_allclose(np.asarray(final.blocks.q_proj[...]), expected, atol=1e-6)
  assert lora.has_adapters(nnx.split(final)[1]) is False


@pytest.mark.slow
def test_sigterm_to_a_running_trainer_then_resume_is_bit_identical(tmp_path):
  """A real SIGTERM (preemption) to `launch/train.py` mid-run, then a resume, gives the same
  parameters and metrics as an uninterrupted run."""
  overrides = {"num_steps": 30, "eval.every_steps": 0, "checkpoint.every_steps": 5}
  straight = tmp_path / "straight"
  loop.train(small_config(**overrides), str(straight))

  killed = tmp_path / "killed"
  process = subprocess.Popen(
      [sys.executable, str(REPO / "launch" / "train.py"), "--config=configs/demo.py",
       f"--workdir={killed}", "--plot=false"] + small_config_flags(**overrides),
      cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  metrics_file = killed / "metrics.jsonl"
  deadline = time.monotonic() + 240
  while time.monotonic() < deadline and process.poll() is None:
    if metrics_file.exists() and any(json.loads(line)["step"] >= 2 for line in
                                     metrics_file.read_text().splitlines() if line.strip()):
      break
    time.sleep(0.01)
  process.send_signal(signal.SIGTERM)
  stdout, stderr = process.communicate(timeout=240)
  assert process.returncode == 0, stderr[-3000:]
  stopped_at = json.loads(stdout[stdout.index("{"):])["preempted_at"]
  assert 2 <= stopped_at < 30
  loop.train(small_config(**overrides), str(killed))

  a, b = final_params(straight), final_params(killed)
  assert int(a["step"]) == int(b["step"]) == 30 * 2  # optimizer updates: 30 rollouts x F = 2
  jax.tree.map(np.testing.assert_array_equal, a, b)
  metrics = metrics_without_times(straight)
  assert metrics == metrics_without_times(killed)
  assert [m["step"] for m in metrics] == list(range(31))  # no duplicated or missing step
  assert "eval/accuracy" in metrics[0]  # held-out accuracy right before RL
  assert all(m["train/grad_norm"] > 0 for m in metrics[1:])  # real updates, not no-ops


@pytest.mark.slow
def test_minibatches_split_each_rollout_into_disjoint_whole_groups(tmp_path, monkeypatch):
  """BGPO off-policy as in the paper: 2 updates per rollout on 2 disjoint mini-batches."""
  seen = []
  original = loop.Trainer.compile_steps

  def recording(self, ref_params):
    info = original(self, ref_params)
    compiled = self._train_step

    def record(state, batch, per_example, rollout_step, iteration):
      seen.append((int(rollout_step), int(iteration), np.asarray(batch["group_ids"]).tolist(),
                   np.asarray(batch["rewards"]), np.asarray(per_example["advantages"])))
      return compiled(state, batch, per_example, rollout_step, iteration)

    self._train_step = record
    return info

  monkeypatch.setattr(loop.Trainer, "compile_steps", recording)
  config = small_config(**{"objective": "bgpo", "bgpo.mode": "off_policy", "bgpo.num_mc": 2,
                           "updates_per_rollout": 2, "minibatches_per_rollout": 2,
                           "num_steps": 2, "eval.every_steps": 2})
  loop.train(config, str(tmp_path))
  assert [(s, i) for s, i, *_ in seen] == [(0, 0), (0, 1), (1, 0), (1, 1)]
  for step in (0, 1):
    halves = [(g, r, a) for s, _, g, r, a in seen if s == step]
    first, second = halves[0][0], halves[1][0]
    assert len(first) == len(second) == 8  # 4 prompts x G = 4, split in two
    assert set(first).isdisjoint(second)
    for groups, rewards, advantages in halves:
      groups = np.asarray(groups)
      for g in set(groups.tolist()):
        rows = groups == g
        assert rows.sum() == 4  # whole groups only
        z = (rewards[rows] - rewards[rows].mean()) / (rewards[rows].std(ddof=1) + 1e-6)
        np.testing.assert_allclose(advantages[rows], z, rtol=1e-5, atol=1e-6)
  with pytest.raises(loop.ConfigError, match="minibatches_per_rollout=3"):
    loop.validate_config(small_config(minibatches_per_rollout=3), num_devices=1)


def _metric_steps(workdir):
  return [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()
          if line.strip()]


@pytest.mark.slow
def test_kill_then_relative_workdir_resume_with_reference_model(tmp_path, monkeypatch):
  """`launch/train.py` with a relative --workdir (DMPO with alpha > 0: reference model saved in
  the workdir) is killed (SIGKILL) after its second checkpoint; the latest checkpoint is then
  damaged: resuming with the same relative path fails naming it, `fallback_to_previous_checkpoint`
  resumes from the intact step before it, and metrics.jsonl ends with each step exactly once.
  Emptying checkpoints/ then makes a restart refuse (metrics without a checkpoint) unless
  `overwrite`, which starts clean."""
  overrides = {"num_steps": 8, "eval.every_steps": 0, "checkpoint.every_steps": 2,
               "checkpoint.max_to_keep": 3}
  process = subprocess.Popen(
      [sys.executable, str(REPO / "launch" / "train.py"), f"--config={REPO / 'configs' / 'demo.py'}",
       "--workdir=run", "--plot=false"] + small_config_flags(**overrides),
      cwd=tmp_path, env={**__import__("os").environ, "PYTHONPATH": str(REPO)},
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  run = tmp_path / "run"
  deadline = time.monotonic() + 240
  while time.monotonic() < deadline and process.poll() is None:
    if (run / "checkpoints" / "4").is_dir():
      break
    time.sleep(0.01)
  process.kill()
  _, stderr = process.communicate(timeout=60)
  steps = checkpointing.TrainCheckpointer.steps_in(run / "checkpoints")
  assert steps[:2] == [2, 4] and 8 not in steps, stderr[-3000:]
  assert (run / "reference_model" / checkpointing.MODEL_CHECKSUMS_FILE).is_file()
  latest = steps[-1]
  iterator_file = run / "checkpoints" / str(latest) / checkpointing.ITERATOR_ITEM / "metadata"
  iterator_file.write_text(iterator_file.read_text().replace("{", "{ ", 1)[:-2])  # torn JSON

  monkeypatch.chdir(tmp_path)  # the same relative path as the killed command line
  config = small_config(**overrides)
  with pytest.raises(checkpointing.CheckpointIntegrityError,
                     match=rf"step {latest} .*item 'iterator': file .*{latest}/iterator/metadata: "
                           r"\d+ bytes, saved \d+ \(checksum mismatch"):
    loop.train(config, "run")
  results = loop.train(config, "run", fallback_to_previous_checkpoint=True)
  assert "final_model" in results
  assert _metric_steps(run) == list(range(9))  # each step once: the rows after the fallback
  assert (run / "checkpoints" / f"{checkpointing.CORRUPT_PREFIX}{latest}").is_dir()
  restored = final_params(run)
  assert int(restored["step"]) == 8 * 2

  # Metrics but no checkpoint (checkpoints/ emptied, or a kill before the first save): another
  # config is refused unless `overwrite` (the rows may be another run's). The same config starts
  # from scratch (tests/test_run_lifecycle.py).
  for step in checkpointing.TrainCheckpointer.steps_in(run / "checkpoints"):
    __import__("shutil").rmtree(run / "checkpoints" / str(step))
  before = (run / "metrics.jsonl").read_text()
  other = small_config(**{**overrides, "num_steps": 2, "seed": 1})
  with pytest.raises(loop.WorkdirError, match=r"metrics.jsonl holds metrics of a run with another "
                     r"config \(num_steps: 8 -> 2; seed: 0 -> 1\) .* pass --overwrite"):
    loop.train(other, "run")
  assert (run / "metrics.jsonl").read_text() == before  # refused before touching anything
  loop.train(other, "run", overwrite=True)
  assert _metric_steps(run) == [0, 1, 2]


@pytest.mark.slow
def test_cli_refuses_fresh_start_over_old_metrics(tmp_path):
  (tmp_path / "metrics.jsonl").write_text('{"step": 0, "eval/accuracy": 1.0}\n{"step": 1, "x": 2.0}\n')
  result = subprocess.run(
      [sys.executable, str(REPO / "launch" / "train.py"), "--config=configs/demo.py",
       f"--workdir={tmp_path}", "--plot=false"] + small_config_flags(),
      cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode == 2, result.stderr[-2000:]
  assert "no checkpoint to resume from; pass --overwrite" in result.stderr
  assert not (tmp_path / "checkpoints").exists()
