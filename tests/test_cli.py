"""The launch scripts as a user meets them: --help, one-line errors with exit code 2 (no
traceback, no folder left behind), relative and absolute paths, plain progress lines without a
terminal, and a finished run that says so."""

import concurrent.futures
import dataclasses
import importlib
import json
import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from configs import base as base_config
from dmpo_jax import checkpointing, metrics
from dmpo_jax.rl import loop, registry

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPTS = ("train", "generate", "eval", "score", "convert", "plot", "prepare_data")
DEMO = str(REPO / "configs" / "demo.py")


def _env(**extra):
  env = dict(os.environ, **extra)
  env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
  return env


def run_scripts(commands, cwd, parallel=3, timeout=600, **env):
  """Runs [(script, [args])] from ``cwd``, at most ``parallel`` at once (each one mostly waits on
  its own imports), with ``env`` added to the environment; returns the CompletedProcesses in
  order."""
  def run(command):
    script, args = command
    return subprocess.run([sys.executable, str(REPO / "launch" / f"{script}.py")] + list(args),
                          cwd=cwd, env=_env(**env), capture_output=True, text=True, timeout=timeout)
  with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
    return list(pool.map(run, commands))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """A folder with a tiny model checkpoint (``ckpt``) and malformed input files."""
  from dmpo_jax.models.config import get_preset  # pylint: disable=import-outside-toplevel
  from dmpo_jax.models.transformer import create_model  # pylint: disable=import-outside-toplevel
  root = tmp_path_factory.mktemp("cli")
  config = get_preset("tiny")
  checkpointing.save_model_checkpoint(root / "ckpt", create_model(config, seed=0), config)
  # Every row unusable: loaders skip single bad rows with a warning, an all-bad file is an error.
  (root / "bad.jsonl").write_text('not json\n{"question": "1+1?"\n')
  (root / "bad.json").write_text('{"rows": 3}')
  (root / "empty.jsonl").write_text("")
  (root / "README.md").write_text("# a file where a folder is expected\n")
  return root


# ------------------------------------------------------------------------------------------------
# --help and one-line errors
# ------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_help_lists_every_flag_and_exits_0(tmp_path):
  results = run_scripts([(s, ["--help"]) for s in SCRIPTS], cwd=tmp_path)
  for script, result in zip(SCRIPTS, results):
    assert result.returncode == 0, (script, result.stderr[-2000:])
    flag_values = importlib.import_module(f"launch.{script}").FLAGS
    names = [name for name in flag_values if flag_values[name].name == name] + ["debug"]
    for name in names:
      assert f"--{name}:" in result.stdout, (script, name)
  pod = subprocess.run(["bash", str(REPO / "launch" / "tpu_pod.sh")], capture_output=True, text=True,
                       timeout=60)
  assert pod.returncode == 2 and "launch/tpu_pod.sh run     NAME ZONE CONFIG WORKDIR" in pod.stderr
  wrong = subprocess.run(["bash", str(REPO / "launch" / "tpu_pod.sh"), "copy", "my-pod"],
                         capture_output=True, text=True, timeout=60)
  assert wrong.returncode == 2 and "'copy' takes 2 argument(s), got 1" in wrong.stderr


def _train(workdir, *args, config=DEMO):
  return ("train", [f"--config={config}", f"--workdir={workdir}", *args])


