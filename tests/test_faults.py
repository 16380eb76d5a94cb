"""Faults a user meets, each one line that names the problem, with nothing lost or left half
written: file-system faults (read-only folder, full disk) in train, eval, convert and plot;
non-finite weights; files with a byte-order mark or CRLF line ends; prompts the bucket cuts;
repeated held-out prompts; optional packages that are not installed.

A full disk is simulated with the file-size limit (``ulimit -f``, SIGXFSZ ignored: a write past
the limit fails with EFBIG as a full disk fails with ENOSPC). A read-only folder is a folder
without write permission, or, for root (who may write anyway), a read-only tmpfs.
"""

import json
import logging
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from dmpo_jax import checkpointing, cli, extras, metrics
from dmpo_jax.rl import data_checks
from dmpo_jax.models.config import get_preset
from dmpo_jax.models.tokenizer import ByteTokenizer
from dmpo_jax.models.transformer import create_model
from dmpo_jax.tasks import digit_sort, get_task

REPO = pathlib.Path(__file__).resolve().parents[1]
DEMO = str(REPO / "configs" / "demo.py")
SMALL = ["--config.sft.num_steps=0", "--config.prompts_per_step=2", "--config.group_size=2",
         "--config.eval.num_examples=4", "--config.eval.batch_size=4",
         "--config.eval.every_steps=0", "--config.checkpoint.every_steps=1", "--plot=false"]


def _script(name, *args, cwd, file_size_limit=None, block_module=None, timeout=600):
  """Runs launch/<name>.py; ``file_size_limit`` (bytes) makes larger writes fail like a full
  disk; ``block_module`` makes that module impossible to import (a missing extra)."""
  command = [sys.executable, str(REPO / "launch" / f"{name}.py"), *args]
  if block_module:
    command = [sys.executable, "-c", f"import runpy, sys; sys.modules[{block_module!r}] = None; "
               "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')",
               *command[1:]]
  if file_size_limit:  # bash sets the limit (in KiB) and ignores SIGXFSZ (EFBIG instead of a kill)
    command = ["bash", "-c", f'trap "" XFSZ; ulimit -f {file_size_limit // 1024}; exec "$@"', "bash",
               *command]
  return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                        env=dict(os.environ, PYTHONPATH=str(REPO)))


def _one_error_line(result):
  """The single ``error:`` line of stderr (log lines may precede it; no traceback)."""
  assert "Traceback" not in result.stderr and "ERROR:absl" not in result.stderr, result.stderr[-3000:]
  errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1, result.stderr[-3000:]
  return errors[0]


@pytest.fixture
def read_only_dir(tmp_path):
  path = tmp_path / "read_only"
  path.mkdir()
  if os.geteuid() != 0:
    path.chmod(0o555)
    yield path
    path.chmod(0o755)
    return
  mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)],
                           capture_output=True, text=True, check=False)
  if mounted.returncode != 0:
    pytest.skip(f"as root a read-only folder needs a read-only mount, which failed: {mounted.stderr}")
  try:
    yield path
  finally:
    subprocess.run(["umount", str(path)], check=False)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
  root = tmp_path_factory.mktemp("tiny")
  config = get_preset("tiny")
  checkpointing.save_model_checkpoint(root / "ckpt", create_model(config, seed=0), config)
  return root / "ckpt"


# ------------------------------------------------------------------------------------------------
# File-system faults
# ------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_train_in_a_read_only_folder(read_only_dir, tmp_path):
  reason = "Permission denied" if os.geteuid() else "Read-only file system"
  new = _script("train", f"--config={DEMO}", f"--workdir={read_only_dir / 'run'}", *SMALL,
                cwd=tmp_path)
  assert new.returncode == 1
  assert _one_error_line(new) == f"error: cannot create the workdir {read_only_dir / 'run'}: {reason}"
  existing = _script("train", f"--config={DEMO}", f"--workdir={read_only_dir}", *SMALL, cwd=tmp_path)
  assert existing.returncode == 1
  assert _one_error_line(existing) == (f"error: cannot write the lock file of the workdir "
                                       f"{read_only_dir / '.lock'}: {reason}")


