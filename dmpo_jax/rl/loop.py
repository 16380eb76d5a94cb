"""The RL training loop (`docs/architecture.md` §2, §3, §8; `docs/checkpoints.md` §2).

One RL step:
  prompts (grain, G per prompt) → rollout on the policy resharded once for sampling
  (`sampling_layout`) → decode → rewards in worker processes → ``objective.prepare``
  (advantages / weights, old and reference ELBO terms on shared masks; no grad) →
  ``updates_per_rollout`` jitted train steps (``objective.grads`` + AdamW) → metrics →
  checkpoint.

Everything jitted is a pure function of explicit pytrees: `TrainState` (params, optimizer
state, step, RNG), the batch and the prepared per-example arrays. The train step is compiled
ahead of time at start-up and its `memory_analysis` is logged.

This module is the loop itself (`train`, `run`); the config checks live in `rl/config_checks.py`
and the run's set-up, sampling, evaluation, warm-up and compiled steps in `rl/trainer.py`.
"""

from __future__ import annotations

import logging
import signal
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from dmpo_jax import (checkpointing, errors, interrupts, metrics as metrics_lib, profiling,
                      sampling_layout)
from dmpo_jax import workdir as workdir_lib
from dmpo_jax.rl import config_checks, final_model, rollout, run_start, step_io, train_step
from dmpo_jax.rl import trainer as trainer_lib
from dmpo_jax.tasks import reward_pool as reward_pool_lib
# Names importers reach through this module (launch/, benchmarks/, tests/).
from dmpo_jax.rl.config_checks import NUMERIC_FIELDS, ConfigError, validate_config  # noqa: F401
from dmpo_jax.rl.trainer import (  # noqa: F401
    Trainer, abstract_rollout_batch, load_model_and_tokenizer, rl_optimizer, rollout_sampler_config)

_log = logging.getLogger("dmpo_jax.train")

# The workdir holds a run this config cannot continue (`run_start.plan`).
WorkdirError = run_start.WorkdirError


def rollout_share(times: dict[str, float]) -> float:
  """Fraction of the RL step (rollout + reward + prepare + update, evaluation excluded) spent
  sampling."""
  step = sum(times.get(f"time/{phase}", 0.0) for phase in ("rollout", "reward", "prepare", "update"))
  return times.get("time/rollout", 0.0) / step if step > 0 else 0.0


def run(trainer: trainer_lib.Trainer) -> dict[str, Any]:
  """Trains ``trainer`` from the start or the latest checkpoint. SIGINT / SIGTERM never raise
  inside it (`interrupts.InterruptHandler`); a file-system failure is one `errors.Fault` line."""
  guard = interrupts.InterruptHandler(multi_process=jax.process_count() > 1).install()
  try:
    with workdir_lib.quiet_storage_error_logs(), workdir_lib.storage_operation(
        "write to the workdir", trainer.workdir):
      return _run(trainer, guard)
  finally:
    guard.uninstall()