# (command, text the one-line error must hold, folder that must not exist afterwards)
ERRORS = [
    # train: unknown key, missing config file, large preset without weights, bad numbers, ...
    (_train("w1", "--config.dmpo.alpah=0.1"), "did you mean 'dmpo.alpha'", "w1"),
    (_train("w3", config="configs/nope.py"), "config file configs/nope.py not found", "w3"),
    (_train("w4", config=str(REPO / "configs" / "bgpo_math.py")), "--config.model.init=random", "w4"),
    (_train("w5", "--config.optimizer.learning_rate=nan", "--config.eval.batch_size=0",
            "--config.eval.num_examples=0", "--config.sft.num_steps=-5",
            "--config.eval.every_steps=-1"),
     "optimizer.learning_rate=nan must be finite; sft.num_steps=-5 must be >= 0; "
     "eval.every_steps=-1 must be >= 0; eval.num_examples=0 must be >= 1; eval.batch_size=0 "
     "must be >= 1", "w5"),
    (_train("w6", "--config.group_size=1"), "group_size=1 must be >= 2", "w6"),
    (_train("w7", "--config.model.checkpoint=missing"), "model.checkpoint=missing does not exist", "w7"),
    (_train("w8", "--config.num_steps=abc"), "--config.num_steps=abc", "w8"),
    (_train("w9", "--config.task.name=gsm8k", "--config.task.train_source=bad.jsonl"),
     "bad.jsonl: 2 of 2 row(s) unusable", "w9"),
    # ... a value outside a fixed set, a file where a folder belongs, lengths beyond the model's
    # context, an empty or file workdir, prompts the bucket cuts (found after the model load,
    # before any compile: the new folder is removed again).
    (_train("w10", "--config.optimizer.schedule=cosineish"),
     "optimizer.schedule='cosineish' is not one of ['constant', 'cosine', 'linear'] (did you mean "
     "'cosine'?)", "w10"),
    (_train("w11", "--config.task.reward_style=lenient"),
     "task.reward_style='lenient' is not one of ['d1', 'dmpo', 'spg', 'fixed']", "w11"),
    (_train(""), "--workdir is empty", None),
    (_train("w12", "--config.model.checkpoint=README.md"),
     "model.checkpoint=README.md is a file, not a model folder (expected an HF folder with "
     "config.json or a dmpo_jax model checkpoint with model_config.json)", "w12"),
    (_train("w13", "--config.eval.gen_length=510", "--config.eval.block_length=510",
            "--config.eval.steps=510"),
     "task.prompt_length + eval.gen_length = 5 + 510 = 515 exceeds the model's max_seq_len=512 "
     "(preset tiny): lower eval.gen_length to at most 507", "w13"),
    (_train("README.md"), "--workdir README.md is a file, not a folder", None),
    (_train("w14", "--config.tokenizer="), "tokenizer='' means the checkpoint's tokenizer", "w14"),
    (_train("w15", "--config.task.prompt_length=4"),
     "task.prompt_length=4 truncates 4096 of 4096 training prompts (100.0 %; the longest has 5 "
     "tokens); task.prompt_length=4 truncates 256 of 256 held-out prompts (100.0 %; the longest "
     "has 5 tokens), more than task.max_truncated_fraction=0.05", "w15"),
    (_train("w16", "--config.task.max_truncated_fraction=2"),
     "task.max_truncated_fraction=2.0 must be in [0, 1]", "w16"),
    (_train("w17", "--config.model.attention_impl=flash"),
     "model.attention_impl: must be one of ('auto', 'xla', 'cudnn', 'splash'), got 'flash'", "w17"),
    (_train("w18", "--config.model.attention_impl=cudnn"),
     "model.attention_impl: attention_impl='cudnn' needs an NVIDIA GPU; this process runs on cpu",
     "w18"),
    # generate
    (("generate", ["--checkpoint=missing", "--prompt=x"]), "model checkpoint missing does not exist",
     None),
    (("generate", ["--checkpoint=ckpt", "--prompt=x", "--gen_length=0"]), "--gen_length=0", None),
    (("generate", ["--checkpoint=ckpt", "--prompt_ids=1,a", "--output_ids"]),
     "comma-separated integers", None),
    (("generate", ["--checkpoint=README.md", "--prompt=x"]),
     "--checkpoint: model checkpoint README.md is a file, not a model folder", None),
    # eval
    (("eval", ["--checkpoint=missing", "--task=gsm8k", "--output_dir=e1"]), "does not exist", "e1"),
    (("eval", ["--checkpoint=ckpt", "--task=gsm8k", "--eval_source=bad.jsonl", "--output_dir=e2"]),
     "bad.jsonl: 2 of 2 row(s) unusable", "e2"),
    (("eval", ["--checkpoint=ckpt", "--task=gsm8k", "--steps=zero", "--output_dir=e3"]),
     "--steps=zero", "e3"),
    (("eval", ["--checkpoint=README.md", "--task=gsm8k", "--output_dir=e4"]),
     "model checkpoint README.md is a file, not a model folder", "e4"),
    (("eval", ["--checkpoint=ckpt", "--task=gsm8k", "--output_dir=README.md"]),
     "--output_dir README.md is a file, not a folder", None),
    # score
    (("score", ["--task=gsm8k", "--input=missing.jsonl"]), "missing.jsonl does not exist", None),
    (("score", ["--task=gsm8k", "--input=bad.json"]), "expected a JSON array of objects", None),
    (("score", ["--task=gsm8k", "--input=bad.json", "--reward_style=nope"]), "--reward_style=nope",
     None),
    (("score", ["--task=gsm8k", "--input=empty.jsonl"]), "empty.jsonl has no rows: nothing to score",
     None),
    (("score", ["--task=gsm8k", "--input=bad.jsonl"]),
     "none of its 2 row(s) could be scored; row 0 (line 1): not valid JSON", None),
    (("score", ["--task=gsm8k", "--input=."]), ". is not a file", None),
    # convert
    (("convert", ["--direction=orbax_to_hf", "--input=missing", "--output=c1"]),
     "source folder missing does not exist", "c1"),
    (("convert", ["--direction=orbax_to_hf", "--input=bad.json", "--output=c2"]), "bad.json", "c2"),
    (("convert", ["--direction=sideways", "--input=ckpt", "--output=c3"]), "--direction=sideways",
     "c3"),
    (("convert", ["--direction=orbax_to_hf", "--input=ckpt", "--output=README.md"]),
     "--output README.md is a file, not a folder", None),
    (("convert", ["--direction=orbax_to_hf", "--input=ckpt", "--output=ckpt"]),
     "--output ckpt already exists; pass --overwrite to replace it", None),
    # plot
    (("plot", ["--workdir=."]), "metrics.jsonl not found", None),
    (("plot", ["--workdir=.", "--outptu=x.png"]), "unknown flag --outptu (did you mean 'output'?)",
     None),
    (("plot", ["--workdir=README.md"]), "README.md is a file, not the folder of a training run", None),
]


