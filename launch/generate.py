"""Sample completions from a LLaDA / Dream checkpoint with every sampler knob as a flag.

  python launch/generate.py --checkpoint=PATH --prompt="What is 2+3?" [--prompt=...]
      [--gen_length=128 --steps=128 --block_length=32 --temperature=0 --remasking=low_confidence
       --cfg_scale=0 --logits_eos_inf --confidence_eos_eot_inf --eos_eot_aliased
       --cache=none|prefix|dual --threshold=0.9 | --factor=1.0 --max_tokens_per_step=N
       --stop_at_eos --reference_quota --sampler=llada|dream --alg=entropy --top_p --top_k
       --alg_temp --seed=0 --num_samples=1 --dtype=bfloat16 --tokenizer=PATH|byte --no_chat]
  python launch/generate.py --checkpoint=PATH --prompt_ids=1,2,3 --output_ids

``--checkpoint``: an HF folder (config.json + safetensors) or a model checkpoint from
`dmpo_jax.checkpointing.save_model_checkpoint`; ``--preset=tiny`` instead samples from a randomly
initialised preset (smoke tests). Text prompts are wrapped in the model's chat template (one user
turn) unless ``--no_chat``; ``--prompt_ids`` (comma-separated, repeatable) bypasses the tokenizer
and the template. Prompts are left-padded into one batch, whose rows are split over every
device (`dmpo_jax.inference.evaluation.generate_rows`). Prints each completion (decoded with
special tokens skipped), or with ``--output_ids`` each row's full token ids (prompt + completion)
as one JSON list per line.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
from absl import flags  # noqa: E402
from flax import nnx  # noqa: E402

from dmpo_jax import cli, sampling_layout  # noqa: E402
from dmpo_jax.diffusion.dream_sampler import DREAM_ALGS, dream_generate  # noqa: E402
from dmpo_jax.diffusion.sampler import CACHES, REMASKING, generate  # noqa: E402
from dmpo_jax.inference import evaluation, model_loading, sampler_configs  # noqa: E402
from dmpo_jax.inference import prompts as prompts_lib  # noqa: E402

SAMPLERS = {"llada": generate, "dream": dream_generate}

FLAGS = flags.FlagValues()
flags.DEFINE_string("checkpoint", None, "HF folder or dmpo_jax model checkpoint", flag_values=FLAGS)
flags.DEFINE_string("preset", None, "randomly initialised ModelConfig preset instead of a checkpoint",
                    flag_values=FLAGS)
flags.DEFINE_string("tokenizer", None, "tokenizer folder or 'byte' (default: the checkpoint "
                    "folder, 'byte' for --preset)", flag_values=FLAGS)
flags.DEFINE_multi_string("prompt", [], "text prompt (repeatable)", flag_values=FLAGS)
flags.DEFINE_multi_string("prompt_ids", [], "comma-separated token ids (repeatable)",
                          flag_values=FLAGS)
flags.DEFINE_bool("no_chat", False, "do not apply the chat template", flag_values=FLAGS)
flags.DEFINE_bool("output_ids", False, "print full token ids as JSON lists", flag_values=FLAGS)
flags.DEFINE_integer("num_samples", 1, "completions per prompt", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "sampling seed", flag_values=FLAGS)
flags.DEFINE_string("dtype", None, "parameter/compute dtype override (e.g. bfloat16)",
                    flag_values=FLAGS)
flags.DEFINE_enum("sampler", None, ["llada", "dream"],
                  "default: dream for Dream checkpoints, llada otherwise", flag_values=FLAGS)
flags.DEFINE_integer("gen_length", 128, "tokens to generate", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_integer("steps", 128, "denoising steps", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_integer("block_length", 32, "semi-autoregressive block length", lower_bound=1,
                     flag_values=FLAGS)
flags.DEFINE_float("temperature", 0.0, "sampling temperature (0 = greedy)", lower_bound=0.0,
                   flag_values=FLAGS)
flags.DEFINE_enum("remasking", "low_confidence", list(REMASKING), "remasking rule", flag_values=FLAGS)
flags.DEFINE_float("cfg_scale", 0.0, "classifier-free guidance scale", lower_bound=0.0,
                   flag_values=FLAGS)
flags.DEFINE_bool("logits_eos_inf", False, "never sample EOS", flag_values=FLAGS)
flags.DEFINE_bool("confidence_eos_eot_inf", False, "never commit EOS/EOT by confidence",
                  flag_values=FLAGS)
flags.DEFINE_bool("eos_eot_aliased", False,
                  "reproduce the reference's aliased EOS/EOT confidence assignment", flag_values=FLAGS)
flags.DEFINE_float("threshold", None, "Fast-dLLM confidence threshold", flag_values=FLAGS)
flags.DEFINE_bool("reference_quota", False,
                  "masked positions before the block compete for its quota (reference)",
                  flag_values=FLAGS)
flags.DEFINE_enum("cache", "none", list(CACHES), "Fast-dLLM KV cache per block", flag_values=FLAGS)
flags.DEFINE_float("factor", None, "Fast-dLLM factor rule", flag_values=FLAGS)
flags.DEFINE_integer("max_tokens_per_step", None,
                     "cap on the tokens --threshold / --factor commit per step", flag_values=FLAGS)
flags.DEFINE_bool("stop_at_eos", False, "skip the remaining blocks once every row is EOS-padded",
                  flag_values=FLAGS)
flags.DEFINE_enum("alg", "entropy", list(DREAM_ALGS), "Dream reveal order", flag_values=FLAGS)
flags.DEFINE_float("alg_temp", 0.0, "Dream reveal-order temperature", flag_values=FLAGS)
flags.DEFINE_float("top_p", None, "Dream nucleus sampling", flag_values=FLAGS)
flags.DEFINE_integer("top_k", None, "Dream top-k sampling", flag_values=FLAGS)
flags.DEFINE_float("eps", 1e-3, "Dream time-grid end", flag_values=FLAGS)


def check_flags(args) -> None:
  """The flag combinations that cannot run; raises `cli.UserError`."""
  cli.check(bool(args.checkpoint) != bool(args.preset), "give exactly one of --checkpoint and --preset")
  cli.check(bool(args.prompt or args.prompt_ids), "give at least one --prompt or --prompt_ids")
  if args.checkpoint:
    cli.require_model_folder("checkpoint", args.checkpoint)
  cli.check(args.gen_length % args.block_length == 0,
            f"--gen_length={args.gen_length} is not a multiple of --block_length={args.block_length}")


def load(args):
  """(model, tokenizer or None)."""
  dtypes = {} if args.dtype is None else {"param_dtype": args.dtype}
  if args.preset and args.dtype is not None:
    dtypes["dtype"] = args.dtype  # a preset computes in its parameter dtype
  model = model_loading.load_model(args.checkpoint or None, preset=args.preset, seed=args.seed,
                                   **dtypes).model
  tokenizer = None
  if args.prompt or not args.output_ids:
    source = args.tokenizer or ("byte" if args.preset else args.checkpoint)
    tokenizer = model_loading.load_tokenizer(source, model.config)
  return model, tokenizer


def build_prompts(args, tokenizer) -> list[list[int]]:
  prompts = []
  for text in args.prompt:
    if args.no_chat:
      prompts.append(tokenizer.encode(text))
    else:
      prompts.append(tokenizer.encode_chat([{"role": "user", "content": text}]))
  for ids in args.prompt_ids:
    try:
      prompts.append([int(t) for t in ids.split(",") if t.strip()])
    except ValueError as e:
      raise ValueError(f"--prompt_ids must be comma-separated integers, got {ids!r}") from e
  if any(len(p) == 0 for p in prompts):
    raise ValueError("empty prompt")
  return [p for p in prompts for _ in range(args.num_samples)]


def _run() -> int:
  args = FLAGS
  check_flags(args)
  with cli.user_input(f"--checkpoint={args.checkpoint}" if args.checkpoint else f"--preset={args.preset}"):
    model, tokenizer = load(args)
  mc = model.config
  with cli.user_input("prompt", ValueError):
    prompts = build_prompts(args, tokenizer)
  for p in prompts:
    bad = [t for t in p if not 0 <= t < mc.vocab_size]
    cli.check(not bad, f"prompt token ids {bad[:5]} are outside the model vocabulary [0, {mc.vocab_size})")
  # One batch, left-padded to its longest prompt.
  ids, mask = prompts_lib.left_pad(prompts, mc.pad_token_id, length=max(len(p) for p in prompts))
  sampler = args.sampler or ("dream" if mc.family == "dream" else "llada")
  graphdef, params = nnx.split(model)
  with cli.user_input("sampler flags", ValueError):
    config = sampler_configs.from_flags(args, sampler)
  start = time.perf_counter()
  layout = sampling_layout.inference_layout(mc, params)  # rows split over the devices
  sequences, forward_passes = evaluation.generate_rows(
      layout, graphdef, sampling_layout.reshard(params, layout), ids, mask,
      jax.random.key(args.seed), config, SAMPLERS[sampler])
  elapsed = time.perf_counter() - start
  for row in range(len(prompts)):
    if args.output_ids:
      real = sequences[row, ids.shape[1] - int(mask[row].sum()):]
      print(json.dumps([int(t) for t in real]))
    else:
      print(tokenizer.decode(sequences[row, ids.shape[1]:].tolist(), skip_special_tokens=True))
  print(f"# {len(prompts)} rows, {forward_passes} forward passes, {elapsed:.2f} s "
        f"(incl. compile)", file=sys.stderr)
  return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
  return cli.run_main(_run, FLAGS, argv, doc=__doc__)


if __name__ == "__main__":
  sys.exit(main())