@pytest.mark.slow
def test_train_on_a_full_disk_keeps_the_last_checkpoint(tmp_path):
  """The checkpoint of step 2 cannot be written (its data file is larger than the disk
  allows): one line naming the checkpoint folder and the intact step 1; the partial step is
  removed and step 1 restores with its checksums."""
  workdir = tmp_path / "run"
  first = _script("train", f"--config={DEMO}", f"--workdir={workdir}", *SMALL,
                  "--config.num_steps=1", cwd=tmp_path)
  assert first.returncode == 0, first.stderr[-3000:]
  full = _script("train", f"--config={DEMO}", f"--workdir={workdir}", *SMALL,
                 "--config.num_steps=2", cwd=tmp_path, file_size_limit=100 * 1024)
  assert full.returncode == 1, full.stderr[-3000:]
  line = _one_error_line(full)
  assert line.startswith(f"error: cannot write the checkpoint {workdir / 'checkpoints'} ("), line
  assert line.endswith("File too large; the last complete checkpoint, step 1, is intact"), line
  assert checkpointing.TrainCheckpointer.steps_in(workdir / "checkpoints") == [1]
  assert not list((workdir / "checkpoints").glob("*tmp*"))
  with checkpointing.TrainCheckpointer(workdir / "checkpoints") as ckpt:
    assert ckpt.restore().metadata["checkpoint_step"] == 1  # verified against its checksums


@pytest.mark.slow
def test_convert_on_a_full_disk_leaves_nothing_behind(tiny_checkpoint, tmp_path, read_only_dir):
  """The HF shard does not fit: one line, no output folder and no 0-byte .safetensors; the
  same command then works (nothing to --overwrite)."""
  args = ["--direction=orbax_to_hf", f"--input={tiny_checkpoint}", "--output=hf"]
  full = _script("convert", *args, cwd=tmp_path, file_size_limit=100 * 1024)
  assert full.returncode == 1, full.stderr[-3000:]
  line = _one_error_line(full)
  assert line.startswith("error: cannot write hf") and line.endswith(": File too large"), line
  assert sorted(p.name for p in tmp_path.iterdir()) == ["read_only"]  # no output, no temporary
  again = _script("convert", *args, cwd=tmp_path)
  assert again.returncode == 0, again.stderr[-3000:]
  from dmpo_jax.models import hf_io  # pylint: disable=import-outside-toplevel
  model, _ = hf_io.load_pretrained(tmp_path / "hf")
  np.testing.assert_array_equal(np.asarray(model.embed[...]),
                                np.asarray(checkpointing.load_model_checkpoint(tiny_checkpoint).embed[...]))
  refused = _script("convert", "--direction=orbax_to_hf", f"--input={tiny_checkpoint}",
                    f"--output={read_only_dir / 'hf'}", cwd=tmp_path)
  assert refused.returncode == 1
  assert _one_error_line(refused).startswith(f"error: cannot write {read_only_dir / 'hf'} (")


@pytest.mark.slow
def test_eval_and_plot_into_a_read_only_folder(tiny_checkpoint, tmp_path, read_only_dir):
  reason = "Permission denied" if os.geteuid() else "Read-only file system"
  evaluate = _script("eval", f"--checkpoint={tiny_checkpoint}", "--task=digit_sort",
                     "--tokenizer=byte", "--gen_lengths=5", "--block_length=5", "--limit=2",
                     "--batch_size=2", "--no_progress", f"--output_dir={read_only_dir / 'out'}",
                     cwd=tmp_path)
  assert evaluate.returncode == 1, evaluate.stderr[-3000:]
  assert _one_error_line(evaluate) == (f"error: cannot create the output folder "
                                       f"{read_only_dir / 'out'}: {reason}")
  run = tmp_path / "run"
  run.mkdir()
  (run / "metrics.jsonl").write_text('{"step": 0, "eval/accuracy": 1.0}\n'
                                     '{"step": 1, "reward/mean": 0.5, "eval/accuracy": 2.0}\n')
  plot = _script("plot", f"--workdir={run}", f"--output={read_only_dir / 'c.png'}", cwd=tmp_path)
  assert plot.returncode == 1, plot.stderr[-3000:]
  assert _one_error_line(plot).startswith(f"error: cannot write the plot {read_only_dir / 'c.png'} (")
  assert not list(read_only_dir.iterdir())