def _run(trainer: trainer_lib.Trainer, guard: interrupts.InterruptHandler) -> dict[str, Any]:
  c = trainer.config
  train, warmup_examples, held_out = trainer.data
  trainer.workdir.mkdir(parents=True, exist_ok=True)  # only once config, data and model are good
  if trainer.start == run_start.FRESH and jax.process_index() == 0:
    workdir_lib.write_run_config(trainer.workdir, run_start.config_json(c))
  iterator = trainer.make_iterator(train)
  ckpt = checkpointing.TrainCheckpointer(trainer.workdir / "checkpoints",
                                         save_interval_steps=c.checkpoint.every_steps,
                                         max_to_keep=c.checkpoint.max_to_keep)
  start_step = 0
  if ckpt.latest_step() is not None:
    # Restored straight into the state's shardings; the freshly initialised state is freed
    # first, so two train states never share the devices' memory.
    abstract_state, trainer.state = train_step.abstract(trainer.state), None
    try:
      restored = ckpt.restore(abstract_state=abstract_state,
                              fallback=trainer.fallback_to_previous_checkpoint)
    except checkpointing.CheckpointIntegrityError:
      raise
    except ValueError as e:  # another run's state (a checkpoint without its config)
      raise WorkdirError(f"{e}; a resume needs the same model, LoRA and optimizer settings: use "
                         "another --workdir, or pass --overwrite to start from scratch") from e
    start_step = int(restored.metadata["checkpoint_step"])
    trainer.state = jax.device_put(restored.state, trainer.state_shardings)
    iterator.set_state(restored.iterator_state)
    _log.info("resumed from step %d", start_step)
  reference_dir = trainer.workdir / "reference_model"
  # Resume: rows after the restored step are dropped (they are recomputed). Fresh start: any
  # rows left by an earlier run without a checkpoint (allowed by `overwrite`) are dropped too.
  with errors.file_operation("write the metrics", trainer.workdir / metrics_lib.METRICS_FILE):
    writer = metrics_lib.MetricWriter(trainer.workdir, process_index=jax.process_index(),
                                      resume_step=start_step if start_step else -1,
                                      wandb=bool(c.wandb.enabled), wandb_project=c.wandb.project,
                                      config=c.to_dict())
  guard.exit_note = ("nothing to save yet; re-run the same command to start again" if not start_step
                     else f"nothing new since the checkpoint of step {start_step}; re-run the same "
                     "command to resume")
  results: dict[str, Any] = {**trainer.data_report}
  bar_enabled = bool(c.progress_bar)
  if not start_step:
    if c.sft.num_steps:
      results.update(trainer.warmup(warmup_examples, bar_enabled))
    initial_eval = trainer.evaluate(trainer.state.params, held_out)
    results["eval/accuracy_start"] = initial_eval["eval/accuracy"]
    writer.write(0, {**initial_eval, **results})
  # The reference policy is the model RL starts from (after any warm-up); saved once so a
  # resumed run compares against the same reference.
  ref_params = None  # with LoRA: the base with adapters disabled, built inside `prepare`
  if trainer.objective.uses_reference(trainer.objective_config) and not c.model.lora_rank:
    if start_step:
      ref_params = nnx.split(checkpointing.load_model_checkpoint(
          reference_dir, shardings=trainer.param_shardings))[1]
    else:
      ref_params = jax.tree.map(jnp.copy, trainer.state.params)
      with workdir_lib.storage_operation("write the reference model", reference_dir):
        checkpointing.save_model_checkpoint(reference_dir, trainer.state.params, trainer.model_config,
                                            overwrite=True)
  elif not start_step and jax.process_index() == 0:
    reference_dir.mkdir(exist_ok=True)

  results.update(trainer.compile_steps(ref_params))
  reward_pool = reward_pool_lib.RewardPool(c.task.name, c.task.reward_style, c.task.reward_workers,
                                           timeout_s=c.task.get("reward_timeout_s", 0.0) or None)
  timer = metrics_lib.PhaseTimer()
  progress = metrics_lib.ProgressBar(c.num_steps, initial=start_step, desc=f"{c.objective} RL",
                                     disable=None if bar_enabled else True,
                                     process_index=jax.process_index(),
                                     log_every_steps=c.log_every_steps,
                                     log_every_seconds=c.log_every_seconds)
  profiler = profiling.StepProfiler(c.get("profile_steps", ""), trainer.workdir)
  last_metrics: dict[str, float] = {}
  step = start_step
  checkpoints = workdir_lib.storage_operation  # a failed save: one line, older steps intact
  failure: Optional[BaseException] = None
  try:
    for step in range(start_step, c.num_steps):
      profiler.start_step(step + 1)
      element = next(iterator)
      examples = element["examples"]
      rollout_key = jax.random.fold_in(jax.random.fold_in(trainer.state.key, step), 0x5A3)
      with timer.phase("rollout"):
        ids, mask, truncated = rollout.encode_prompts(trainer.tokenizer, trainer.task, examples,
                                                      prompt_length=trainer.prompt_length)
        sequences, prompt_mask = trainer.sample(
            sampling_layout.reshard(trainer.state.params, trainer.sampling), ids, mask, rollout_key,
            trainer.rollout_config)
        # Host copy 1 of 2: this process's completion tokens, for its rewards.
        completion_ids = step_io.fetch_local_rows(sequences[:, trainer.prompt_length:], trainer.mesh)
      with timer.phase("reward"):
        completions = rollout.decode_completions(trainer.tokenizer, completion_ids, 0)
        rewards = reward_pool(completions, examples)
      batch_size = len(examples)
      example_ids = (step * jax.process_count() + jax.process_index()) * batch_size + np.arange(batch_size)
      # The batch is built on the device from the sampler's output (no copy of the sequences).
      truncated_rows = np.arange(batch_size) < truncated  # only their sum is used
      batch, rollout_metrics = step_io.device_rl_batch(
          trainer.mesh, sequences, prompt_mask, trainer.put_batch({
              "rewards": np.asarray(rewards, np.float32), "group_ids": element["group_ids"],
              "example_ids": example_ids, "truncated": truncated_rows}),
          solved_reward=trainer.task.solved_reward)
      with timer.phase("prepare"):
        prepared = trainer._prepare(trainer.state.params, ref_params, batch, trainer.state.key,
                                 jnp.int32(step))
        jax.block_until_ready(prepared.per_example)  # the phase time covers the device work
      with timer.phase("update"):
        update_metrics = []
        for iteration, (mb, pe) in enumerate(trainer.update_batches(batch, prepared.per_example)):
          trainer.state, m = trainer._train_step(trainer.state, mb, pe, jnp.int32(step),
                                           jnp.int32(iteration))
          update_metrics.append(m)
        # Host copy 2 of 2: every metric of the step, packed into one vector on the device.
        step_metrics = step_io.fetch_metrics(trainer.mesh, update_metrics, {
            **{f"prepare/{k}": v for k, v in prepared.metrics.items()}, **rollout_metrics})
      guard.unsaved_progress = True  # a stop now saves this step first
      step_metrics["reward/failed_calls"] = float(len(reward_pool.last_failures))
      done = step + 1
      if c.eval.every_steps and (done % c.eval.every_steps == 0 or done == c.num_steps):
        with timer.phase("eval"):
          step_metrics.update(trainer.evaluate(trainer.state.params, held_out))
      times = timer.metrics()
      step_metrics.update(times)
      step_metrics["time/rollout_share"] = rollout_share(times)
      step_metrics["rollout/tokens_per_second"] = metrics_lib.tokens_per_second(
          completion_ids.shape[0] * c.rollout.gen_length, times.get("time/rollout", 0.0))
      with errors.file_operation("write the metrics", writer.path):
        writer.write(done, step_metrics)
      last_metrics = step_metrics
      progress.update(done, {"reward": step_metrics["reward/mean"],
                             "correct": step_metrics["reward/accuracy"],
                             **({"eval_acc": step_metrics["eval/accuracy"]}
                                if "eval/accuracy" in step_metrics else {})},
                      phases={k.removeprefix("time/"): v for k, v in times.items()})
      stop = guard.should_stop()
      with checkpoints("write the checkpoint", ckpt.directory, run_start.last_checkpoint_note(ckpt)):
        ckpt.save(done, trainer.state, iterator_state=iterator.get_state(),
                  consumed_prompts=done * c.prompts_per_step, metadata={"config": c.to_json()},
                  force=done == c.num_steps or stop)
        profiler.end_step(done)
        if stop:
          signum = guard.first_signal or signal.SIGTERM  # another process was signalled
          _log.warning("stop requested (%s): saving step %d and exiting",
                       interrupts.signal_name(signum), done)
          ckpt.wait_until_finished()
          results["interrupted_at" if signum == signal.SIGINT else "preempted_at"] = done
          break
  except BaseException as e:
    failure = e
    raise
  finally:
    profiler.close()
    progress.close()
    with checkpoints("write the checkpoint", ckpt.directory, run_start.last_checkpoint_note(ckpt)):
      run_start.close_after_run(ckpt, [reward_pool.close, writer.close], failure)
  results.update({k: v for k, v in last_metrics.items() if k.startswith("eval/")})
  guard.unsaved_progress = False  # every step is in the last checkpoint now
  if guard.stop_requested and "preempted_at" not in results and "interrupted_at" not in results:
    # A signal during the last step's save: stop without the final model (the same command
    # writes it).
    signum = guard.first_signal or signal.SIGTERM
    results["interrupted_at" if signum == signal.SIGINT else "preempted_at"] = c.num_steps
  if "preempted_at" not in results and "interrupted_at" not in results:
    # The trained policy (LoRA adapters folded in) in the project's model format: launch/eval.py,
    # launch/generate.py and launch/convert.py (to a Hugging Face folder) take it directly.
    guard.exit_note = (f"the checkpoint of step {c.num_steps} is saved but not the final model; "
                       "re-run the same command to write it")
    final = final_model.export(trainer.workdir, trainer.graphdef, trainer.state.params, trainer.mesh)
    if jax.process_index() == 0:
      results["final_model"] = str(final)
  return results


