"""Base training config (big_vision style): every other config starts from `get_config()`.

Override any field from the command line:
  python launch/train.py --config=configs/bgpo_math.py --config.optimizer.learning_rate=1e-6

Objective hyper-parameters live in one block per registered objective (``config.bgpo``,
``config.dmpo``, ...), pre-filled with the registry's validated defaults, so switching with
``--config.objective=dmpo --config.dmpo.alpha=0.05`` works without editing files.
"""

import ml_collections

from dmpo_jax.rl import registry


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.num_steps = 100            # RL steps (one rollout each)
  config.objective = "bgpo"
  config.updates_per_rollout = 1    # F (DMPO buffer reuse) / μ (diffu-GRPO inner iterations)
  # Split each rollout into this many disjoint mini-batches of whole groups; update i uses
  # mini-batch i mod M (BGPO off-policy: 2 updates on 2 mini-batches of 8 prompts).
  config.minibatches_per_rollout = 1

  # Model: a checkpoint (HF folder or the project's model format), or a randomly initialised preset.
  config.model = ml_collections.ConfigDict()
  config.model.preset = "llada_8b"
  config.model.checkpoint = ""      # HF folder (config.json) or trained checkpoint
  # "auto": the checkpoint; without one, random weights only for the `tiny` preset (a larger
  # preset without a checkpoint is refused). "random": random weights for any preset.
  config.model.init = "auto"
  config.model.dtype = ""           # compute dtype override ("" = preset / checkpoint)
  config.model.param_dtype = ""
  config.model.remat = True
  # Padded keys are invisible (`docs/llada.md` §2.1). The references' trainers pass no attention
  # mask but never see padding at their published layouts (one prompt per GPU batch), so the mask
  # reproduces their forward on this library's shared padded bucket; False attends to padding.
  config.model.use_key_padding_mask = True
  # dtype of the cross-device sum of weight gradients: "" = the compute dtype, "float32" = fp32
  # (twice the reduce-scatter bytes; `docs/scaling.md` §4).
  config.model.grad_reduce_dtype = ""
  # Attention kernel: "auto" (Pallas splash attention on TPU, cuDNN flash attention on GPU for
  # bf16, XLA otherwise), or "xla" / "cudnn" / "splash" (`dmpo_jax/models/attention.py`).
  config.model.attention_impl = "auto"
  # LoRA (rank 0 = full fine-tuning with a frozen reference copy). With LoRA the reference policy
  # is the base with adapters disabled. Targets use LLaDA's names (HF Llama names are accepted).
  config.model.lora_rank = 0
  config.model.lora_alpha = 16.0
  config.model.lora_targets = ("q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out")
  config.tokenizer = ""             # "" = the checkpoint folder; "byte" = byte-level tokenizer

  # Task and data.
  config.task = ml_collections.ConfigDict()
  config.task.name = "gsm8k"
  config.task.train_source = ""     # local file or HF dataset name ("" = the task's default)
  config.task.eval_source = ""
  config.task.reward_style = "fixed"
  config.task.prompt_length = 256   # prompt bucket (left-padded; longer prompts left-truncated)
  # Truncated prompts are counted before training (a warning); a larger share than this in the
  # training or the held-out set stops the run.
  config.task.max_truncated_fraction = 0.05
  config.task.reward_workers = 4    # parallel reward processes (0 = in the trainer process)
  config.task.reward_timeout_s = 0.0  # wall limit of one reward call in a worker (0 = task default)

  # Code sandbox of the code tasks (`docs/sandbox.md`); task.reward_timeout_s must not be below
  # 2 * wall_time_s + 2 (the run and its cleanup).
  config.sandbox = ml_collections.ConfigDict()
  config.sandbox.cpu_time_s = 5
  config.sandbox.wall_time_s = 10.0
  config.sandbox.memory_bytes = 1 << 30
  config.sandbox.allow_unisolated = False  # run code where neither namespaces nor Landlock hold

  config.prompts_per_step = 8       # P distinct prompts per RL step (global)
  config.group_size = 8             # G completions per prompt

  # Rollout sampler (`docs/llada.md` §6-7): every key is a `SamplerConfig` field
  # (`dmpo_jax.rl.rollout.sampler_config`). Held-out evaluation always uses the exact sampler.
  config.rollout = ml_collections.ConfigDict()
  config.rollout.gen_length = 256
  config.rollout.block_length = 32
  config.rollout.steps = 128
  config.rollout.temperature = 0.9
  config.rollout.remasking = "low_confidence"
  config.rollout.cfg_scale = 0.0
  config.rollout.cache = "none"     # none | prefix | dual (Fast-dLLM KV caches)
  config.rollout.threshold = -1.0   # <= 0: off; else confidence-threshold parallel decoding
  config.rollout.factor = -1.0      # <= 0: off; else Fast-dLLM's factor rule
  config.rollout.max_tokens_per_step = 0  # <= 0: no cap (threshold / factor decoding only)
  config.rollout.stop_at_eos = False  # skip the remaining blocks once every row is EOS-padded

  # Optimizer (AdamW + clipping).
  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.learning_rate = 1e-6
  config.optimizer.weight_decay = 0.0
  config.optimizer.b1 = 0.9
  config.optimizer.b2 = 0.99
  config.optimizer.max_grad_norm = 1.0
  config.optimizer.warmup_steps = 0
  config.optimizer.schedule = "constant"
  # Precision (`docs/architecture.md` §3): AdamW moments in fp32 whatever model.param_dtype is
  # (bfloat16 halves their memory); master_weights keeps an fp32 copy of the trainable
  # parameters that receives the updates, the stored parameters being its rounded compute copy.
  config.optimizer.state_dtype = "float32"
  config.optimizer.master_weights = False

  # Optional masked-diffusion SFT warm start before RL (LLaDA SFT loss, `docs/llada.md` §8).
  config.sft = ml_collections.ConfigDict()
  config.sft.num_steps = 0
  config.sft.batch_size = 64
  config.sft.learning_rate = 1e-4
  config.sft.ascending_fraction = 1.0  # demo task only: fraction of correct demonstrations

  # Mesh ('data', 'fsdp', 'tensor'); -1 = the remaining devices.
  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = 1
  config.mesh.fsdp = -1
  config.mesh.tensor = 1
  # Rollout sampler layout (`docs/scaling.md` §2): the policy is resharded once per RL step onto
  # the same devices as (data = N / k, fsdp = 1, tensor = k). 0 = auto: k = 1 (replicated) when
  # the weights fit next to the training state, else the smallest k that fits.
  config.mesh.sampling_tensor = 0

  # Held-out evaluation during training (greedy, published block/step protocol).
  config.eval = ml_collections.ConfigDict()
  config.eval.every_steps = 50
  config.eval.num_examples = 256
  config.eval.gen_length = 256
  config.eval.block_length = 32
  config.eval.steps = 128
  config.eval.batch_size = 32
  config.eval.style = "fixed"       # scorer: "fixed" or "d1" (d1's eval script, quirks included)

  # Checkpoints and logging.
  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.every_steps = 50
  config.checkpoint.max_to_keep = 3
  # Without a terminal (log file, nohup, pod job) a plain progress line is logged every
  # log_every_steps steps or log_every_seconds seconds, whichever comes first.
  config.log_every_steps = 10
  config.log_every_seconds = 60.0
  config.wandb = ml_collections.ConfigDict()
  config.wandb.enabled = False
  config.wandb.project = "dmpo_jax"
  config.progress_bar = True
  # "a,b": a jax.profiler trace of RL steps a..b (numbered as in metrics.jsonl) written to
  # <workdir>/profile, for TensorBoard's profile plugin or ui.perfetto.dev ("" = no trace).
  config.profile_steps = ""

  # One block per objective, pre-filled with validated defaults.
  for name in registry.objective_names():
    config[name] = ml_collections.ConfigDict(registry.get_objective(name).default_config())
  return config
