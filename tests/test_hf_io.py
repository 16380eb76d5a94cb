"""HF checkpoint I/O: name mapping, bit-exact round trips, special ids, clear errors, conversion.

Fixtures are written with the reference `safetensors` writer (`hf_fixtures`); outputs are read
back with the reference reader, so reader and writer are each checked against the library.
"""

import importlib.util
import json
import pathlib

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

from tests.helpers import hf_fixtures

from dmpo_jax.models import hf_io  # noqa: E402
from dmpo_jax.models.config import get_preset  # noqa: E402
from dmpo_jax.models.hf_io import CheckpointError, load_pretrained, save_pretrained  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _random_model(config, seed=0):
  """Random weights without eager initialisation (fast on CPU)."""
  graphdef, state = hf_io.abstract_model(config)
  rng = np.random.default_rng(seed)
  state.replace_by_pure_dict(jax.tree.map(
      lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), state.to_pure_dict()))
  return nnx.merge(graphdef, state)


def _params(model) -> dict:
  return {".".join(map(str, p)): np.asarray(v.get_value())
          for p, v in nnx.state(model, nnx.Param).flat_state()}


def _assert_same_params(a, b):
  pa, pb = _params(a), _params(b)
  assert pa.keys() == pb.keys()
  for name in pa:
    assert pa[name].dtype == pb[name].dtype, name
    assert pa[name].tobytes() == pb[name].tobytes(), name


def _assert_same_tensor_bytes(folder_a, folder_b):
  a, b = hf_fixtures.read_all_tensors(folder_a), hf_fixtures.read_all_tensors(folder_b)
  assert a.keys() == b.keys()
  for name in a:
    assert (a[name].dtype, a[name].shape) == (b[name].dtype, b[name].shape), name
    assert a[name].tobytes() == b[name].tobytes(), name


@pytest.fixture(scope="module")
def llada_dir(tmp_path_factory):
  folder = tmp_path_factory.mktemp("llada_hf")
  hf_fixtures.make_llada_checkpoint(folder, sharded=True, tokenizer="real_ids")
  return folder


@pytest.fixture(scope="module")
def dream_dir(tmp_path_factory):
  folder = tmp_path_factory.mktemp("dream_hf")
  hf_fixtures.make_dream_checkpoint(folder, sharded=False)
  return folder


# ------------------------------------------------------------------------------------------------
# Mapping
# ------------------------------------------------------------------------------------------------

def test_llada_mapping_computes_the_same_projections(tmp_path):
  """Each Flax parameter applied the Flax way equals the torch Linear applied to the HF tensor."""
  tensors = hf_fixtures.make_llada_checkpoint(tmp_path, sharded=True)
  model, info = load_pretrained(tmp_path)
  assert info.family == "llada" and info.tensor_dtype == "BF16"
  assert info.weight_map is not None and len(set(info.weight_map.values())) == 2
  c = model.config
  assert (c.n_layers, c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.mlp_hidden_size,
          c.vocab_size, c.qkv_bias) == (2, 32, 4, 4, 8, 64, 128, False)
  assert (c.param_dtype, c.rope_theta, c.norm_eps) == ("bfloat16", 500000.0, 1e-5)
  assert (c.mask_token_id, c.eos_token_id, c.pad_token_id) == (127, 126, 126)
  assert (c.eot_token_id, c.bos_token_id) == (None, None)  # no tokenizer, outside the tiny vocab
  p = {k: v.astype(np.float64) for k, v in _params(model).items()}
  t = {k: v.astype(np.float64) for k, v in tensors.items()}
  x = np.random.default_rng(0).standard_normal(32)
  for i in range(2):
    pre = f"model.transformer.blocks.{i}."
    for name in ("q_proj", "k_proj", "v_proj"):
      torch_out = (t[pre + name + ".weight"] @ x).reshape(4, 8)  # feature = head·hd + d
      np.testing.assert_allclose(np.einsum("d,dhk->hk", x, p[f"blocks.{name}"][i]), torch_out, atol=1e-12)
    att = np.random.default_rng(1).standard_normal((4, 8))
    np.testing.assert_allclose(np.einsum("hk,hkd->d", att, p["blocks.o_proj"][i]),
                               t[pre + "attn_out.weight"] @ att.reshape(-1), atol=1e-12)
    np.testing.assert_allclose(x @ p["blocks.gate_proj"][i], t[pre + "ff_proj.weight"] @ x, atol=1e-12)
    np.testing.assert_allclose(x @ p["blocks.up_proj"][i], t[pre + "up_proj.weight"] @ x, atol=1e-12)
    h = np.random.default_rng(2).standard_normal(64)
    np.testing.assert_allclose(h @ p["blocks.down_proj"][i], t[pre + "ff_out.weight"] @ h, atol=1e-12)
    np.testing.assert_array_equal(p["blocks.attn_norm"][i], t[pre + "attn_norm.weight"])
    np.testing.assert_array_equal(p["blocks.ffn_norm"][i], t[pre + "ff_norm.weight"])
  np.testing.assert_array_equal(p["embed"], t["model.transformer.wte.weight"])
  np.testing.assert_array_equal(p["lm_head"], t["model.transformer.ff_out.weight"].T)
  np.testing.assert_array_equal(p["final_norm"], t["model.transformer.ln_f.weight"])


