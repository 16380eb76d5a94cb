"""THE model loader of training, evaluation, generation and conversion.

A model comes from one of three places:

* an HF folder (``config.json`` + safetensors): `hf_io.load_pretrained`, which also returns the
  `HFCheckpointInfo` a conversion back to HF needs;
* a model checkpoint of this project (``model_config.json`` + ``params/``, written by
  `checkpointing.save_model_checkpoint`: a trained run's ``final_model``, `launch/convert.py`);
* a `ModelConfig` preset with random weights (tests, the demo, ``launch/generate.py --preset``).

Every array is read (or initialised) straight into its sharding on ``mesh`` (`sharding.TRAIN_RULES`
unless ``shardings`` are given). ``param_dtype`` overrides the stored parameter dtype (cast while
reading). Compute options (``dtype``, ``remat``, ``use_key_padding_mask``, ``attention_impl``, …)
are `ModelConfig` overrides; for an HF folder an unset ``dtype`` follows the parameter dtype, for a
project checkpoint it stays as stored.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Optional

import jax
from flax import nnx

# The CLI layer's error type and folder check (`dmpo_jax.errors` in the layered package).
from dmpo_jax import checkpointing, errors, sharding
from dmpo_jax.models import config as model_config_lib, hf_io
from dmpo_jax.models import tokenizer as tokenizer_lib
from dmpo_jax.models.transformer import Transformer, create_model

HF_FOLDER, CHECKPOINT = "hf", "checkpoint"


@dataclasses.dataclass
class LoadedModel:
  """A loaded model; ``hf_info`` only for an HF folder (raw config, dtype, shard layout)."""
  model: Transformer
  hf_info: Optional[hf_io.HFCheckpointInfo] = None
  source: str = ""  # HF_FOLDER, CHECKPOINT or "preset"


def model_format(path: Any) -> str:
  """`HF_FOLDER` or `CHECKPOINT`; a path that is neither raises one `UserError` line."""
  folder = pathlib.Path(path)
  if (folder / checkpointing.MODEL_CONFIG_FILE).is_file():
    return CHECKPOINT
  if (folder / hf_io.CONFIG_FILE).is_file():
    return HF_FOLDER
  raise errors.UserError(f"model checkpoint {errors.model_folder_problem(str(path))}")


def load_model(path: Any = None, *, preset: Optional[str] = None,
               mesh: Optional[jax.sharding.Mesh] = None, shardings: Any = None,
               param_dtype: Optional[str] = None, seed: int = 0, **overrides: Any) -> LoadedModel:
  """The model at ``path`` (an HF folder or a project model checkpoint) or, without a path, the
  ``preset`` with random weights from ``seed``; on ``mesh`` / ``shardings`` when given.
  ``overrides``: `ModelConfig` compute fields (``dtype``, ``remat``, ...)."""
  if bool(path) == bool(preset):
    raise ValueError("load_model: give exactly one of a checkpoint path and a preset")
  if preset:
    config = model_config_lib.get_preset(
        preset, **overrides, **({"param_dtype": param_dtype} if param_dtype else {}))
    return LoadedModel(_placed(create_model(config, seed=seed), mesh, shardings), None, "preset")
  if model_format(path) == HF_FOLDER:
    model, info = hf_io.load_pretrained(path, mesh=mesh, shardings=shardings,
                                        param_dtype=param_dtype, **overrides)
    return LoadedModel(model, info, HF_FOLDER)
  model = checkpointing.load_model_checkpoint(path, mesh=mesh, shardings=shardings,
                                              dtype=param_dtype)
  changed = {k: v for k, v in overrides.items() if getattr(model.config, k) != v}
  if changed:
    model = _with_config(model, model.config.replace(**changed))
  return LoadedModel(model, None, CHECKPOINT)


def load_tokenizer(source: Any, model_config: Any) -> Any:
  """``"byte"`` or a folder with ``tokenizer.json`` (a project checkpoint converted from HF keeps
  it in ``hf_files/``), with the model family's special tokens."""
  return tokenizer_lib.load_tokenizer(source, family=model_config.family)


def load_model_and_tokenizer(config: Any, mesh: jax.sharding.Mesh) -> tuple[Transformer, Any]:
  """The model (sharded on ``mesh``) and tokenizer named by a training config's ``model`` block
  and ``tokenizer`` (default: the checkpoint's)."""
  overrides = {"remat": bool(config.model.remat),
               "use_key_padding_mask": bool(config.model.use_key_padding_mask),
               "attention_impl": config.model.get("attention_impl", "auto")}
  if config.model.dtype:
    overrides["dtype"] = config.model.dtype
  path = config.model.checkpoint
  loaded = load_model(path or None, preset=None if path else config.model.preset, mesh=mesh,
                      param_dtype=config.model.param_dtype or None, seed=config.seed, **overrides)
  return loaded.model, load_tokenizer(config.tokenizer or path, loaded.model.config)


def _placed(model: Transformer, mesh: Optional[jax.sharding.Mesh], shardings: Any) -> Transformer:
  """``model`` with its arrays on ``shardings`` (or ``mesh``'s `sharding.TRAIN_RULES`)."""
  if mesh is None and shardings is None:
    return model
  graphdef, state = nnx.split(model)
  if shardings is None:
    shardings = sharding.state_shardings(state, mesh)
  return nnx.merge(graphdef, jax.device_put(state, shardings))


def _with_config(model: Transformer, new_config: Any) -> Transformer:
  """The same parameters under a config that differs only in compute options."""
  _, state = nnx.split(model)
  new_graphdef, _ = nnx.split(nnx.eval_shape(lambda: create_model(new_config)))
  return nnx.merge(new_graphdef, state)
