"""The trained policy in ``<workdir>/final_model``, written atomically and verified.

`export` writes the model (LoRA adapters folded in, W + A B alpha/r) in the project's model
format into a temporary folder next to it, reads every array back and compares it with the
checksum written with it (`checkpointing.load_model_checkpoint`, which also refuses non-finite
weights), and only then renames the folder to ``final_model``. A crash at any point leaves
either no ``final_model`` or the complete previous one, so `is_complete` (the run is
"finished") never sees a partial model; the temporary folder of an interrupted export is
removed by the next one.
"""

from __future__ import annotations

import pathlib
import shutil

import jax
from flax import nnx

from dmpo_jax import checkpointing, sharding, workdir as workdir_lib
from dmpo_jax.models import lora

FINAL_MODEL_DIR = "final_model"


def is_complete(path: pathlib.Path) -> bool:
  """Whether ``path`` is a model folder `export` published (its config and checksums exist;
  the folder only gets its name once the whole model is written and verified)."""
  path = pathlib.Path(path)
  return ((path / checkpointing.MODEL_CONFIG_FILE).is_file()
          and (path / checkpointing.MODEL_CHECKSUMS_FILE).is_file())


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices(name)


def export(workdir: pathlib.Path, graphdef, params, mesh: jax.sharding.Mesh) -> pathlib.Path:
  """Writes, verifies and publishes ``<workdir>/final_model``; returns its absolute path. Call
  on every process (the orbax save and the read-back are collective)."""
  target = pathlib.Path(workdir).absolute() / FINAL_MODEL_DIR
  temporary = workdir_lib.temporary_sibling(target, unique=False)
  if jax.process_index() == 0:
    workdir_lib.remove_temporaries(target)
  _sync("dmpo_jax.final_model.clean")
  model = lora.merged_model(nnx.merge(graphdef, params))
  state = nnx.split(model)[1]
  try:
    with workdir_lib.storage_operation("write the final model", target,
                                       "the last checkpoint is intact: re-run the same command "
                                       "to write the final model"):
      checkpointing.save_model_checkpoint(temporary, state, model.config, overwrite=True)
      checkpointing.load_model_checkpoint(temporary,
                                          shardings=sharding.state_shardings(state, mesh))
    _sync("dmpo_jax.final_model.written")
    if jax.process_index() == 0:
      workdir_lib.publish_folder(temporary, target)
  except BaseException:
    if jax.process_index() == 0:
      shutil.rmtree(temporary, ignore_errors=True)
    raise
  _sync("dmpo_jax.final_model.published")
  return target
