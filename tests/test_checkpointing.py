"""Tests for dmpo_jax.checkpointing: model format, training checkpoints, preemption flag."""

import hashlib
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import threading

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from dmpo_jax import checkpointing as ckpt
from dmpo_jax.checkpointing import integrity
from dmpo_jax.models.config import get_preset
from dmpo_jax.models.transformer import Transformer, split_model


def _params(model) -> dict:
  return nnx.state(model, nnx.Param).to_pure_dict()


def _assert_trees_bit_equal(a, b):
  flat_a = jax.tree_util.tree_flatten_with_path(a)[0]
  flat_b = jax.tree_util.tree_flatten_with_path(b)[0]
  assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
  for (path, x), (_, y) in zip(flat_a, flat_b):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype, path
    assert x.shape == y.shape, path
    # Compare raw bytes: bit-exact (also for bfloat16 and NaN payloads).
    assert x.tobytes() == y.tobytes(), path


def _random_model(config, seed: int):
  """A Transformer with numpy-random weights (no eager jax init ops to compile: keeps tests fast)."""
  abstract = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(params=0)))
  graphdef, state = nnx.split(abstract)
  rng = np.random.default_rng(seed)
  values = jax.tree.map(
      lambda x: jnp.asarray(rng.standard_normal(x.shape, dtype=np.float32).astype(x.dtype)),
      state.to_pure_dict())
  state.replace_by_pure_dict(values)
  return nnx.merge(graphdef, state)


@pytest.fixture(scope="module")
def tiny_model():
  config = get_preset("tiny", n_layers=1, d_model=32, head_dim=8, mlp_hidden_size=64)
  return config, _random_model(config, seed=7)


# -- model checkpoints -----------------------------------------------------------------------------

def test_model_checkpoint_round_trip_is_bit_exact(tmp_path, tiny_model):
  config, model = tiny_model
  out = ckpt.save_model_checkpoint(tmp_path / "model", model, config, {"source": "unit-test", "step": 3})
  assert (out / ckpt.MODEL_CONFIG_FILE).is_file()
  assert json.loads((out / ckpt.MODEL_CONFIG_FILE).read_text())["d_model"] == 32
  loaded = ckpt.load_model_checkpoint(out)
  assert loaded.config == config
  _assert_trees_bit_equal(_params(model), _params(loaded))
  assert ckpt.load_model_metadata(out) == {"source": "unit-test", "step": 3}
  # dtype override: fp32 weights cast to bf16 on restore (round-to-nearest, as astype).
  cast = ckpt.load_model_checkpoint(out, dtype="bfloat16")
  assert cast.config.param_dtype == "bfloat16"
  _assert_trees_bit_equal(jax.tree.map(lambda x: x.astype(jnp.bfloat16), _params(model)), _params(cast))


def test_model_checkpoint_bfloat16_state_and_shardings(tmp_path, tiny_model):
  config, model = tiny_model
  bf16_config = config.replace(param_dtype="bfloat16")
  _, state = split_model(model)
  bf16_state = jax.tree.map(lambda x: x.astype(jnp.bfloat16), state.to_pure_dict())
  ckpt.save_model_checkpoint(tmp_path / "bf16", bf16_state, bf16_config)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("fsdp",))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  shardings = jax.tree.map(lambda _: replicated, bf16_state)
  loaded = ckpt.load_model_checkpoint(tmp_path / "bf16", shardings=shardings)
  assert loaded.config == bf16_config
  assert loaded.embed[...].dtype == jnp.bfloat16
  assert loaded.embed[...].sharding == replicated
  _assert_trees_bit_equal(bf16_state, _params(loaded))
  assert ckpt.load_model_metadata(tmp_path / "bf16") == {}


def test_model_checkpoint_refuses_overwrite(tmp_path, tiny_model):
  config, model = tiny_model
  ckpt.save_model_checkpoint(tmp_path / "m", model, config)
  with pytest.raises(FileExistsError, match="already exists"):
    ckpt.save_model_checkpoint(tmp_path / "m", model, config)
  other = _random_model(config, seed=8)
  ckpt.save_model_checkpoint(tmp_path / "m", other, config, overwrite=True)
  _assert_trees_bit_equal(_params(other), _params(ckpt.load_model_checkpoint(tmp_path / "m")))


