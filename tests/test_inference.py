"""`dmpo_jax.inference`: the one left-pad and sampler-config builder, and the one evaluation.

The same saved checkpoint is scored by `launch/eval.py` (in-process, ``--batch_size=3``) and by
`inference.evaluation.evaluate` called as the trainer calls it (its mesh, model loader, sampling
layout and ``EvalSpec.from_config``, ``eval.batch_size=4``): identical completions, scores and
accuracy, and that accuracy equals a hand count. At fp32 and bf16, on 1 device and (slow test)
on 4 fake CPU devices in a subprocess, where `launch/generate.py` must also print what it prints
on 1 device. This file run as a script is that subprocess.
"""

import contextlib
import dataclasses
import io
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "launch"))

PROMPT_LENGTH = 6  # "1234=" is 5 byte tokens; longer prompts keep their last 6
DIGITS = ("301", "4172", "95028", "1234567", "8642", "777", "605143", "2468013", "5310", "92")
GEN = 5
DTYPES = ("float32", "bfloat16")
GENERATE_ARGS = ("--tokenizer=byte", "--no_chat", "--prompt=12=", "--prompt=98765=",
                 "--prompt=301=", "--gen_length=8", "--block_length=4", "--steps=8", "--output_ids")


# -- unit checks ---------------------------------------------------------------------------------

def test_left_pad_keeps_the_last_tokens_and_counts_cut_prompts():
  from dmpo_jax.inference import prompts
  ids, mask = prompts.left_pad([[1, 2], [3, 4, 5, 6, 7], [8]], pad_id=0, length=4)
  np.testing.assert_array_equal(ids, [[0, 0, 1, 2], [4, 5, 6, 7], [0, 0, 0, 8]])
  np.testing.assert_array_equal(mask, [[0, 0, 1, 1], [1, 1, 1, 1], [0, 0, 0, 1]])
  assert ids.dtype == np.int32 and mask.dtype == bool
  ids, _ = prompts.left_pad([[1] * 33, [2]], pad_id=9)  # default: the longest rounded up to 32
  assert ids.shape == (2, 64) and prompts.prompt_bucket([[1] * 33], 8) == 40
  from dmpo_jax.models.tokenizer import load_tokenizer
  from dmpo_jax.tasks import digit_sort
  examples = [{"digits": d, "answer": "".join(sorted(d))} for d in DIGITS]
  ids, mask, cut = prompts.encode_prompts(load_tokenizer("byte"), digit_sort.DigitSortTask(),
                                          examples, prompt_length=PROMPT_LENGTH, evaluation=True)
  assert cut == 3  # the 6- and 7-digit prompts (7 and 8 tokens)
  assert bytes(ids[3][mask[3]].tolist()).decode() == "34567="
  assert bytes(ids[0][mask[0]].tolist()).decode() == "301=" and mask[0].sum() == 4


def test_sampler_configs():
  from dmpo_jax.inference import sampler_configs
  rollout = sampler_configs.sampler_config({"gen_length": 8, "block_length": 4, "steps": 8,
                                            "threshold": 0.0, "max_tokens_per_step": -1})
  assert rollout.threshold is None and rollout.max_tokens_per_step is None
  greedy = sampler_configs.greedy_eval(64, 32, "half")
  assert (greedy.steps, greedy.temperature, greedy.remasking, greedy.batch_invariant) == (
      32, 0.0, "low_confidence", True)
  with pytest.raises(ValueError, match=r"unknown sampler key\(s\) \['top_p'\]"):
    sampler_configs.build(type(greedy), {"top_p": 0.9})
  dream = sampler_configs.from_flags({"gen_length": 16, "steps": 8, "alg": "origin",
                                      "cache": "dual", "prompt": ["x"]}, "dream")
  assert (dream.gen_length, dream.steps, dream.alg) == (16, 8, "origin")
  llada = sampler_configs.from_flags({"gen_length": 16, "steps": 8, "block_length": 8,
                                      "cache": "dual", "alg": "origin"}, "llada")
  assert (llada.cache, llada.block_length) == ("dual", 8)


