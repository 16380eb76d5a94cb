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
and the template. Prompts are left-padded into one batch. Prints each completion (decoded with
special tokens skipped), or with ``--output_ids`` each row's full token ids (prompt + completion)
as one JSON list per line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from dmpo_jax.diffusion.dream_sampler import DREAM_ALGS, DreamSamplerConfig, dream_generate  # noqa: E402
from dmpo_jax.diffusion.sampler import CACHES, REMASKING, SamplerConfig, generate  # noqa: E402


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--checkpoint", help="HF folder or dmpo_jax model checkpoint")
  p.add_argument("--preset", help="randomly initialised ModelConfig preset instead of a checkpoint")
  p.add_argument("--tokenizer", help="tokenizer folder or 'byte' (default: the checkpoint folder, "
                                     "'byte' for --preset)")
  p.add_argument("--prompt", action="append", default=[], help="text prompt (repeatable)")
  p.add_argument("--prompt_ids", action="append", default=[], help="comma-separated token ids")
  p.add_argument("--no_chat", action="store_true", help="do not apply the chat template")
  p.add_argument("--output_ids", action="store_true", help="print full token ids as JSON lists")
  p.add_argument("--num_samples", type=int, default=1, help="completions per prompt")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--dtype", default=None, help="parameter/compute dtype override (e.g. bfloat16)")
  p.add_argument("--sampler", choices=("llada", "dream"), default=None,
                 help="default: dream for Dream checkpoints, llada otherwise")
  p.add_argument("--gen_length", type=int, default=128)
  p.add_argument("--steps", type=int, default=128)
  p.add_argument("--block_length", type=int, default=32)
  p.add_argument("--temperature", type=float, default=0.0)
  p.add_argument("--remasking", choices=REMASKING, default="low_confidence")
  p.add_argument("--cfg_scale", type=float, default=0.0)
  p.add_argument("--logits_eos_inf", action="store_true")
  p.add_argument("--confidence_eos_eot_inf", action="store_true")
  p.add_argument("--eos_eot_aliased", action="store_true",
                 help="reproduce the reference's aliased EOS/EOT confidence assignment")
  p.add_argument("--reference_quota", action="store_true",
                 help="masked positions before the block compete for its quota (reference)")
  p.add_argument("--cache", choices=CACHES, default="none", help="Fast-dLLM KV cache per block")
  p.add_argument("--threshold", type=float, default=None, help="Fast-dLLM confidence threshold")
  p.add_argument("--factor", type=float, default=None, help="Fast-dLLM factor rule")
  p.add_argument("--max_tokens_per_step", type=int, default=None,
                 help="cap on the tokens --threshold / --factor commit per step")
  p.add_argument("--stop_at_eos", action="store_true",
                 help="skip the remaining blocks once every row is EOS-padded")
  p.add_argument("--alg", choices=DREAM_ALGS, default="entropy", help="Dream reveal order")
  p.add_argument("--alg_temp", type=float, default=0.0)
  p.add_argument("--top_p", type=float, default=None)
  p.add_argument("--top_k", type=int, default=None)
  p.add_argument("--eps", type=float, default=1e-3, help="Dream time-grid end")
  args = p.parse_args(argv)
  if bool(args.checkpoint) == bool(args.preset):
    p.error("give exactly one of --checkpoint and --preset")
  if not args.prompt and not args.prompt_ids:
    p.error("give at least one --prompt or --prompt_ids")
  return args


def load(args):
  """(model, tokenizer or None)."""
  from dmpo_jax.models import tokenizer as tok  # pylint: disable=import-outside-toplevel
  if args.preset:
    from dmpo_jax.models.config import get_preset  # pylint: disable=import-outside-toplevel
    from dmpo_jax.models.transformer import create_model  # pylint: disable=import-outside-toplevel
    overrides = {} if args.dtype is None else {"param_dtype": args.dtype, "dtype": args.dtype}
    model = create_model(get_preset(args.preset, **overrides), seed=args.seed)
  else:
    from launch.eval import load_model  # pylint: disable=import-outside-toplevel
    model, _ = load_model(args.checkpoint, dtype=args.dtype)
  tokenizer = None
  if args.prompt or not args.output_ids:
    source = args.tokenizer or ("byte" if args.preset else args.checkpoint)
    tokenizer = tok.load_tokenizer(source, family=model.config.family)
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


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  length = max(len(p) for p in prompts)
  ids = np.full((len(prompts), length), pad_id, np.int32)
  mask = np.zeros((len(prompts), length), np.int32)
  for row, p in enumerate(prompts):
    ids[row, length - len(p):] = p
    mask[row, length - len(p):] = 1
  return ids, mask


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = parse_args(argv)
  model, tokenizer = load(args)
  mc = model.config
  prompts = build_prompts(args, tokenizer)
  for p in prompts:
    bad = [t for t in p if not 0 <= t < mc.vocab_size]
    if bad:
      raise ValueError(f"prompt token ids {bad[:5]} are outside the model vocabulary [0, {mc.vocab_size})")
  ids, mask = left_pad(prompts, mc.pad_token_id)
  sampler = args.sampler or ("dream" if mc.family == "dream" else "llada")
  graphdef, params = nnx.split(model)
  if sampler == "llada":
    config = SamplerConfig(
        gen_length=args.gen_length, steps=args.steps, block_length=args.block_length,
        temperature=args.temperature, remasking=args.remasking, cfg_scale=args.cfg_scale,
        logits_eos_inf=args.logits_eos_inf, confidence_eos_eot_inf=args.confidence_eos_eot_inf,
        eos_eot_aliased=args.eos_eot_aliased, reference_quota=args.reference_quota,
        threshold=args.threshold, factor=args.factor, max_tokens_per_step=args.max_tokens_per_step,
        cache=args.cache, stop_at_eos=args.stop_at_eos)
    fn = generate
  else:
    config = DreamSamplerConfig(gen_length=args.gen_length, steps=args.steps, eps=args.eps,
                                temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                alg=args.alg, alg_temp=args.alg_temp)
    fn = dream_generate
  start = time.perf_counter()
  out = fn(graphdef, params, jnp.asarray(ids), jnp.asarray(mask), jax.random.key(args.seed), config)
  sequences = np.asarray(out.sequences)
  elapsed = time.perf_counter() - start
  for row in range(len(prompts)):
    if args.output_ids:
      real = sequences[row, ids.shape[1] - int(mask[row].sum()):]
      print(json.dumps([int(t) for t in real]))
    else:
      print(tokenizer.decode(sequences[row, ids.shape[1]:].tolist(), skip_special_tokens=True))
  print(f"# {len(prompts)} rows, {int(out.num_forward_passes)} forward passes, {elapsed:.2f} s "
        f"(incl. compile)", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
