"""The trainer: everything one RL run sets up and the pieces the loop (`rl/loop.py`) calls
(`docs/architecture.md` §2, §3).

`Trainer` validates the config, loads the task's data (`Task.run_data`) and the model on the
mesh, initialises the train state (parameters donated into it, optimizer moments sharded like
the parameters), and provides

* sampling on the sampling layout (`Trainer.sample`; `sampling_layout`) and the greedy held-out
  evaluation (`Trainer.evaluate`);
* the masked-diffusion SFT warm-up on the task's demonstrations (`Trainer.warmup`);
* the jitted ``prepare`` and the ahead-of-time compiled train step (`Trainer.compile_steps`) with
  the mini-batches of one rollout (`Trainer.update_batches`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from dmpo_jax import errors, metrics as metrics_lib, sampling_layout, sharding
from dmpo_jax.diffusion import sampler as sampler_lib
from dmpo_jax.inference import evaluation, model_loading, sampler_configs
from dmpo_jax.models import attention, lora
from dmpo_jax.rl import config_checks, data_checks, registry, rollout, run_start, sft
from dmpo_jax.rl import step_io, train_state as ts, train_step
from dmpo_jax.tasks import base as task_base, pipeline

_log = logging.getLogger("dmpo_jax.train")


def rl_optimizer(config):
  """The RL optimizer of ``config.optimizer`` (AdamW, clipping, schedule over all updates)."""
  return ts.make_optimizer(
      config.optimizer.learning_rate, weight_decay=config.optimizer.weight_decay,
      b1=config.optimizer.b1, b2=config.optimizer.b2, max_grad_norm=config.optimizer.max_grad_norm,
      warmup_steps=config.optimizer.warmup_steps,
      total_steps=config.num_steps * config.updates_per_rollout,
      schedule=config.optimizer.schedule, state_dtype=config.optimizer.state_dtype)


def rollout_sampler_config(config) -> sampler_lib.SamplerConfig:
  """The rollout sampler settings of ``config.rollout`` (`inference.sampler_configs`)."""
  return sampler_configs.sampler_config(config.rollout)


def abstract_rollout_batch(config, mesh, minibatches: int = 1) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes/shardings of the RL batch of one step (prompts_per_step × group_size rows of
  prompt_length + gen_length tokens), or of one of its ``minibatches``, split over the batch
  mesh axes (for ahead-of-time compilation)."""
  b = config.prompts_per_step * config.group_size // minibatches
  t = config.task.prompt_length + config.rollout.gen_length
  spec = {"sequences": ((b, t), jnp.int32), "attention_mask": ((b, t), jnp.bool_),
          "prompt_mask": ((b, t), jnp.bool_), "completion_mask": ((b, t), jnp.bool_),
          "rewards": ((b,), jnp.float32), "group_ids": ((b,), jnp.int32),
          "example_ids": ((b,), jnp.int32)}
  return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(mesh, len(shape)))
          for k, (shape, dtype) in spec.items()}


# The one loader of train, eval, generate and convert (`inference.model_loading`).
load_model_and_tokenizer = model_loading.load_model_and_tokenizer


