"""Hugging Face checkpoint I/O for LLaDA and Dream (`docs/llada.md` §1, §3, §9).

A HF folder holds ``config.json``, the weights as ``model.safetensors`` or as shards listed in
``model.safetensors.index.json``, and optionally the tokenizer files. `load_pretrained` maps the
per-layer PyTorch tensors onto the stacked parameters of `Transformer`; `save_pretrained` writes
them back under the same names, shapes and dtype so that PyTorch / HF code can load the result.

Modules: `safetensors_io` (the folder's files, read and written through the `safetensors`
library), `names` (HF tensor names and layouts), `hf_config` (config.json <-> `ModelConfig`,
special ids), `validate` (config values and tensors against the model), `load`, `save`.
"""

# safetensors_io first: it defines `CheckpointError`, which `models.finite` (imported by `load`)
# takes from this package.
from dmpo_jax.models.hf_io.safetensors_io import (
    CONFIG_FILE, INDEX_FILE, SAFETENSORS_DTYPES, SINGLE_WEIGHTS_FILE, CheckpointError,
    SafetensorsFiles, TensorEntry, read_safetensors_header, read_tensor_index, write_safetensors)
from dmpo_jax.models.hf_io.names import TensorSpec, tensor_specs
from dmpo_jax.models.hf_io.validate import check_tensors
from dmpo_jax.models.hf_io.hf_config import (
    SPECIAL_TOKEN_FIELDS, SPECIAL_TOKEN_STRINGS, TOKENIZER_CONFIG_FILE, TOKENIZER_FILE,
    HFCheckpointInfo, family_of, hf_config_from_model_config, model_config_from_hf,
    read_hf_config, resolve_special_token_ids)
from dmpo_jax.models.hf_io.load import abstract_model, load_pretrained, read_checkpoint_info
from dmpo_jax.models.hf_io.save import (
    DEFAULT_MAX_SHARD_SIZE, HF_FILES_DIR, TOKENIZER_FILES, copy_tokenizer_files, parse_size,
    save_pretrained)

__all__ = [
    "CONFIG_FILE", "INDEX_FILE", "SAFETENSORS_DTYPES", "SINGLE_WEIGHTS_FILE", "CheckpointError",
    "SafetensorsFiles", "TensorEntry", "read_safetensors_header", "read_tensor_index",
    "write_safetensors", "TensorSpec", "tensor_specs", "check_tensors", "SPECIAL_TOKEN_FIELDS",
    "SPECIAL_TOKEN_STRINGS", "TOKENIZER_CONFIG_FILE", "TOKENIZER_FILE", "HFCheckpointInfo",
    "family_of", "hf_config_from_model_config", "model_config_from_hf", "read_hf_config",
    "resolve_special_token_ids", "abstract_model", "load_pretrained", "read_checkpoint_info",
    "DEFAULT_MAX_SHARD_SIZE", "HF_FILES_DIR", "TOKENIZER_FILES", "copy_tokenizer_files",
    "parse_size", "save_pretrained",
]