@pytest.mark.slow  # about 40 commands, each a fresh Python process
def test_user_errors_are_one_line_with_exit_code_2(files):
  results = run_scripts([command for command, _, _ in ERRORS], cwd=files)
  for (command, expected, folder), result in zip(ERRORS, results):
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, (command, result.stderr[-3000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), (command, result.stderr[-3000:])
    assert expected in lines[0], (command, lines[0])
    if folder:
      assert not (files / folder).exists(), (command, folder)


@pytest.mark.slow
def test_debug_flag_shows_the_traceback(files):
  result, = run_scripts([("score", ["--task=gsm8k", "--input=bad.json", "--debug"])], cwd=files)
  assert result.returncode != 0
  assert "Traceback" in result.stderr and "expected a JSON array of objects" in result.stderr


# ------------------------------------------------------------------------------------------------
# Config validation (in-process: the same function train.py calls before any work)
# ------------------------------------------------------------------------------------------------

def _numeric_leaves(config, prefix=""):
  for key, value in config.items():
    if hasattr(value, "to_dict"):
      if key not in registry.objective_names():  # objective blocks: their own config classes
        yield from _numeric_leaves(value, f"{prefix}{key}.")
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
      yield f"{prefix}{key}"


def _set(config, key, value):
  *path, last = key.split(".")
  for part in path:
    config = config[part]
  with config.ignore_type():
    config[last] = value


def test_every_numeric_field_is_validated():
  assert sorted(_numeric_leaves(base_config.get_config())) == sorted(loop.NUMERIC_FIELDS)
  for path in (REPO / "configs").glob("*.py"):
    module = importlib.import_module(f"configs.{path.stem}")
    if hasattr(module, "get_config"):
      assert set(_numeric_leaves(module.get_config())) <= set(loop.NUMERIC_FIELDS), path.name
  demo = importlib.import_module("configs.demo")
  for key, (kind, low, high) in loop.NUMERIC_FIELDS.items():
    bad = [math.nan, math.inf]
    if low > -math.inf:
      bad.append(low - 1)
    if high < math.inf:
      bad.append(high + 1)
    if kind is int:
      bad.append(1.5)
    for value in bad:
      config = demo.get_config()
      _set(config, key, value)
      with pytest.raises(loop.ConfigError, match=f"{key}={value}") as err:
        loop.validate_config(config, num_devices=1)
      assert "\n" not in str(err.value)


def test_objective_blocks_and_group_size_are_validated():
  demo = importlib.import_module("configs.demo")
  for name in registry.objective_names():
    objective = registry.get_objective(name)
    assert objective.uses_group_statistics  # every registered loss normalises over the group
    config = demo.get_config()
    config.objective = name
    config.group_size = 1
    with pytest.raises(loop.ConfigError, match="group_size=1 must be >= 2"):
      loop.validate_config(config, num_devices=1)
    numeric = [k for k, v in objective.default_config().items()
               if isinstance(v, float) and not isinstance(v, bool)]
    if numeric:
      config = demo.get_config()
      config.objective = name
      config[name][numeric[0]] = math.nan
      with pytest.raises(loop.ConfigError, match=f"{numeric[0]} must be finite"):
        loop.validate_config(config, num_devices=1)


def test_large_presets_need_weights_unless_random_init_is_asked_for(tmp_path):
  bgpo_math = importlib.import_module("configs.bgpo_math").get_config()
  with pytest.raises(loop.ConfigError, match="model.checkpoint is not set.*model.init=random"):
    loop.validate_config(bgpo_math, num_devices=8)
  bgpo_math.model.init = "random"
  with pytest.raises(loop.ConfigError, match="tokenizer='' means the checkpoint's tokenizer, but "
                     "model.checkpoint is not set"):
    loop.validate_config(bgpo_math, num_devices=8)  # random weights still need a tokenizer
  bgpo_math.tokenizer = "byte"
  loop.validate_config(bgpo_math, num_devices=8)
  bgpo_math.model.checkpoint = str(tmp_path)
  with pytest.raises(loop.ConfigError, match="contradicts"):
    loop.validate_config(bgpo_math, num_devices=8)
  bgpo_math.model.init = "auto"
  with pytest.raises(loop.ConfigError, match="is not a model folder"):
    loop.validate_config(bgpo_math, num_devices=8)  # an empty folder holds no model
  from dmpo_jax.models.config import get_preset  # pylint: disable=import-outside-toplevel
  (tmp_path / "model_config.json").write_text(json.dumps(dataclasses.asdict(get_preset("llada_8b"))))
  loop.validate_config(bgpo_math, num_devices=8)
  bgpo_math.model.init = "zeros"
  with pytest.raises(loop.ConfigError, match="model.init='zeros' must be one of"):
    loop.validate_config(bgpo_math, num_devices=8)
  loop.validate_config(importlib.import_module("configs.demo").get_config(), num_devices=1)  # tiny


# ------------------------------------------------------------------------------------------------
# Progress lines without a terminal
# ------------------------------------------------------------------------------------------------

def test_plain_progress_lines_every_n_steps_or_seconds(caplog):
  now = [0.0]
  bar = metrics.ProgressBar(100, initial=20, desc="bgpo RL", log_every_steps=10, log_every_seconds=60,
                            clock=lambda: now[0])
  assert bar.plain and bar.disabled  # pytest captures stderr: not a terminal
  phases = {"rollout": 1.0, "reward": 0.5, "prepare": 0.5, "update": 2.0, "eval": 4.0}
  with caplog.at_level("INFO", logger="dmpo_jax.progress"):
    for step in range(21, 101):
      now[0] += 4.0 if step < 60 else 70.0  # slow steps from 60 on: the time rule fires
      bar.update(step, {"reward": 0.25, "eval_acc": 50.0}, phases=phases)
  lines = [r.getMessage() for r in caplog.records if r.name == "dmpo_jax.progress"]
  steps = [int(line.split("step ")[1].split("/")[0]) for line in lines]
  assert steps == [30, 40, 50, 60] + list(range(61, 101))
  # step 30: 10 steps in 40 s since the start -> 4 s/step, 70 steps left -> ETA 280 s.
  assert lines[0] == ("bgpo RL step 30/100 (30%) | reward 0.25 | eval_acc 50 | rollout 1.00s (25%) "
                      "reward 0.50s prepare 0.50s update 2.00s eval 4.00s | 4 s/step | ETA 0:04:40")
  assert lines[-1].endswith("ETA 0:00:00")


# ------------------------------------------------------------------------------------------------
# Relative and absolute paths through every script; resume, finish and progress of a real run
# ------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_relative_and_absolute_model_paths_give_the_same_results(files, tmp_path):
  sample = ["--prompt_ids=5,6,7", "--output_ids", "--gen_length=4", "--steps=4", "--block_length=4"]
  evaluate = ["--task=digit_sort", "--tokenizer=byte", "--gen_lengths=5", "--block_length=5",
              "--limit=4", "--batch_size=4", "--no_progress"]
  relative = os.path.relpath(files / "ckpt", tmp_path)
  results = run_scripts([
      ("generate", [f"--checkpoint={relative}"] + sample),
      ("generate", [f"--checkpoint={files / 'ckpt'}"] + sample),
      ("eval", [f"--checkpoint={relative}", "--output_dir=ev_rel"] + evaluate),
      ("eval", [f"--checkpoint={files / 'ckpt'}", f"--output_dir={tmp_path / 'ev_abs'}"] + evaluate),
      ("convert", ["--direction=orbax_to_hf", f"--input={relative}", "--output=hf"]),
  ], cwd=tmp_path)
  for result in results:
    assert result.returncode == 0, result.stderr[-3000:]
  assert results[0].stdout == results[1].stdout and len(results[0].stdout.splitlines()) == 1
  rows = [(tmp_path / d / "digit_sort_L5.jsonl").read_text() for d in ("ev_rel", "ev_abs")]
  assert rows[0] == rows[1] and len(rows[0].splitlines()) == 4
  back, = run_scripts([("convert", ["--direction=hf_to_orbax", "--input=hf", "--output=back"])],
                      cwd=tmp_path)
  assert back.returncode == 0, back.stderr[-3000:]
  assert "INFO absl" not in back.stderr  # orbax's INFO lines are off by default
  original = checkpointing.load_model_checkpoint(files / "ckpt")
  restored = checkpointing.load_model_checkpoint(tmp_path / "back")
  import jax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  jax.tree.map(np.testing.assert_array_equal, nnx.state(original), nnx.state(restored))


@pytest.mark.slow
def test_relative_workdir_resume_progress_lines_and_finished_run(tmp_path):
  """DMPO (a reference model saved in the workdir) trains 1 step in a relative workdir, resumes
  to 2, then a third start finds the run finished. Output goes to pipes: plain progress lines."""
  flags = ["--config.objective=dmpo", "--config.sft.num_steps=0", "--config.prompts_per_step=2",
           "--config.group_size=2", "--config.eval.every_steps=0", "--config.eval.num_examples=2",
           "--config.eval.batch_size=2", "--config.checkpoint.every_steps=1",
           "--config.log_every_steps=1", "--plot=false"]
  # The runs one after the other share jax's compilation cache: the resume compiles nothing new.
  cache = {"JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
  first, = run_scripts([_train("runs/r", *flags, "--config.num_steps=1")], cwd=tmp_path, **cache)
  assert first.returncode == 0, first.stderr[-3000:]
  second, = run_scripts([_train("runs/r", *flags, "--config.num_steps=2")], cwd=tmp_path, **cache)
  assert second.returncode == 0, second.stderr[-3000:]
  assert "resumed from step 1" in second.stderr
  progress = [line for line in second.stderr.splitlines() if "dmpo_jax.progress" in line]
  assert len(progress) == 1 and "dmpo RL step 2/2 (100%) | reward" in progress[0]
  for phase in ("rollout", "prepare", "update"):
    assert f" {phase} " in progress[0]
  assert "ETA 0:00:00" in progress[0] and "compile/temp_size_in_bytes" not in second.stderr
  assert "train step compiled ahead of time: temp memory" in second.stderr
  steps = [json.loads(line)["step"] for line in (tmp_path / "runs/r/metrics.jsonl").read_text().splitlines()]
  assert steps == [0, 1, 2]
  third, = run_scripts([_train("runs/r", *flags, "--config.num_steps=2")], cwd=tmp_path)
  assert third.returncode == 0, third.stderr[-3000:]
  assert "is finished (step 2 of num_steps=2)" in third.stderr
  assert json.loads(third.stdout)["finished"] == 2


# ------------------------------------------------------------------------------------------------
# Ctrl-C and file-system faults in the shared entry point
# ------------------------------------------------------------------------------------------------

def _run_main_raising(error, tmp_path):
  """A script whose main raises ``error`` (Python source), run as a user runs a launch script."""
  code = ("import errno, os, sys\n"
          "from absl import flags\n"
          "from dmpo_jax import cli\n"
          "def main():\n"
          f"  raise {error}\n"
          "sys.exit(cli.run_main(main, flags.FlagValues()))\n")
  return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_env(), capture_output=True,
                        text=True, timeout=120)


def test_run_main_turns_ctrl_c_and_disk_faults_into_one_line(tmp_path):
  interrupted = _run_main_raising("KeyboardInterrupt", tmp_path)
  assert interrupted.returncode == 130
  assert interrupted.stderr.strip().splitlines() == ["error: -c interrupted (Ctrl-C)"]
  full = _run_main_raising("OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), 'out/x.bin')", tmp_path)
  assert full.returncode == 1
  assert full.stderr.strip().splitlines() == [
      "error: cannot access out/x.bin: No space left on device"]
  bug = _run_main_raising("OSError(errno.EBADF, 'bad file descriptor')", tmp_path)
  assert bug.returncode == 1 and "Traceback" in bug.stderr  # not a file-system fault: a bug