def test_model_checkpoint_errors(tmp_path, tiny_model):
  config, model = tiny_model
  with pytest.raises(FileNotFoundError, match="does not exist"):
    ckpt.load_model_checkpoint(tmp_path / "nowhere")
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="model_config.json"):
    ckpt.load_model_checkpoint(tmp_path / "empty")
  out = ckpt.save_model_checkpoint(tmp_path / "m", model, config)
  stored = json.loads((out / ckpt.MODEL_CONFIG_FILE).read_text())
  stored["mlp_hidden_size"] = 48
  (out / ckpt.MODEL_CONFIG_FILE).write_text(json.dumps(stored))
  # The edit is caught by the file's digest; without checksums.json (older checkpoints) by the
  # shape comparison.
  with pytest.raises(ckpt.CheckpointIntegrityError,
                     match=r"file .*/m/model_config.json: \d+ bytes, saved \d+ \(checksum mismatch"):
    ckpt.load_model_checkpoint(out)
  (out / ckpt.MODEL_CHECKSUMS_FILE).unlink()
  with pytest.raises(ValueError, match=r"'blocks.gate_proj': checkpoint shape \(1, 32, 64\) != model shape \(1, 32, 48\)"):
    ckpt.load_model_checkpoint(out)
  stored["mlp_hidden_size"] = 64
  stored["not_a_field"] = 1
  (out / ckpt.MODEL_CONFIG_FILE).write_text(json.dumps(stored))
  with pytest.raises(ValueError, match="not_a_field"):
    ckpt.load_model_checkpoint(out)
  with pytest.raises(TypeError, match="nnx.Module"):
    ckpt.save_model_checkpoint(tmp_path / "bad", [1, 2], config)


# -- training checkpoints --------------------------------------------------------------------------

def _train_state(model, seed: int):
  """A train-state pytree like the loop's: nnx params, optax Adam state, step, typed/raw keys."""
  _, params = split_model(model)
  optimizer = optax.adam(1e-3)
  opt_state = optimizer.init(params)
  # Non-trivial moments so a mix-up between mu/nu/params would be caught.
  opt_state = jax.tree.map(lambda x: x + 0.5 if x.dtype == jnp.float32 else x, opt_state)
  return {
      "params": params,
      "opt_state": opt_state,
      "step": jnp.asarray(seed, jnp.int32),
      "rng": {"sampler": jax.random.key(seed), "masks": jax.random.split(jax.random.key(seed + 1), 3),
              "rbg": jax.random.key(seed, impl="rbg"), "raw": jax.random.PRNGKey(seed)},
  }


def _key_free(tree):
  return jax.tree.map(lambda x: jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x, tree)


def test_train_checkpoint_round_trip(tmp_path, tiny_model):
  _, model = tiny_model
  state = _train_state(model, seed=5)
  run_config = {"objective": "dmpo", "lr": 1e-6, "nested": {"groups": [4, 8]}}
  with ckpt.TrainCheckpointer(tmp_path / "ckpt", save_interval_steps=1, max_to_keep=2) as checkpointer:
    assert checkpointer.latest_step() is None
    with pytest.raises(FileNotFoundError, match="No complete checkpoint"):
      checkpointer.restore(abstract_state=state)
    assert checkpointer.save(5, state, iterator_state=b'{"next_index": 12}', consumed_prompts=40,
                             metadata=run_config)
    checkpointer.wait_until_finished()
    assert checkpointer.latest_step() == 5
    abstract = jax.eval_shape(lambda: _train_state(model, seed=0))
    restored, iterator_state, metadata = checkpointer.restore(abstract_state=abstract)
  assert iterator_state == b'{"next_index": 12}'
  assert metadata == {**run_config, "consumed_prompts": 40, "checkpoint_step": 5}
  # Structure (nnx.State, optax NamedTuples) and typed keys survive; everything bit-exact.
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  assert type(restored["opt_state"][0]) is type(state["opt_state"][0])
  assert jax.random.key_impl(restored["rng"]["rbg"]) == jax.random.key_impl(state["rng"]["rbg"])
  assert restored["rng"]["masks"].dtype == state["rng"]["masks"].dtype
  _assert_trees_bit_equal(_key_free(state), _key_free(restored))
  # Restored keys generate the same numbers.
  np.testing.assert_array_equal(jax.random.uniform(restored["rng"]["sampler"], (4,)),
                                jax.random.uniform(state["rng"]["sampler"], (4,)))