def test_one_loader_for_checkpoints_presets_and_bad_paths(tmp_path):
  """A project checkpoint loads bit-identically to the saved model, ``param_dtype`` casts it,
  compute overrides keep the parameters, a preset is placed on the mesh, and a path that is no
  model is one `UserError` line."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from dmpo_jax import checkpointing, cli, sharding
  from dmpo_jax.inference import model_loading
  from dmpo_jax.models.config import get_preset
  from dmpo_jax.models.transformer import create_model
  config = get_preset("tiny")
  saved = create_model(config, seed=0)
  checkpointing.save_model_checkpoint(tmp_path / "ckpt", saved, config)
  want = jax.tree.leaves(nnx.state(saved))
  loaded = model_loading.load_model(tmp_path / "ckpt")
  assert loaded.source == model_loading.CHECKPOINT and loaded.hf_info is None
  for a, b in zip(jax.tree.leaves(nnx.state(loaded.model)), want):
    np.testing.assert_array_equal(a, b)
  cast = model_loading.load_model(tmp_path / "ckpt", param_dtype="bfloat16", dtype="bfloat16",
                                  remat=True).model
  assert (cast.config.param_dtype, cast.config.dtype, cast.config.remat) == (
      "bfloat16", "bfloat16", True)
  for a, b in zip(jax.tree.leaves(nnx.state(cast)), want):
    np.testing.assert_array_equal(a, jnp.asarray(b).astype(jnp.bfloat16))
  mesh = sharding.create_mesh()
  preset = model_loading.load_model(preset="tiny", seed=0, mesh=mesh).model
  for a, b in zip(jax.tree.leaves(nnx.state(preset)), want):
    np.testing.assert_array_equal(a, b)
    assert a.sharding.mesh.shape == mesh.shape
  (tmp_path / "empty").mkdir()
  for path, problem in ((tmp_path / "missing", "does not exist"),
                        (tmp_path / "empty", "is not a model folder")):
    with pytest.raises(cli.UserError, match=f"^model checkpoint {path} {problem}"):
      model_loading.load_model(path)


# -- the same checkpoint, both ways ----------------------------------------------------------------

def save_checkpoints(folder: pathlib.Path) -> None:
  """A tiny random model per dtype (seed 0) and the held-out file."""
  from dmpo_jax import checkpointing
  from dmpo_jax.models.config import get_preset
  from dmpo_jax.models.transformer import create_model
  for dtype in DTYPES:
    config = get_preset("tiny", dtype=dtype, param_dtype=dtype)
    checkpointing.save_model_checkpoint(folder / dtype, create_model(config, seed=0), config)
  (folder / "held_out.jsonl").write_text("".join(json.dumps({"digits": d}) + "\n" for d in DIGITS))


def trainer_config(folder: pathlib.Path, dtype: str):
  from configs import demo
  config = demo.get_config()
  config.model.checkpoint = str(folder / dtype)
  config.task.prompt_length = PROMPT_LENGTH
  config.task.eval_source = str(folder / "held_out.jsonl")
  config.eval.update(gen_length=GEN, block_length=GEN, steps=GEN, batch_size=4)
  return config


def trainer_evaluation(folder: pathlib.Path, dtype: str):
  """`evaluation.evaluate` with what `Trainer` holds: its mesh (``config.mesh``), the model
  placed by `load_model_and_tokenizer`, the parameters in the training layout, the sampling
  layout of `layout_for_training` and ``EvalSpec.from_config``."""
  import jax
  from flax import nnx
  from dmpo_jax import sampling_layout, sharding
  from dmpo_jax.inference import evaluation, model_loading
  from dmpo_jax.tasks import get_task
  config = trainer_config(folder, dtype)
  shape = {a: int(config.mesh[a]) for a in sharding.MESH_AXES}
  mesh = sharding.create_mesh(sharding.resolve_mesh_shape(shape, jax.device_count()))
  model, tokenizer = model_loading.load_model_and_tokenizer(config, mesh)
  assert model.config.param_dtype == dtype
  graphdef, params = nnx.split(model)
  params = jax.device_put(params, sharding.state_shardings(params, mesh))
  layout = sampling_layout.layout_for_training(mesh, model.config, 0, params, (params,))
  task = get_task(config.task.name)
  examples = task.load_eval(config.task.eval_source)
  result = evaluation.evaluate(graphdef, params, tokenizer, task, examples,
                               evaluation.EvalSpec.from_config(config), layout=layout)
  return result, layout


def launch_eval(folder: pathlib.Path, dtype: str, out: pathlib.Path):
  import eval as eval_script  # pylint: disable=import-outside-toplevel
  code = eval_script.main([f"--checkpoint={folder / dtype}", "--task=digit_sort",
                           "--tokenizer=byte", f"--gen_lengths={GEN}", f"--block_length={GEN}",
                           "--steps=full", "--batch_size=3", f"--prompt_length={PROMPT_LENGTH}",
                           f"--eval_source={folder / 'held_out.jsonl'}", "--subset_size=0",
                           f"--output_dir={out}", "--no_progress"])
  assert code == 0
  rows = [json.loads(line) for line in (out / f"digit_sort_L{GEN}.jsonl").read_text().splitlines()]
  return rows, json.loads((out / f"digit_sort_L{GEN}_summary.json").read_text())


def launch_generate(folder: pathlib.Path, dtype: str) -> list[str]:
  import generate as generate_script  # pylint: disable=import-outside-toplevel
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    code = generate_script.main([f"--checkpoint={folder / dtype}", *GENERATE_ARGS])
  assert code == 0
  return printed.getvalue().splitlines()


def both_ways(folder: pathlib.Path, dtype: str, out: pathlib.Path) -> dict:
  """The trainer's and launch/eval.py's completions must agree row by row."""
  result, layout = trainer_evaluation(folder, dtype)
  rows, summary = launch_eval(folder, dtype, out)
  completions = [row["completion"] for row in rows]
  assert completions == result.completions
  assert [row["score"] for row in rows] == [row["score"] for row in result.rows]
  assert summary["accuracy"] == result.summary["accuracy"]
  assert summary["prompt_length"] == result.summary["prompt_length"] == PROMPT_LENGTH
  # Hand count: a completion is right when it is the ascending digits.
  hand = 100.0 * np.mean([c.strip() == "".join(sorted(d)) for c, d in zip(completions, DIGITS)])
  assert summary["accuracy"] == pytest.approx(hand)
  assert len(set(completions)) > 1  # the rows really differ: a real comparison
  return {"completions": completions, "accuracy": summary["accuracy"],
          "devices": int(layout.mesh.devices.size)}


@pytest.mark.parametrize("dtype", DTYPES)
def test_trainer_and_launch_eval_give_the_same_rows(dtype, tmp_path):
  save_checkpoints(tmp_path)
  both_ways(tmp_path, dtype, tmp_path / "out")


def test_generate_rows_pads_places_and_cuts_back():
  """Rows are padded to a multiple of the layout's batch devices (hand values), placed split over
  them, sampled and cut back to the real rows."""
  import types
  import jax
  from flax import nnx
  from dmpo_jax import sampling_layout
  from dmpo_jax.inference import evaluation, sampler_configs
  from dmpo_jax.models.config import get_preset
  from dmpo_jax.models.transformer import create_model
  four = types.SimpleNamespace(batch_divisor=4)
  assert [evaluation.rows_per_call(n, four) for n in (1, 3, 4, 5, 8, 9)] == [4, 4, 4, 8, 8, 12]
  model = create_model(get_preset("tiny"), seed=0)
  graphdef, params = nnx.split(model)
  layout = sampling_layout.inference_layout(model.config, params)
  ids = np.array([[0, 65, 61], [66, 67, 61], [0, 0, 61]], np.int32)
  placed = evaluation.place_rows(ids, layout)
  np.testing.assert_array_equal(np.asarray(placed), ids)
  assert placed.sharding == layout.batch_sharding(2)
  config = sampler_configs.sampler_config({"gen_length": 4, "block_length": 4, "steps": 4})
  sequences, passes = evaluation.generate_rows(layout, graphdef, params, ids, ids > 0,
                                               jax.random.key(0), config)
  assert sequences.shape == (3, 7) and passes == 4
  np.testing.assert_array_equal(sequences[:, :3], ids)


@pytest.mark.slow
def test_the_trainers_evaluate_equals_one_plain_sampler_call(tmp_path, monkeypatch):
  """`Trainer.evaluate` (batches of ``eval.batch_size``, the last one padded, rows split over
  the sampling layout) scores the completions of one plain unsharded `sampler.generate` call
  on the whole held-out set."""
  import jax
  import jax.numpy as jnp
  from dmpo_jax.diffusion import sampler as sampler_lib
  from dmpo_jax.inference import prompts
  from dmpo_jax.rl import loop
  save_checkpoints(tmp_path)
  config = trainer_config(tmp_path, "float32")
  config.task.max_truncated_fraction = 1.0  # 3 of the 10 held-out prompts are cut
  trainer = loop.Trainer(config, tmp_path / "run")
  held_out = trainer.data[2]
  trainer.eval_spec = dataclasses.replace(trainer.eval_spec, batch_size=3)
  assert len(held_out) % trainer.eval_spec.batch_size  # the last batch is padded
  scored = []
  score_many = trainer.task.score_many
  monkeypatch.setattr(trainer.task, "score_many",
                      lambda completions, *a, **k: scored.append(completions) or score_many(
                          completions, *a, **k))
  accuracy = trainer.evaluate(trainer.state.params, held_out)["eval/accuracy"]
  ids, mask, _ = prompts.encode_prompts(trainer.tokenizer, trainer.task, held_out,
                                        prompt_length=config.task.prompt_length, evaluation=True)
  params = jax.device_get(trainer.state.params)
  out = sampler_lib.generate(trainer.graphdef, params, jnp.asarray(ids), jnp.asarray(mask),
                             jax.random.key(0), trainer.eval_config)
  plain = prompts.decode_completions(trainer.tokenizer, np.asarray(out.sequences),
                                     config.task.prompt_length)
  assert scored[0] == plain and len(set(plain)) > 1
  expected = trainer.task.summarize(score_many(plain, held_out))["accuracy"]
  assert accuracy == expected


def test_create_mesh_keeps_auto_axes_and_fills_the_rest():
  """`jax.make_mesh` makes Explicit axes unless told; the code needs Auto ones."""
  import jax
  from jax.sharding import AxisType
  from dmpo_jax import sampling_layout, sharding
  mesh = sharding.create_mesh({"fsdp": -1})
  assert mesh.axis_types == (AxisType.Auto,) * 3
  assert dict(mesh.shape) == {"data": 1, "fsdp": jax.device_count(), "tensor": 1}
  assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in jax.devices())
  assert sampling_layout.sampling_mesh(mesh, 1).axis_types == (AxisType.Auto,) * 3
  with pytest.raises(ValueError, match=r"needs 2 devices, 1 available"):
    sharding.create_mesh((2, 1, 1), devices=jax.devices()[:1])


# -- 4 fake devices ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_four_devices_equal_one_device(tmp_path):
  """Both evaluation paths and launch/generate.py on 4 fake CPU devices (a subprocess) give what
  they give on 1 device, at fp32 and bf16."""
  save_checkpoints(tmp_path)
  want = {dtype: {**both_ways(tmp_path, dtype, tmp_path / f"out1_{dtype}"),
                  "generate": launch_generate(tmp_path, dtype)} for dtype in DTYPES}
  assert all(w["devices"] == 1 for w in want.values())
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
  env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
  result = subprocess.run([sys.executable, __file__, str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=1200, cwd=tmp_path)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
  got = json.loads((tmp_path / "four_devices.json").read_text())
  for dtype in DTYPES:
    assert got[dtype]["devices"] == 4
    assert got[dtype]["completions"] == want[dtype]["completions"], dtype
    assert got[dtype]["accuracy"] == want[dtype]["accuracy"]
    assert got[dtype]["generate"] == want[dtype]["generate"], dtype
    assert got[dtype]["generate_shards"] == [[1, 3]] * 4  # 3 prompts padded to 4: one per device


def _four_device_checks(folder: pathlib.Path) -> None:
  import jax
  from flax import nnx
  from dmpo_jax import sampling_layout
  from dmpo_jax.inference import evaluation, model_loading
  assert jax.device_count() == 4, jax.devices()
  results = {}
  for dtype in DTYPES:
    results[dtype] = both_ways(folder, dtype, folder / f"out4_{dtype}")
    results[dtype]["generate"] = launch_generate(folder, dtype)
    # What launch/generate.py places: its 3 prompts' rows, padded to 4, one on each device.
    model = model_loading.load_model(folder / dtype).model
    layout = sampling_layout.inference_layout(model.config, nnx.state(model))
    rows = evaluation.rows_per_call(3, layout)
    placed = evaluation.place_rows(np.zeros((rows, 3), np.int32), layout)
    results[dtype]["generate_shards"] = [list(s.data.shape) for s in placed.addressable_shards]
  (folder / "four_devices.json").write_text(json.dumps(results))


if __name__ == "__main__":
  _four_device_checks(pathlib.Path(sys.argv[1]))
