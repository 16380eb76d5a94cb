"""Checkpoints (`docs/checkpoints.md`): the project's model format (`model_export`),
resumable training checkpoints (`train_state`), the SHA-256 digests both formats store and check
before reading anything back (`integrity`), and preemption handling (`preemption`).

A digest mismatch raises `CheckpointIntegrityError` naming the step (training checkpoints), the
item and the file. The digests are of the bytes on disk, so they do not depend on how the arrays
are sharded when saved or restored.
"""

from dmpo_jax.checkpointing import integrity
from dmpo_jax.checkpointing.integrity import CheckpointIntegrityError
from dmpo_jax.checkpointing.model_export import (
    MODEL_CHECKSUMS_FILE, MODEL_CONFIG_FILE, MODEL_METADATA_FILE, MODEL_PARAMS_DIR,
    load_model_checkpoint, load_model_config, load_model_metadata, save_model_checkpoint)
from dmpo_jax.checkpointing.preemption import PreemptionHandler
from dmpo_jax.checkpointing.train_state import (
    CORRUPT_PREFIX, ITERATOR_ITEM, METADATA_ITEM, STATE_ITEM, STEP_CHECKSUMS_FILE, STEP_ITEMS,
    RestoredCheckpoint, TrainCheckpointer)
from dmpo_jax.models.hf_io import CheckpointError

__all__ = [
    "integrity", "CheckpointError", "CheckpointIntegrityError", "MODEL_CHECKSUMS_FILE",
    "MODEL_CONFIG_FILE", "MODEL_METADATA_FILE", "MODEL_PARAMS_DIR", "load_model_checkpoint",
    "load_model_config", "load_model_metadata", "save_model_checkpoint", "PreemptionHandler",
    "CORRUPT_PREFIX", "ITERATOR_ITEM", "METADATA_ITEM", "STATE_ITEM", "STEP_CHECKSUMS_FILE",
    "STEP_ITEMS", "RestoredCheckpoint", "TrainCheckpointer",
]