def test_train_checkpoint_interval_pruning_and_force(tmp_path):
  state = {"w": jnp.arange(6.0), "step": jnp.int32(0)}
  checkpointer = ckpt.TrainCheckpointer(tmp_path / "ckpt", save_interval_steps=2, max_to_keep=2)
  saved = [step for step in range(1, 8)
           if checkpointer.save(step, {**state, "step": jnp.int32(step)}, consumed_prompts=step * 4)]
  assert saved == [2, 4, 6]
  assert checkpointer.save(7, {**state, "step": jnp.int32(7)}, consumed_prompts=28, force=True)
  assert not checkpointer.save(7, state, force=True)  # never written twice
  checkpointer.wait_until_finished()
  assert checkpointer.all_steps() == [6, 7]
  restored, iterator_state, metadata = checkpointer.restore(6, abstract_state=state)
  assert int(restored["step"]) == 6 and metadata["consumed_prompts"] == 24 and iterator_state is None
  with pytest.raises(FileNotFoundError, match=r"step 2 .*available: \[6, 7\]"):
    checkpointer.restore(2, abstract_state=state)
  with pytest.raises(ValueError, match="reserved"):
    checkpointer.save(8, state, metadata={"consumed_prompts": 1})
  checkpointer.close()
  # A new checkpointer on the same folder (resume) sees the same steps.
  reopened = ckpt.TrainCheckpointer(tmp_path / "ckpt", save_interval_steps=2, max_to_keep=2)
  assert reopened.latest_step() == 7
  raw, _, _ = reopened.restore()
  np.testing.assert_array_equal(raw["w"], np.arange(6.0))
  reopened.close()


_CRASHING_SAVER = """
import os, signal, sys
import jax, jax.numpy as jnp
from orbax.checkpoint._src.path import atomicity
from dmpo_jax import checkpointing as ckpt
from dmpo_jax.checkpointing import integrity

checkpointer = ckpt.TrainCheckpointer(sys.argv[1], save_interval_steps=1, max_to_keep=3)
state = {"w": jnp.arange(4.0), "key": jax.random.key(1)}
checkpointer.save(1, state, iterator_state={"pos": 1}, consumed_prompts=8)
checkpointer.wait_until_finished()

async def die(self, *args, **kwargs):
  # The job is killed after step 2's arrays were written but before orbax commits it.
  os.kill(os.getpid(), signal.SIGKILL)

atomicity.AtomicRenameTemporaryPath.finalize = die
checkpointer.save(2, {**state, "w": state["w"] + 1}, iterator_state={"pos": 2}, consumed_prompts=16)
checkpointer.wait_until_finished()
print("step 2 committed: the crash was not simulated")
"""