# ------------------------------------------------------------------------------------------------
# Non-finite weights
# ------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_non_finite_weights_are_refused_on_load(tmp_path):
  config = get_preset("tiny")
  model = create_model(config, seed=0)
  q = np.asarray(model.blocks.q_proj[...]).copy()
  index = (1, 3, 0, 2)[:q.ndim]
  q[index] = np.nan
  model.blocks.q_proj[...] = q
  checkpointing.save_model_checkpoint(tmp_path / "nan", model, config)  # checksums of the NaN
  result = _script("generate", "--checkpoint=nan", "--tokenizer=byte", "--no_chat",
                   "--prompt=3142=", "--gen_length=5", "--steps=5", "--block_length=5", cwd=tmp_path)
  assert result.returncode == 2, result.stderr[-3000:]
  assert result.stderr.strip().splitlines() == [
      f"error: --checkpoint=nan: Model checkpoint {tmp_path / 'nan'} holds non-finite weights: "
      f"tensor blocks.q_proj: 1 NaN/Inf value(s) of shape {q.shape}, the first at index {index}"]
  from dmpo_jax.models import hf_io  # pylint: disable=import-outside-toplevel
  embed = np.asarray(model.embed[...]).copy()
  model.blocks.q_proj[...] = np.nan_to_num(q)
  embed[5, 1] = np.inf
  model.embed[...] = embed
  hf_io.save_pretrained(model, tmp_path / "hf")
  with pytest.raises(hf_io.CheckpointError, match=r"tensor embed: 1 NaN/Inf value\(s\) of shape "
                     rf"\({embed.shape[0]}, {embed.shape[1]}\), the first at index \(5, 1\)"):
    hf_io.load_pretrained(tmp_path / "hf")


# ------------------------------------------------------------------------------------------------
# launch/score.py input files
# ------------------------------------------------------------------------------------------------