def test_dream_config_and_mapping(dream_dir):
  model, info = load_pretrained(dream_dir, param_dtype="float32")
  c = model.config
  assert info.family == "dream" and info.weight_map is None
  assert (c.family, c.n_heads, c.n_kv_heads, c.head_dim, c.qkv_bias, c.logit_alignment,
          c.positions_from_padding, c.rope_theta, c.norm_eps) == (
              "dream", 4, 2, 8, True, "shifted", True, 1e6, 1e-6)
  assert (c.mask_token_id, c.eos_token_id, c.pad_token_id, c.bos_token_id) == (159, 156, 156, 156)
  assert c.param_dtype == "float32" and model.blocks.q_proj[...].dtype == np.float32
  tensors = hf_fixtures.read_all_tensors(dream_dir)
  x = np.random.default_rng(0).standard_normal(32)
  k_torch = tensors["model.layers.1.self_attn.k_proj.weight"].astype(np.float64) @ x \
      + tensors["model.layers.1.self_attn.k_proj.bias"].astype(np.float64)
  p = _params(model)
  k_flax = np.einsum("d,dhk->hk", x, p["blocks.k_proj"][1].astype(np.float64)) + p["blocks.k_bias"][1]
  np.testing.assert_allclose(k_flax.reshape(-1), k_torch, atol=1e-12)


def test_special_ids_come_from_the_tokenizer(tmp_path):
  """Specials at 0..5 in a trained BPE, none in config.json: the model config must use them."""
  hf_fixtures.make_llada_checkpoint(tmp_path, tokenizer="bpe")
  tok = hf_fixtures.train_tiny_bpe()
  _, info = load_pretrained(tmp_path)
  c = info.model_config
  assert c.mask_token_id == tok.token_to_id("<|mdm_mask|>") == 5
  assert c.eos_token_id == c.pad_token_id == tok.token_to_id("<|endoftext|>") == 1
  assert c.eot_token_id == tok.token_to_id("<|eot_id|>") == 4
  assert c.bos_token_id == tok.token_to_id("<|startoftext|>") == 0


def test_llada_real_special_ids(llada_dir):
  _, info = load_pretrained(llada_dir)
  c = info.model_config
  assert c.vocab_size == 126464
  assert (c.mask_token_id, c.eos_token_id, c.pad_token_id, c.eot_token_id, c.bos_token_id) == (
      126336, 126081, 126081, 126348, 126080)


# ------------------------------------------------------------------------------------------------
# Round trips
# ------------------------------------------------------------------------------------------------