def test_train_checkpoint_crash_mid_save_keeps_last_complete(tmp_path):
  directory = tmp_path / "ckpt"
  repo_root = pathlib.Path(__file__).resolve().parents[1]
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo_root), os.environ.get("PYTHONPATH", "")])}
  result = subprocess.run([sys.executable, "-c", _CRASHING_SAVER, str(directory)], env=env,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == -signal.SIGKILL, result.stdout + result.stderr
  leftovers = [p.name for p in directory.iterdir() if ".orbax-checkpoint-tmp" in p.name]
  assert len(leftovers) == 1 and leftovers[0].startswith("2.")
  assert any((directory / leftovers[0]).rglob("*")), "the interrupted step should hold partial data"
  # The restarted job: the partial step 2 is ignored, step 1 restores intact.
  state = {"w": jnp.zeros(4), "key": jax.random.key(0)}
  resumed = ckpt.TrainCheckpointer(directory, save_interval_steps=1, max_to_keep=3)
  assert resumed.all_steps() == [1] and resumed.latest_step() == 1
  restored, iterator_state, metadata = resumed.restore(abstract_state=state)
  np.testing.assert_array_equal(restored["w"], np.arange(4.0))
  np.testing.assert_array_equal(jax.random.key_data(restored["key"]), jax.random.key_data(jax.random.key(1)))
  assert iterator_state == {"pos": 1} and metadata["consumed_prompts"] == 8
  # The next save deletes the leftover and writes step 2 for real.
  assert resumed.save(2, {**restored, "w": restored["w"] + 1}, iterator_state={"pos": 2}, consumed_prompts=16)
  resumed.wait_until_finished()
  assert resumed.all_steps() == [1, 2]
  assert not [p for p in directory.iterdir() if ".orbax-checkpoint-tmp" in p.name]
  resumed.close()


def test_train_checkpoint_grain_iterator_resume(tmp_path):
  dataset = grain.MapDataset.range(20).shuffle(seed=3).batch(2)
  iterator = iter(dataset.to_iter_dataset())
  for _ in range(3):
    next(iterator)
  state = {"step": jnp.int32(3)}
  with ckpt.TrainCheckpointer(tmp_path / "ckpt") as checkpointer:
    checkpointer.save(3, state, iterator_state=iterator.get_state(), consumed_prompts=6, force=True)
    checkpointer.wait_until_finished()
    expected = [next(iterator).tolist() for _ in range(4)]
    _, iterator_state, _ = checkpointer.restore(abstract_state=state)
  fresh = iter(dataset.to_iter_dataset())
  fresh.set_state(iterator_state)
  assert [next(fresh).tolist() for _ in range(4)] == expected


def test_train_checkpoint_abstract_mismatch(tmp_path):
  with ckpt.TrainCheckpointer(tmp_path / "ckpt") as checkpointer:
    checkpointer.save(1, {"w": jnp.zeros(3), "key": jnp.zeros(2, jnp.uint32)})
    checkpointer.wait_until_finished()
    with pytest.raises(ValueError, match="'key' is a PRNG key in abstract_state but was not saved as one"):
      checkpointer.restore(abstract_state={"w": jnp.zeros(3), "key": jax.random.key(0)})
    with pytest.raises(ValueError, match="does not match abstract_state"):
      checkpointer.restore(abstract_state={"w": jnp.zeros(3), "other": jnp.zeros(2, jnp.uint32)})


def test_save_policy_is_the_interval_only_and_never_older_than_the_newest(tmp_path):
  """No save at the first step of a fresh run (orbax's default policy would), none at a step
  older than the newest checkpoint; single-process runs never reach JAX's preemption point."""
  with ckpt.TrainCheckpointer(tmp_path / "ckpt", save_interval_steps=5, max_to_keep=3) as checkpointer:
    assert [s for s in range(1, 11) if checkpointer.should_save(s)] == [5, 10]
    assert not checkpointer.reached_preemption(1)
    assert checkpointer.save(10, {"w": jnp.zeros(2)}, force=True)
    assert [s for s in range(1, 21) if checkpointer.should_save(s)] == [15, 20]
    assert not checkpointer.save(5, {"w": jnp.zeros(2)})


def test_leaf_names_in_the_metadata_are_dotted_key_paths(tmp_path):
  """PRNG key leaves are recorded under the names earlier checkpoints used: dict keys, NamedTuple
  fields and sequence indices joined by dots."""
  adam = optax.adam(1e-3).init({"w": jnp.zeros(2)})
  state = {"rng": {"sampler": jax.random.key(0)}, "opt_state": adam,
           "pairs": [jnp.zeros(1), (jnp.zeros(1), jax.random.key(1, impl="rbg"))]}
  with ckpt.TrainCheckpointer(tmp_path / "ckpt") as checkpointer:
    checkpointer.save(1, state)
    checkpointer.wait_until_finished()
    assert checkpointer.metadata(1)["prng_key_impls"] == {"rng.sampler": "threefry2x32",
                                                          "pairs.1.1": "rbg"}
    restored, _, _ = checkpointer.restore(abstract_state=state)
  assert sorted(integrity.saved_shapes(tmp_path / "ckpt" / "1" / ckpt.STATE_ITEM, "x")) == [
      "opt_state.0.count", "opt_state.0.mu.w", "opt_state.0.nu.w", "pairs.0", "pairs.1.0",
      "pairs.1.1", "rng.sampler"]
  assert jax.random.key_impl(restored["pairs"][1][1]) == jax.random.key_impl(state["pairs"][1][1])


# -- preemption ------------------------------------------------------------------------------------

def test_preemption_handler_sigterm_sets_flag_and_restores_handler():
  previous = signal.getsignal(signal.SIGTERM)
  with ckpt.PreemptionHandler() as handler:
    assert signal.getsignal(signal.SIGTERM) == handler._handle
    assert not handler.should_stop()
    os.kill(os.getpid(), signal.SIGTERM)
    assert handler.should_stop()
  assert signal.getsignal(signal.SIGTERM) == previous


def test_preemption_handler_second_signal_goes_to_previous_handler():
  received = []
  original = signal.signal(signal.SIGUSR1, lambda signum, frame: received.append(signum))
  try:
    handler = ckpt.PreemptionHandler(signals=(signal.SIGUSR1,)).install()
    os.kill(os.getpid(), signal.SIGUSR1)
    assert handler.should_stop() and received == []
    os.kill(os.getpid(), signal.SIGUSR1)
    assert received == [signal.SIGUSR1]
    handler.uninstall()
    manual = ckpt.PreemptionHandler(signals=())
    assert not manual.should_stop()
    manual.request_stop()
    assert manual.should_stop()
  finally:
    signal.signal(signal.SIGUSR1, original)


# -- integrity -------------------------------------------------------------------------------------

def _flip_byte_of(folder: pathlib.Path, array: np.ndarray) -> pathlib.Path:
  """Finds ``array``'s raw bytes in a file under ``folder`` and flips one bit of one byte there.

  The array must be incompressible (random bits) so that zstd stores it verbatim."""
  raw = np.ascontiguousarray(array).tobytes()
  needle = raw[len(raw) // 2:len(raw) // 2 + 64]
  hits = []
  for file in sorted(p for p in folder.rglob("*") if p.is_file()):
    data = file.read_bytes()
    offset = data.find(needle)
    if offset >= 0:
      hits.append((file, offset))
  assert len(hits) == 1, f"expected the array's bytes in exactly one file, found {hits}"
  file, offset = hits[0]
  data = bytearray(file.read_bytes())
  data[offset + 17] ^= 0x04
  file.write_bytes(bytes(data))
  return file


def _random_bits(shape, dtype, seed):
  rng = np.random.default_rng(seed)
  size = int(np.prod(shape)) * np.dtype(dtype).itemsize
  return np.frombuffer(rng.bytes(size), dtype=dtype).reshape(shape).copy()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_byte_flip_in_saved_adam_moment_is_detected(tmp_path, dtype):
  """A real one-bit change inside a saved Adam moment's bytes: restore names step, item, array."""
  dtype = jnp.dtype(dtype)
  params = {"embed": jnp.asarray(_random_bits((64, 32), dtype, 0)), "norm": jnp.ones((32,), dtype)}
  opt_state = optax.adam(1e-3).init(params)
  mu = _random_bits((64, 32), dtype, 1)
  opt_state = (opt_state[0]._replace(mu={"embed": jnp.asarray(mu), "norm": opt_state[0].mu["norm"]}),
               opt_state[1])
  state = {"params": params, "opt_state": opt_state, "step": jnp.int32(3)}
  with ckpt.TrainCheckpointer(tmp_path / "ckpt", max_to_keep=None) as checkpointer:
    checkpointer.save(2, state, iterator_state=b'{"i": 1}', force=True)
    checkpointer.save(3, state, iterator_state=b'{"i": 2}', force=True)
  damaged = _flip_byte_of(tmp_path / "ckpt" / "3" / ckpt.STATE_ITEM, mu)
  name = re.escape(damaged.relative_to(tmp_path / "ckpt" / "3").as_posix())
  with ckpt.TrainCheckpointer(tmp_path / "ckpt", max_to_keep=None) as checkpointer:
    with pytest.raises(ckpt.CheckpointIntegrityError,
                       match=rf"step 3 .*: item 'state': file .*/3/{name}: bytes \[0, \d+\) differ "
                             r"from the saved SHA-256 \(checksum mismatch") as error:
      checkpointer.restore(abstract_state=state)
    assert str(error.value).count("file ") == 1  # only the damaged file is named
    # Without abstract_state (raw tree) the same check applies.
    with pytest.raises(ckpt.CheckpointIntegrityError, match=rf"item 'state': file .*/3/{name}"):
      checkpointer.restore(3)
    # Opt-in fallback: the newest intact step (2) is restored, bit-exact; step 3 is set aside.
    restored = checkpointer.restore(abstract_state=state, fallback=True)
    assert restored.metadata["checkpoint_step"] == 2 and restored.iterator_state == b'{"i": 1}'
    _assert_trees_bit_equal(state, restored.state)
    assert checkpointer.all_steps() == [2]
    assert (tmp_path / "ckpt" / f"{ckpt.CORRUPT_PREFIX}3").is_dir()
    assert checkpointer.save(3, state, force=True)  # the step can be written again
    checkpointer.wait_until_finished()
    assert checkpointer.all_steps() == [2, 3]
    _assert_trees_bit_equal(state, checkpointer.restore(abstract_state=state).state)


def test_save_returns_before_the_digests_and_a_step_appears_only_with_them(tmp_path, monkeypatch):
  """The file digests are taken in orbax's background commit thread: `save` returns while they
  are held back, the step becomes visible only once they are written, and they catch a byte
  flipped afterwards. ``async_save=False`` waits for them inside `save`."""
  started, release = threading.Event(), threading.Event()
  digest_files = integrity.digest_files

  def held_back(*args, **kwargs):
    started.set()
    assert release.wait(120), "the test never released the digests"
    return digest_files(*args, **kwargs)

  monkeypatch.setattr(integrity, "digest_files", held_back)
  w = _random_bits((256, 64), np.float32, 4)
  state = {"w": jnp.asarray(w), "step": jnp.int32(1)}
  with ckpt.TrainCheckpointer(tmp_path / "ckpt") as checkpointer:
    assert checkpointer.save(1, state, iterator_state={"pos": 1}, force=True)
    assert started.wait(120)  # save() returned; the commit thread is inside the digests
    assert checkpointer.all_steps() == []  # not visible without its digests
    release.set()
    checkpointer.wait_until_finished()
    assert checkpointer.all_steps() == [1]
  manifest = json.loads((tmp_path / "ckpt" / "1" / ckpt.STEP_CHECKSUMS_FILE).read_text())
  assert sorted({name.split("/")[0] for name in manifest["files"]}) == sorted(ckpt.STEP_ITEMS)
  _flip_byte_of(tmp_path / "ckpt" / "1" / ckpt.STATE_ITEM, w)
  with ckpt.TrainCheckpointer(tmp_path / "ckpt") as checkpointer:
    with pytest.raises(ckpt.CheckpointIntegrityError, match=r"step 1 .*item 'state': file .* differ"):
      checkpointer.restore(abstract_state=state)
  monkeypatch.setattr(integrity, "digest_files", digest_files)
  with ckpt.TrainCheckpointer(tmp_path / "sync", async_save=False) as checkpointer:
    assert checkpointer.save(2, state, force=True)
    assert (tmp_path / "sync" / "2" / ckpt.STEP_CHECKSUMS_FILE).is_file()
    _assert_trees_bit_equal(state, checkpointer.restore(abstract_state=state).state)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_byte_flip_in_model_checkpoint_and_broken_json_name_the_file(tmp_path, tiny_model, dtype):
  config, model = tiny_model
  config = config.replace(param_dtype=dtype)
  embed = _random_bits((config.vocab_size, config.d_model), jnp.dtype(dtype), 3)
  embed[~np.isfinite(embed.astype(np.float32))] = 0.5  # a model's weights are finite (load checks)
  params = jax.tree.map(lambda x: x.astype(dtype), _params(model))
  params["embed"] = jnp.asarray(embed)
  out = ckpt.save_model_checkpoint(tmp_path / "m", params, config, {"step": 1})
  _assert_trees_bit_equal(params, _params(ckpt.load_model_checkpoint(out)))  # intact: loads
  damaged = re.escape(_flip_byte_of(out / ckpt.MODEL_PARAMS_DIR, embed).relative_to(out).as_posix())
  with pytest.raises(ckpt.CheckpointIntegrityError,
                     match=rf"params/: file .*/{damaged}: bytes \[0, \d+\) differ from the saved"):
    ckpt.load_model_checkpoint(out)
  other = "float32" if dtype == "bfloat16" else "bfloat16"
  with pytest.raises(ckpt.CheckpointIntegrityError, match=rf"params/: file .*/{damaged}"):
    ckpt.load_model_checkpoint(out, dtype=other)  # checked before anything is read
  (out / ckpt.MODEL_METADATA_FILE).write_text('{"step": 1')
  with pytest.raises(ckpt.CheckpointIntegrityError, match=r"metadata.json is not valid JSON"):
    ckpt.load_model_metadata(out)
  (out / ckpt.MODEL_METADATA_FILE).write_text('{"step": 2}')
  with pytest.raises(ckpt.CheckpointIntegrityError,
                     match=r"metadata.json: 11 bytes, saved 15 \(checksum mismatch"):
    ckpt.load_model_metadata(out)
  (out / ckpt.MODEL_METADATA_FILE).write_text('{\n  "step": 2\n}')  # same size, one byte changed
  with pytest.raises(ckpt.CheckpointIntegrityError,
                     match=r"metadata.json: bytes \[0, 15\) differ from the saved SHA-256"):
    ckpt.load_model_metadata(out)


@pytest.mark.parametrize("item", [ckpt.METADATA_ITEM, ckpt.ITERATOR_ITEM])
def test_train_checkpoint_json_damage_names_step_item_and_file(tmp_path, item):
  state = {"w": jnp.arange(4.0)}
  with ckpt.TrainCheckpointer(tmp_path / "ckpt") as checkpointer:
    checkpointer.save(1, state, iterator_state={"next": 7}, metadata={"config": "{}"}, force=True)
  file = tmp_path / "ckpt" / "1" / item / "metadata"
  text = file.read_text()
  with ckpt.TrainCheckpointer(tmp_path / "ckpt") as checkpointer:
    file.write_text(text[:-3])
    with pytest.raises(ckpt.CheckpointIntegrityError,
                       match=rf"step 1 .*: item '{item}': file .*1/{item}/metadata: "
                             rf"{len(text) - 3} bytes, saved {len(text)} \(checksum mismatch"):
      checkpointer.restore(abstract_state=state)
    file.write_text(text.replace("7", "8") if item == ckpt.ITERATOR_ITEM else text.replace("{}", "[]"))
    with pytest.raises(ckpt.CheckpointIntegrityError,
                       match=rf"step 1 .*: item '{item}': file .*1/{item}/metadata: bytes \[0, "
                             rf"{len(text)}\) differ"):
      checkpointer.restore(abstract_state=state)
    with pytest.raises(ckpt.CheckpointIntegrityError, match="Every checkpoint .* is damaged"):
      checkpointer.restore(abstract_state=state, fallback=True)
  # A step without digests (saved by an older version) is read unverified; torn JSON is still
  # an integrity error naming the item's folder.
  (tmp_path / "ckpt" / "1" / ckpt.STEP_CHECKSUMS_FILE).unlink()
  file.write_text(text[:-3])
  with ckpt.TrainCheckpointer(tmp_path / "ckpt") as checkpointer:
    with pytest.raises(ckpt.CheckpointIntegrityError,
                       match=rf"step 1 .*, item '{item}': cannot read .*1/{item}"):
      checkpointer.restore(abstract_state=state)


def test_file_digests_match_hashlib_and_name_the_damaged_segment(tmp_path):
  """`integrity` digests against a plain hashlib computation: one SHA-256 per segment of
  ``segment_bytes``; `verify_files` names the changed segment, a size change and a missing file."""
  rng = np.random.default_rng(0)
  (tmp_path / "item" / "sub").mkdir(parents=True)
  blobs = {"item/a": rng.bytes(1000), "item/sub/b": rng.bytes(64), "item/empty": b""}
  for name, data in blobs.items():
    (tmp_path / name).write_bytes(data)
  names = integrity.list_files(tmp_path, ["item", "not_there"])
  assert names == sorted(blobs)
  files = integrity.digest_files(tmp_path, names, segment_bytes=300)
  for name, data in blobs.items():
    by_hand = [hashlib.sha256(data[i:i + 300]).hexdigest() for i in range(0, max(len(data), 1), 300)]
    assert files[name] == {"bytes": len(data), "sha256": by_hand}
    assert integrity.digest_bytes(data, segment_bytes=300) == files[name]
  manifest = integrity.make_manifest(files, segment_bytes=300)
  assert integrity.manifest_problem(manifest) is None
  assert integrity.verify_files(tmp_path, manifest) == []
  damaged = bytearray(blobs["item/a"])
  damaged[650] ^= 0x10
  (tmp_path / "item/a").write_bytes(bytes(damaged))
  (tmp_path / "item/sub/b").write_bytes(blobs["item/sub/b"] + b"x")
  (tmp_path / "item/empty").unlink()
  assert integrity.verify_files(tmp_path, manifest) == [
      "item/a: bytes [600, 900) differ from the saved SHA-256", "item/empty: missing or unreadable",
      "item/sub/b: 65 bytes, saved 64"]
  assert integrity.manifest_problem({"files": {}}) is not None