def train(config: ml_collections.ConfigDict, workdir: str, *, overwrite: bool = False,
          fallback_to_previous_checkpoint: bool = False) -> dict[str, Any]:
  """Runs (or resumes) training in ``workdir``; returns summary numbers. A finished run (its last
  checkpoint at ``num_steps`` and its final model written) is left as it is:
  ``{"finished": step, "final_model": ...}``.

  The workdir is locked for the run (`workdir.RunFolder`: a second run on it is refused) and
  how the run starts is decided under the lock (`run_start.plan`): ``overwrite`` starts from
  scratch where the workdir holds a run this config cannot continue (metrics of another run
  without a checkpoint, or checkpoints that differ in a structural key), which is an error
  otherwise. ``fallback_to_previous_checkpoint``: if the latest checkpoint fails its checksums,
  resume from the newest intact one (otherwise the error stops the run).
  """
  config_checks.validate_config(config, jax.device_count())
  with workdir_lib.RunFolder(workdir, lock=jax.process_index() == 0) as folder:
    step = run_start.finished_step(config, folder.path)
    if step is not None:
      final = (folder.path / final_model.FINAL_MODEL_DIR).absolute()
      _log.info("the run in %s is finished (step %d of num_steps=%d); its final model is %s. "
                "Raise --config.num_steps to train further.", workdir, step, config.num_steps, final)
      return {"finished": step, "final_model": str(final)}
    start = run_start.plan_on_every_process(folder.path, run_start.config_json(config), overwrite)
    return run(trainer_lib.Trainer(config, folder.path, start=start,
                                   fallback_to_previous_checkpoint=fallback_to_previous_checkpoint))