def test_sharded_round_trip_is_bit_exact(llada_dir, tmp_path):
  model, info = load_pretrained(llada_dir)
  out = save_pretrained(model, tmp_path / "out", info=info)
  _assert_same_tensor_bytes(llada_dir, out)
  # Same config keys and values, same shard layout, tokenizer files copied.
  assert json.loads((out / "config.json").read_text()) == json.loads((llada_dir / "config.json").read_text())
  index = json.loads((out / "model.safetensors.index.json").read_text())
  original = json.loads((llada_dir / "model.safetensors.index.json").read_text())
  assert index == original
  for name in ("tokenizer.json", "tokenizer_config.json"):
    assert (out / name).read_bytes() == (llada_dir / name).read_bytes()
  model2, info2 = load_pretrained(out)
  _assert_same_params(model, model2)
  assert info2.model_config == info.model_config


def test_single_file_round_trip_and_resharding(dream_dir, tmp_path):
  model, info = load_pretrained(dream_dir)
  single = save_pretrained(model, tmp_path / "single", info=info)
  assert sorted(p.name for p in single.iterdir()) == ["config.json", "model.safetensors"]
  _assert_same_tensor_bytes(dream_dir, single)
  resharded = save_pretrained(model, tmp_path / "resharded", info=info, max_shard_size="20KB")
  index = json.loads((resharded / "model.safetensors.index.json").read_text())
  shards = sorted(set(index["weight_map"].values()))
  assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
  tensors = hf_fixtures.read_all_tensors(resharded)
  assert index["metadata"]["total_size"] == sum(t.nbytes for t in tensors.values())
  for shard in shards:  # each shard respects the limit unless it holds one oversize tensor
    size = sum(tensors[n].nbytes for n, s in index["weight_map"].items() if s == shard)
    assert size <= 20_000 or sum(1 for s in index["weight_map"].values() if s == shard) == 1
  _assert_same_tensor_bytes(dream_dir, resharded)
  model2, _ = load_pretrained(resharded)
  _assert_same_params(model, model2)


def test_fp32_load_saves_the_original_bf16_bytes(dream_dir, tmp_path):
  model, info = load_pretrained(dream_dir, param_dtype="float32")
  assert model.embed[...].dtype == np.float32
  out = save_pretrained(model, tmp_path / "out", info=info)
  _assert_same_tensor_bytes(dream_dir, out)


def test_save_without_info_generates_a_loadable_config(tmp_path):
  config = get_preset("tiny")  # byte vocabulary, GQA 4/2, fp32
  model = _random_model(config)
  out = save_pretrained(model, tmp_path / "tiny_hf")
  hf_config = json.loads((out / "config.json").read_text())
  assert hf_config["model_type"] == "llada" and hf_config["n_kv_heads"] == 2
  assert hf_config["torch_dtype"] == "float32" and hf_config["mask_token_id"] == 256
  loaded, info = load_pretrained(out)
  assert info.tensor_dtype == "F32"
  _assert_same_params(model, loaded)
  runtime = ("max_seq_len", "logprob_chunk_size")
  assert loaded.config == config.replace(**{k: getattr(loaded.config, k) for k in runtime})


def test_save_refuses_to_overwrite_weights(dream_dir, tmp_path):
  model, info = load_pretrained(dream_dir)
  save_pretrained(model, tmp_path / "o", info=info)
  with pytest.raises(CheckpointError, match="already holds weights"):
    save_pretrained(model, tmp_path / "o", info=info)
  save_pretrained(model, tmp_path / "o", info=info, max_shard_size="20KB", overwrite=True)
  assert not (tmp_path / "o" / "model.safetensors").exists()  # stale single file removed
  _assert_same_tensor_bytes(dream_dir, tmp_path / "o")


# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------

def _copy_dream(src, dst, *, tensors=None, config=None):
  dst.mkdir()
  hf_fixtures.write_config(dst, config or json.loads((src / "config.json").read_text()))
  tensors = tensors if tensors is not None else hf_fixtures.read_all_tensors(src)
  safetensors.numpy.save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
  return dst


def test_error_missing_folder_and_files(tmp_path, dream_dir):
  with pytest.raises(CheckpointError, match="does not exist"):
    load_pretrained(tmp_path / "nope")
  (tmp_path / "empty").mkdir()
  with pytest.raises(CheckpointError, match="config.json"):
    load_pretrained(tmp_path / "empty")
  hf_fixtures.write_config(tmp_path / "no_weights", hf_fixtures.dream_config())
  with pytest.raises(CheckpointError, match="model.safetensors"):
    load_pretrained(tmp_path / "no_weights")