def test_score_reads_bom_and_crlf_files_and_names_bad_rows(tmp_path, capsys):
  from launch import score  # pylint: disable=import-outside-toplevel
  rows = [("<answer>18</answer>", "18"), ("<answer>7</answer>", "8"), ("<answer>5</answer>", "5")]
  jsonl = "\r\n".join(json.dumps({"completion": c, "answer": a}) for c, a in rows) + "\r\n"
  (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + jsonl.encode())
  csv_text = "completion,answer\r\n" + "".join(f"{c},{a}\r\n" for c, a in rows)
  (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbf" + csv_text.encode())
  (tmp_path / "bom.json").write_bytes(
      b"\xef\xbb\xbf" + json.dumps([{"completion": c, "answer": a} for c, a in rows]).encode())
  for name in ("bom.jsonl", "bom.csv", "bom.json"):
    assert score.main(["--task=gsm8k", f"--input={tmp_path / name}"]) == 0
    out, err = capsys.readouterr()
    summary = json.loads(out.strip().splitlines()[-1])
    assert (summary["input_rows"], summary["skipped_rows"], summary["num_correct"]) == (3, 0, 2), name
    assert summary["accuracy"] == pytest.approx(100 * 2 / 3) and err == ""
  mixed = tmp_path / "mixed.jsonl"
  mixed.write_text(json.dumps({"completion": "<answer>18</answer>", "answer": "18"}) + "\nnot json\n"
                   + json.dumps({"completion": "x"}) + "\n")
  assert score.main(["--task=gsm8k", f"--input={mixed}"]) == 0
  out, err = capsys.readouterr()
  assert json.loads(out.strip().splitlines()[-1])["skipped_rows"] == 2
  assert err.startswith(f"warning: skipped 2 of 3 row(s) of {mixed}: row 1 (line 2): not valid JSON")
  assert "row 2: KeyError: row 2 lacks field(s) ['answer']" in err


# ------------------------------------------------------------------------------------------------
# Prompts: truncation and held-out duplicates
# ------------------------------------------------------------------------------------------------

def test_truncated_prompts_are_counted_warned_and_refused_above_the_fraction(caplog):
  task, tokenizer = get_task("digit_sort"), ByteTokenizer()
  short = [{"digits": "3142", "answer": "1234"}] * 39
  held_out = [{"digits": "9876", "answer": "6789"}] * 10
  long = {"digits": "3141592653", "answer": "1123345569"}  # "3141592653=": 11 bytes
  with caplog.at_level(logging.WARNING, logger="dmpo_jax.train"):
    counts = data_checks.check_truncation(tokenizer, task, short + [long], held_out, 5, 0.05)
  assert counts == {"data/truncated_training_prompts": 1.0, "data/truncated_held_out_prompts": 0.0}
  assert ("task.prompt_length=5 truncates 1 of 40 training prompts (2.5 %; the longest has 11 "
          "tokens): they keep their last 5 tokens") in caplog.text
  with pytest.raises(cli.UserError, match=r"^task.prompt_length=5 truncates 3 of 41 training "
                     r"prompts \(7.3 %; the longest has 11 tokens\), more than "
                     r"task.max_truncated_fraction=0.05: raise task.prompt_length"):
    data_checks.check_truncation(tokenizer, task, short[:38] + [long] * 3, held_out, 5, 0.05)
  assert data_checks.check_truncation(tokenizer, task, short, held_out, 5, 0.0) == {
      "data/truncated_training_prompts": 0.0, "data/truncated_held_out_prompts": 0.0}


def test_held_out_prompts_are_distinct_and_never_training_prompts():
  task = get_task("digit_sort")
  held_out = task.load_eval(num_examples=256, seed=0)
  train = task.load_train(seed=0)
  digits = [e["digits"] for e in held_out]
  assert len(set(digits)) == 256 and not set(digits) & {e["digits"] for e in train}
  with pytest.raises(ValueError, match="the test split has 2030 distinct 4-digit strings"):
    digit_sort.generate_examples(3000, split="test", distinct=True)
  a, b, c = ({"digits": d, "answer": "".join(sorted(d))} for d in ("3142", "9120", "5555"))
  kept, repeats, in_train = data_checks.distinct_held_out(task, [c, a], [a, b, b, c, a])
  assert (kept, repeats, in_train) == ([b], 2, 2)


# ------------------------------------------------------------------------------------------------
# Optional packages
# ------------------------------------------------------------------------------------------------

def test_a_missing_extra_names_the_install(tmp_path, monkeypatch, caplog):
  run = tmp_path / "run"
  run.mkdir()
  (run / "metrics.jsonl").write_text('{"step": 1, "reward/mean": 0.5}\n')
  plot = _script("plot", f"--workdir={run}", cwd=tmp_path, block_module="matplotlib")
  assert plot.returncode == 2
  assert plot.stderr.strip().splitlines() == [
      "error: drawing the curves (launch/plot.py) needs the `matplotlib` package, which is not "
      'installed: pip install -e ".[plot]" (from the dmpo_jax folder) or pip install matplotlib']
  (tmp_path / "g.jsonl").write_text(json.dumps({"completion": "1", "answer": "1"}) + "\n")
  scored = _script("score", "--task=math", "--input=g.jsonl", "--use_math_verify", cwd=tmp_path,
                   block_module="math_verify")
  assert scored.returncode == 2 and 'pip install -e ".[math]"' in _one_error_line(scored)
  monkeypatch.setitem(sys.modules, "tensorboard", None)
  with caplog.at_level(logging.WARNING, logger="dmpo_jax.metrics"):
    with metrics.MetricWriter(tmp_path / "w") as writer:
      writer.write(1, {"x": 1.0})
  assert "TensorBoard event files are off" in caplog.text and '".[tensorboard]"' in caplog.text
  assert not (tmp_path / "w" / metrics.TENSORBOARD_DIR).exists()
  assert metrics.read_metrics(tmp_path / "w") == [{"step": 1, "x": 1.0}]


def test_the_core_install_leaves_the_extras_out():
  import setuptools  # pylint: disable=import-outside-toplevel
  captured = {}
  original = setuptools.setup
  setuptools.setup = lambda **kwargs: captured.update(kwargs)
  try:
    source = (REPO / "setup.py").read_text().replace('open("README.md"', f'open("{REPO / "README.md"}"')
    exec(compile(source, "setup.py", "exec"), {"__name__": "__main__"})  # pylint: disable=exec-used
  finally:
    setuptools.setup = original
  core = " ".join(captured["install_requires"])
  packages = {extra: package for extra, package in extras.EXTRAS.values()}
  for extra, package in packages.items():
    assert package not in core
    assert captured["extras_require"][extra] == [package] or (
        extra == "data" and captured["extras_require"][extra] == ["datasets>=3.0"])
    assert any(p.split(">")[0] == package for p in captured["extras_require"]["test"]), package