# ------------------------------------------------------------------------------------------------
# Trainer
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Trainer:
  """Holds the compiled functions and the run's state; `loop.run` is the loop."""
  config: ml_collections.ConfigDict
  workdir: pathlib.Path
  # `run_start.FRESH` or `run_start.RESUME` (`run_start.plan`, under the workdir's lock).
  start: str = run_start.FRESH
  # Damaged latest checkpoint: resume from the newest intact one instead of failing.
  fallback_to_previous_checkpoint: bool = False

  def __post_init__(self):
    config = self.config
    self.workdir = pathlib.Path(self.workdir)
    config_checks.validate_config(config, jax.device_count())
    self.task = task_base.get_task(config.task.name)
    self.task.configure(config)  # e.g. a code task's config.sandbox
    with errors.user_input(f"task {config.task.name} data"):  # before the (slow) model load
      self.data = self.load_data()
    errors.check(len(self.data.train) > 0 and len(self.data.held_out) > 0,
                 f"task {config.task.name}: no training or no held-out examples (task.train_source="
                 f"{config.task.train_source!r}, task.eval_source={config.task.eval_source!r})")
    self.mesh = sharding.create_mesh(config_checks.mesh_shape(config, jax.device_count()))
    with errors.user_input(f"model {config.model.checkpoint or config.model.preset}"):
      self.model, self.tokenizer = load_model_and_tokenizer(config, self.mesh)
    self.data_report = data_checks.check_truncation(  # before anything is compiled or written
        self.tokenizer, self.task, self.data.train, self.data.held_out, config.task.prompt_length,
        config.task.get("max_truncated_fraction", 0.05))
    model_config = self.model.config
    problem = attention.platform_error(model_config.attention_impl, jax.default_backend(),
                                       model_config.compute_dtype)
    errors.check(problem is None, f"model.attention_impl: {problem}")
    if config.model.lora_rank:
      self.model = lora.add_adapters(self.model, rank=config.model.lora_rank,
                                     alpha=config.model.lora_alpha,
                                     targets=tuple(config.model.lora_targets), seed=config.seed)
    self.graphdef, params = nnx.split(self.model)
    self.model_config, self.model = self.model.config, None  # its arrays are donated below
    self.param_shardings = sharding.state_shardings(params, self.mesh)
    params = jax.device_put(params, self.param_shardings)
    self.objective = registry.get_objective(config.objective)
    self.objective_config = self.objective.make_config(config.get(config.objective, {}))
    self.optimizer = rl_optimizer(config)
    # Optimizer moments (and master weights) sharded like the parameters (explicit: XLA would
    # replicate the zeros that initialise them).
    init = functools.partial(ts.init_train_state, optimizer=self.optimizer, seed=config.seed,
                             master_weights=config.optimizer.master_weights)
    _, self.state_shardings = train_step.state_shardings(init, params, self.mesh)
    # The parameters are donated: the state's params reuse their buffers (no second copy).
    self.state = jax.jit(init, out_shardings=self.state_shardings, donate_argnums=0)(params)
    # Resident while sampling: the train state and (full fine-tuning) the reference copy, which
    # has the parameters' shapes and shardings.
    self.sampling = sampling_layout.layout_for_training(
        self.mesh, self.model_config, int(config.mesh.get("sampling_tensor", 0)),
        self.state.params,
        (self.state,) if config.model.lora_rank else (self.state, self.state.params))
    self.rollout_config = rollout_sampler_config(config)
    # Held-out evaluation, shared with launch/eval.py (`inference.evaluation`).
    self.eval_spec = evaluation.EvalSpec.from_config(config)
    self.eval_config = self.eval_spec.sampler
    self.prompt_length = config.task.prompt_length
    self._train_step = None  # compiled ahead of time in `compile_steps`
    self._prepare = None

  # -- data -------------------------------------------------------------------------------------
  def load_data(self) -> task_base.RunData:
    """The task's train, warm-up and held-out examples (`Task.run_data`); the held-out set keeps
    the distinct prompts that are no training prompt, at most ``eval.num_examples``."""
    c, task = self.config, self.task
    data = task.run_data(c)
    held_out = data_checks.distinct_held_out(task, data.train, data.held_out)[0][: c.eval.num_examples]
    return data._replace(held_out=held_out)

  def make_iterator(self, train):
    cfg = pipeline.PipelineConfig(prompts_per_batch=self.config.prompts_per_step,
                                  group_size=self.config.group_size, seed=self.config.seed,
                                  process_index=jax.process_index(),
                                  process_count=jax.process_count())
    return pipeline.make_iterator(train, cfg)

  # -- sampling and evaluation -----------------------------------------------------------------
  def sample(self, sampling_params, prompt_ids, prompt_mask, key, sampler_config):
    """Samples from this process's prompts with ``sampling_params`` (from
    `sampling_layout.reshard`, freed after); returns the global (sequences [B, P + L], prompt
    mask [B, P]) on the devices, split over the batch axes."""
    put = self.put_batch({"ids": prompt_ids, "mask": prompt_mask})
    out = sampling_layout.generate(self.sampling, self.graphdef, sampling_params, put["ids"],
                                   put["mask"], key, sampler_config)
    # Back on the training mesh's batch split (token ids only), where the RL step reads them.
    return jax.device_put(out.sequences, sharding.batch_sharding(self.mesh, 2)), put["mask"]

  def evaluate(self, params, examples) -> dict[str, float]:
    """Greedy held-out accuracy (%): `inference.evaluation.evaluate`, as launch/eval.py runs it
    (sharded on the sampling layout, last batch padded)."""
    result = evaluation.evaluate(self.graphdef, params, self.tokenizer, self.task, examples,
                                 self.eval_spec, layout=self.sampling)
    return {"eval/accuracy": float(result.summary["accuracy"])}

  # -- warm-up ----------------------------------------------------------------------------------
  def warmup(self, examples, bar_enabled: bool):
    """Masked-diffusion SFT on demonstrations (``config.sft``), before RL."""
    c = self.config
    optimizer = ts.make_optimizer(c.sft.learning_rate, max_grad_norm=c.optimizer.max_grad_norm,
                                  state_dtype=c.optimizer.state_dtype)
    init = functools.partial(ts.init_train_state, optimizer=optimizer, seed=c.seed + 1,
                             master_weights=c.optimizer.master_weights)
    # Fixed state shardings (the parameters' FSDP layout, moments split like them), so the RL
    # step accepts the result.
    _, shardings = train_step.state_shardings(init, self.state.params, self.mesh)
    # Donated: the warm-up state takes over the parameters' buffers; self.state gets them back
    # (trained) at the end.
    state = jax.jit(init, out_shardings=shardings, donate_argnums=0)(self.state.params)
    step_fn = sft.jit_sft_step(self.graphdef, optimizer, shardings)
    rng = np.random.default_rng(c.seed)
    progress = metrics_lib.ProgressBar(c.sft.num_steps, desc="sft warm-up",
                                       disable=None if bar_enabled else True,
                                       process_index=jax.process_index(),
                                       log_every_steps=max(c.log_every_steps, c.sft.num_steps // 10),
                                       log_every_seconds=c.log_every_seconds)
    loss = float("nan")
    share = c.sft.batch_size // jax.process_count()  # each process feeds its rows of the batch
    for step in range(c.sft.num_steps):
      chunk = [examples[i] for i in rng.integers(0, len(examples), c.sft.batch_size)]
      chunk = chunk[jax.process_index() * share:(jax.process_index() + 1) * share]
      batch = self._sft_batch(chunk)
      state, m = step_fn(state, batch)
      if step % 25 == 0 or step == c.sft.num_steps - 1:
        loss = float(m["sft/loss"])
        progress.update(step + 1, {"loss": loss})
    progress.close()
    self.state = jax.device_put(self.state.replace(params=state.params, master=state.master),
                                self.state_shardings)
    return {"sft/final_loss": loss}

  def _sft_batch(self, examples):
    ids, mask, _ = rollout.encode_prompts(self.tokenizer, self.task, examples,
                                          prompt_length=self.prompt_length)
    gen = self.config.rollout.gen_length
    completion = np.full((len(examples), gen), self.tokenizer.eos_token_id, np.int32)
    for row, example in enumerate(examples):
      target = self.tokenizer.encode(self.task.demonstration(example))[:gen]
      completion[row, :len(target)] = target
    seqs = np.concatenate([ids, completion], axis=1)
    batch = rollout.rl_batch(seqs, mask, np.zeros(len(examples)), np.arange(len(examples)),
                             np.arange(len(examples)))
    return self.put_batch({k: batch[k] for k in ("sequences", "attention_mask", "completion_mask")})

  def put_batch(self, arrays: dict[str, Any]) -> dict[str, jax.Array]:
    """This process's rows -> global device arrays split over the batch mesh axes (dim 0)."""
    return step_io.put_rows(self.mesh, arrays)

  # -- the RL train step --------------------------------------------------------------------------
  def abstract_rollout_batch(self, minibatches: int = 1) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes/shardings of the RL batch of one step, or of one of its ``minibatches`` (for
    ahead-of-time compilation)."""
    return abstract_rollout_batch(self.config, self.mesh, minibatches)

  def compile_steps(self, ref_params) -> dict[str, int]:
    """Jits `prepare_rollout` and AOT-compiles `rl_update` for the run's shapes; logs memory."""
    self._prepare = train_step.jit_prepare(self.graphdef, self.objective, self.objective_config,
                                           self.mesh)
    prepared = jax.eval_shape(self._prepare, self.state.params, ref_params,
                              self.abstract_rollout_batch(), self.state.key, train_step.SCALAR_INT32)
    minibatches = self.config.minibatches_per_rollout
    batch = self.abstract_rollout_batch(minibatches)
    per_example = {k: jax.ShapeDtypeStruct((v.shape[0] // minibatches,) + v.shape[1:], v.dtype,
                                           sharding=sharding.batch_sharding(self.mesh, v.ndim))
                   for k, v in prepared.per_example.items()}
    jitted = train_step.jit_rl_update(self.graphdef, self.objective, self.objective_config,
                                      self.optimizer, self.state_shardings)
    self._train_step, info = train_step.compile_ahead_of_time(
        jitted, train_step.abstract(self.state), batch, per_example, train_step.SCALAR_INT32,
        train_step.SCALAR_INT32)
    _log.info("train step compiled ahead of time: %s",
              ", ".join(f"{k.removeprefix('compile/').removesuffix('_size_in_bytes')} memory "
                        f"{v / 2**20:,.1f} MiB" for k, v in info.items()) or "no memory analysis")
    return info

  def update_batches(self, batch: dict[str, jax.Array], per_example: dict[str, jax.Array]):
    """The (batch, per-example) pairs of the ``updates_per_rollout`` updates of one rollout, cut
    on the device (`step_io.minibatch`).

    With ``minibatches_per_rollout`` = M, the rollout (prompts in order, each prompt's G
    completions consecutive) is split into M disjoint mini-batches of whole groups (consecutive
    rows of the global batch) and update i uses mini-batch i mod M (BGPO's off-policy mode:
    M = 2, two updates). M = 1 reuses the whole rollout for every update (DMPO's F-fold buffer
    reuse, diffu-GRPO's μ iterations).
    """
    minibatches = self.config.minibatches_per_rollout
    placed = [step_io.minibatch(self.mesh, (batch, per_example), m, minibatches)
              for m in range(minibatches)]
    for iteration in range(self.config.updates_per_rollout):
      yield placed[iteration % minibatches]