def test_error_unknown_model_type(tmp_path, dream_dir):
  config = dict(json.loads((dream_dir / "config.json").read_text()), model_type="gpt2")
  folder = _copy_dream(dream_dir, tmp_path / "x", config=config)
  with pytest.raises(CheckpointError, match="unknown model_type 'gpt2'"):
    load_pretrained(folder)


def test_error_missing_and_unexpected_tensor(tmp_path, dream_dir):
  tensors = hf_fixtures.read_all_tensors(dream_dir)
  name = "model.layers.1.self_attn.v_proj.bias"
  missing = _copy_dream(dream_dir, tmp_path / "missing", tensors={k: v for k, v in tensors.items() if k != name})
  with pytest.raises(CheckpointError, match=f"missing tensor '{name}'"):
    load_pretrained(missing)
  extra = dict(tensors, **{"model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(4, ml_dtypes.bfloat16)})
  unexpected = _copy_dream(dream_dir, tmp_path / "unexpected", tensors=extra)
  with pytest.raises(CheckpointError, match="unexpected tensor 'model.layers.0.self_attn.rotary_emb.inv_freq'"):
    load_pretrained(unexpected)


def test_error_misshaped_and_wrong_dtype(tmp_path, dream_dir):
  tensors = hf_fixtures.read_all_tensors(dream_dir)
  name = "model.layers.0.mlp.up_proj.weight"
  bad_shape = dict(tensors, **{name: tensors[name][:, :16]})
  folder = _copy_dream(dream_dir, tmp_path / "shape", tensors=bad_shape)
  with pytest.raises(CheckpointError, match=rf"'{name}'.*shape \[64, 16\], expected \[64, 32\]"):
    load_pretrained(folder)
  bad_dtype = dict(tensors, **{name: tensors[name].astype(np.float32)})
  folder = _copy_dream(dream_dir, tmp_path / "dtype", tensors=bad_dtype)
  with pytest.raises(CheckpointError, match=rf"'{name}'.*dtype F32, expected BF16"):
    load_pretrained(folder)


def test_error_index_points_to_missing_shard(tmp_path):
  hf_fixtures.make_llada_checkpoint(tmp_path, sharded=True)
  (tmp_path / "model-00002-of-00002.safetensors").unlink()
  with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
    load_pretrained(tmp_path)


def test_error_truncated_file(tmp_path, dream_dir):
  folder = _copy_dream(dream_dir, tmp_path / "trunc")
  data = (folder / "model.safetensors").read_bytes()
  (folder / "model.safetensors").write_bytes(data[:-10])
  with pytest.raises(CheckpointError, match="model.safetensors"):
    load_pretrained(folder)


def test_unsupported_llada_options_are_rejected(tmp_path):
  hf_fixtures.make_llada_checkpoint(tmp_path, sharded=False, weight_tying=True)
  with pytest.raises(CheckpointError, match="weight_tying"):
    load_pretrained(tmp_path)


# ------------------------------------------------------------------------------------------------
# Conversion HF <-> project checkpoint
# ------------------------------------------------------------------------------------------------

def _convert_module():
  spec = importlib.util.spec_from_file_location("dmpo_convert", REPO_ROOT / "launch" / "convert.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_convert_hf_to_orbax_and_back_is_bit_exact(llada_dir, tmp_path):
  convert = _convert_module()
  convert.hf_to_orbax(llada_dir, tmp_path / "orbax")
  from dmpo_jax import checkpointing
  restored = checkpointing.load_model_checkpoint(tmp_path / "orbax")
  model, _ = load_pretrained(llada_dir)
  _assert_same_params(model, restored)
  convert.orbax_to_hf(tmp_path / "orbax", tmp_path / "hf")
  _assert_same_tensor_bytes(llada_dir, tmp_path / "hf")
  assert json.loads((tmp_path / "hf" / "config.json").read_text()) == \
      json.loads((llada_dir / "config.json").read_text())
  assert (tmp_path / "hf" / "tokenizer.json").read_bytes() == (llada_dir / "tokenizer.json").read_bytes()
  assert not (tmp_path / "hf" / "hf_files").exists()
  from dmpo_jax.models.tokenizer import load_tokenizer
  tok = load_tokenizer(tmp_path / "orbax")  # found in <checkpoint>/hf_files
  assert (tok.mask_token_id, tok.eot_token_id, tok.bos_token_id) == (126336, 126348, 126080)


# ------------------------------------------------------------------------------------------------
# Hostile / broken folders: every config field, every shard path, every parse failure
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family,key,value,message", [
    ("llada", "n_heads", 0, "n_heads must be >= 1, got 0"),
    ("llada", "d_model", "big", "d_model must be an integer, got 'big'"),
    ("llada", "d_model", 30, "d_model=30 is not a multiple of n_heads=4"),
    ("llada", "n_layers", -1, "n_layers must be >= 1"),
    ("llada", "n_layers", True, "n_layers must be an integer, got True"),
    ("llada", "n_kv_heads", 2.5, "n_kv_heads must be an integer, got 2.5"),
    ("llada", "mlp_hidden_size", [64], "mlp_hidden_size must be an integer"),
    ("llada", "rope_theta", "NaN", "rope_theta must be a finite number"),
    ("llada", "rope_theta", 0, "rope_theta must be > 0"),
    ("llada", "rms_norm_eps", -1e-5, "rms_norm_eps must be > 0"),
    ("llada", "include_qkv_bias", "yes", "include_qkv_bias must be true or false"),
    ("llada", "max_sequence_length", 0, "max_sequence_length must be >= 1"),
    ("llada", "embedding_size", 1e400, "embedding_size must be an integer"),
    ("llada", "mask_token_id", -3, "mask_token_id must be >= 0"),
    ("llada", "model_type", 7, "model_type must be a string"),
    ("dream", "num_attention_heads", 0, "num_attention_heads must be >= 1, got 0"),
    ("dream", "hidden_size", "big", "hidden_size must be an integer"),
    ("dream", "num_key_value_heads", 3, "n_heads \\(4\\) must be a multiple of n_kv_heads \\(3\\)"),
    ("dream", "head_dim", 0, "head_dim must be >= 1"),
    ("dream", "intermediate_size", None, "missing required key 'intermediate_size'"),
    ("dream", "eos_token_id", "</s>", "eos_token_id must be an integer"),
])
def test_every_bad_config_field_is_a_checkpoint_error_naming_the_file(tmp_path, family, key, value, message):
  hf_config = hf_fixtures.llada_config() if family == "llada" else hf_fixtures.dream_config()
  hf_config[key] = value
  hf_fixtures.write_config(tmp_path, hf_config)
  (tmp_path / "config.json").write_text((tmp_path / "config.json").read_text().replace('"NaN"', "NaN"))
  with pytest.raises(CheckpointError, match=rf"{tmp_path / 'config.json'}.*{message}"):
    hf_io.model_config_from_hf(tmp_path)


def test_model_config_rejects_wrong_types_without_bare_exceptions():
  with pytest.raises(ValueError, match="d_model must be an integer, got 'big'"):
    get_preset("tiny", d_model="big")
  with pytest.raises(ValueError, match="n_heads must be positive, got 0"):
    get_preset("tiny", n_heads=0)
  with pytest.raises(ValueError, match="norm_eps must be a finite number, got inf"):
    get_preset("tiny", norm_eps=float("inf"))
  with pytest.raises(ValueError, match="remat must be true or false"):
    get_preset("tiny", remat="no")


def _llada_with_index(folder, edit):
  hf_fixtures.make_llada_checkpoint(folder, sharded=True)
  index = json.loads((folder / "model.safetensors.index.json").read_text())
  edit(folder, index)
  (folder / "model.safetensors.index.json").write_text(json.dumps(index))
  return folder


def test_shard_paths_outside_the_folder_are_refused(tmp_path):
  shard = "model-00002-of-00002.safetensors"

  def to_outside(folder, index):  # a complete shard one level up: it would load
    (folder.parent / "outside.safetensors").write_bytes((folder / shard).read_bytes())
    index["weight_map"] = {k: "../outside.safetensors" if v == shard else v
                           for k, v in index["weight_map"].items()}
  folder = _llada_with_index(tmp_path / "up", to_outside)
  with pytest.raises(CheckpointError, match=r"index.json: shard path '../outside.safetensors' must be "
                                            "a relative path inside"):
    load_pretrained(folder)

  def absolute(folder, index):
    index["weight_map"] = {k: str(folder / v) for k, v in index["weight_map"].items()}
  with pytest.raises(CheckpointError, match="must be a relative path inside"):
    load_pretrained(_llada_with_index(tmp_path / "abs", absolute))

  def link_out(folder, index):
    outside = tmp_path / "elsewhere.safetensors"
    (folder / shard).rename(outside)
    (folder / shard).symlink_to(outside)
  with pytest.raises(CheckpointError, match=rf"shard '{shard}' resolves to .*elsewhere.safetensors, "
                                            "outside"):
    load_pretrained(_llada_with_index(tmp_path / "link", link_out))

  def not_a_name(folder, index):
    index["weight_map"][next(iter(index["weight_map"]))] = 3
  with pytest.raises(CheckpointError, match="weight_map values must be shard file names"):
    load_pretrained(_llada_with_index(tmp_path / "int", not_a_name))


def test_hub_cache_snapshot_links_into_its_blobs_still_load(tmp_path):
  """HF hub cache layout: snapshots/<rev>/<file> -> ../../blobs/<sha> is inside the repository."""
  source = tmp_path / "source"
  hf_fixtures.make_llada_checkpoint(source, sharded=True)
  snapshot = tmp_path / "models--x--y" / "snapshots" / "abc123"
  blobs = tmp_path / "models--x--y" / "blobs"
  snapshot.mkdir(parents=True)
  blobs.mkdir()
  for i, file in enumerate(sorted(source.iterdir())):
    (blobs / f"blob{i}").write_bytes(file.read_bytes())
    (snapshot / file.name).symlink_to(pathlib.Path("..", "..", "blobs", f"blob{i}"))
  _assert_same_params(load_pretrained(snapshot)[0], load_pretrained(source)[0])


def test_parse_failures_are_checkpoint_errors_naming_the_file(tmp_path, dream_dir):
  folder = _copy_dream(dream_dir, tmp_path / "deep")
  header = ("[" * 100000 + "]" * 100000).encode()
  data = (folder / "model.safetensors").read_bytes()
  (folder / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + data[8:])
  with pytest.raises(CheckpointError, match=r"model.safetensors: not a valid safetensors file \(.*"
                                            "invalid JSON in header: invalid type: sequence"):
    load_pretrained(folder)
  header = b'{"a": {"dtype": "F32", "shape": ["2"], "data_offsets": [0, 8]}}'
  (folder / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bytes(8))
  with pytest.raises(CheckpointError, match=r"model.safetensors: not a valid safetensors file \(.*"
                                            r"invalid type: string \"2\", expected usize"):
    load_pretrained(folder)
  header = b'[1, 2]'
  (folder / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
  with pytest.raises(CheckpointError, match=r"model.safetensors: not a valid safetensors file \(.*"
                                            "expected struct HashMetadata"):
    load_pretrained(folder)

  for name, text in (("config.json", '{"model_type": "Dream",'), ("config.json", "[" * 100000),
                     ("config.json", b"\xff\xfe{}")):
    bad = _copy_dream(dream_dir, tmp_path / f"bad{len(text)}")
    (bad / name).write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(CheckpointError, match=rf"{bad / name} is not valid JSON"):
      load_pretrained(bad)
  index_folder = _llada_with_index(tmp_path / "index", lambda folder, index: None)
  (index_folder / "model.safetensors.index.json").write_text('{"weight_map": ')
  with pytest.raises(CheckpointError, match=r"model.safetensors.index.json is not valid JSON"):
    load_pretrained(index_folder)
  tok = _copy_dream(dream_dir, tmp_path / "tok")
  (tok / "tokenizer.json").write_text('{"version": ')
  with pytest.raises(CheckpointError, match=rf"{tok / 'tokenizer.json'} cannot be parsed"):
    load_pretrained(tok)
