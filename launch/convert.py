"""Converts between a Hugging Face folder (LLaDA / Dream) and the project's model checkpoint.

  python launch/convert.py --direction=hf_to_orbax --input=/models/LLaDA-8B-Instruct --output=/ckpt/llada
  python launch/convert.py --direction=orbax_to_hf --input=/ckpt/llada --output=/models/llada-rl

``hf_to_orbax`` stores the raw HF config, dtype and shard layout (`HFCheckpointInfo`) in the model
checkpoint's metadata and copies config.json and the tokenizer / remote-code files into
``<output>/hf_files`` (`load_tokenizer(<output>)` finds the tokenizer there);
``orbax_to_hf`` uses them to write the original layout back (bit-exact for unchanged weights).
For a checkpoint without that metadata (e.g. one written by training), ``--reference_hf`` names
a HF folder whose config.json, dtype, shard layout and tokenizer files are used instead;
without either, a config.json is generated from the `ModelConfig`.

The output is written into a temporary folder next to ``--output`` and renamed when complete:
a failure (a full disk, Ctrl-C) leaves no partial output, and a file-system error is one line
naming the path.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import shutil
import sys
from typing import Optional

from absl import flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from dmpo_jax import checkpointing, cli, workdir as workdir_lib  # noqa: E402
from dmpo_jax.inference import model_loading  # noqa: E402
from dmpo_jax.models import hf_io  # noqa: E402

HF_METADATA_KEY = "hf_checkpoint"
HF_FILES_DIR = hf_io.HF_FILES_DIR
_log = logging.getLogger("dmpo_jax.convert")

FLAGS = flags.FlagValues()

_DIRECTION = flags.DEFINE_enum("direction", None, ["hf_to_orbax", "orbax_to_hf"],
                               "Conversion direction.", flag_values=FLAGS)
_INPUT = flags.DEFINE_string("input", None, "Source folder.", flag_values=FLAGS)
_OUTPUT = flags.DEFINE_string("output", None, "Destination folder.", flag_values=FLAGS)
_PARAM_DTYPE = flags.DEFINE_enum("param_dtype", None, ["float32", "bfloat16", "float16"],
                                 "hf_to_orbax: dtype of the stored params (default: the HF dtype).",
                                 flag_values=FLAGS)
_MAX_SHARD_SIZE = flags.DEFINE_string("max_shard_size", None,
                                      "orbax_to_hf: e.g. '5GB' (default: the original layout).",
                                      flag_values=FLAGS)
_REFERENCE_HF = flags.DEFINE_string("reference_hf", None,
                                    "orbax_to_hf: HF folder giving config.json / tokenizer files.",
                                    flag_values=FLAGS)
_TOKENIZER_FROM = flags.DEFINE_string("tokenizer_from", None,
                                      "orbax_to_hf: folder whose tokenizer files are copied.",
                                      flag_values=FLAGS)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing output.", flag_values=FLAGS)


def hf_to_orbax(input_dir, output_dir, *, param_dtype: Optional[str] = None,
                overwrite: bool = False) -> pathlib.Path:
  """HF folder -> model checkpoint (+ HF metadata and ``hf_files/``)."""
  loaded = model_loading.load_model(input_dir, param_dtype=param_dtype)
  if loaded.hf_info is None:
    raise ValueError(f"{input_dir} is no HF folder (config.json + safetensors): --direction="
                     "hf_to_orbax converts one")
  model, info = loaded.model, loaded.hf_info
  out = checkpointing.save_model_checkpoint(output_dir, model, model.config,
                                            {HF_METADATA_KEY: info.to_json_dict()},
                                            overwrite=overwrite)
  (out / HF_FILES_DIR).mkdir(exist_ok=True)
  copied = hf_io.copy_tokenizer_files(input_dir, out / HF_FILES_DIR)
  # config.json too, so `load_tokenizer(<checkpoint>)` resolves the same special ids.
  shutil.copyfile(pathlib.Path(input_dir) / hf_io.CONFIG_FILE, out / HF_FILES_DIR / hf_io.CONFIG_FILE)
  _log.info("Wrote %s (%d parameters, %s); copied %s", out, model.config.num_params(),
               info.tensor_dtype, copied)
  return out


def orbax_to_hf(input_dir, output_dir, *, reference_hf=None, tokenizer_from=None,
                max_shard_size=None, overwrite: bool = False) -> pathlib.Path:
  """Model checkpoint -> HF folder."""
  input_dir = pathlib.Path(input_dir)
  loaded = model_loading.load_model(input_dir)
  if loaded.source != model_loading.CHECKPOINT:
    raise ValueError(f"{input_dir} is no dmpo_jax model checkpoint (model_config.json + params/): "
                     "--direction=orbax_to_hf converts one")
  model = loaded.model
  if reference_hf is not None:
    info = hf_io.read_checkpoint_info(reference_hf)
    tokenizer_from = tokenizer_from or reference_hf
  else:
    metadata = checkpointing.load_model_metadata(input_dir)
    info = (hf_io.HFCheckpointInfo.from_json_dict(metadata[HF_METADATA_KEY])
            if HF_METADATA_KEY in metadata else None)
    if tokenizer_from is None and (input_dir / HF_FILES_DIR).is_dir():
      tokenizer_from = input_dir / HF_FILES_DIR
  if info is not None:
    info = dataclasses.replace(info, source_path=None, model_config=model.config)
  out = hf_io.save_pretrained(model, output_dir, info=info, tokenizer_files_from=tokenizer_from,
                              max_shard_size=max_shard_size, overwrite=overwrite)
  _log.info("Wrote %s", out)
  return out


flags.mark_flags_as_required(["direction", "input", "output"], flag_values=FLAGS)


def _check_output(output: str, overwrite: bool) -> pathlib.Path:
  path = pathlib.Path(output)
  cli.check(bool(output.strip()), "--output is empty: give the folder to write")
  cli.check(not path.exists() or path.is_dir(), f"--output {output} is a file, not a folder")
  cli.check(overwrite or not path.exists() or not any(path.iterdir()),
            f"--output {output} already exists; pass --overwrite to replace it")
  return path


def _run() -> int:
  cli.require_path("input", _INPUT.value, "source folder")
  cli.check(pathlib.Path(_INPUT.value).is_dir(), f"--input {_INPUT.value} is a file, not a model "
            "folder (an HF folder with config.json or a dmpo_jax model checkpoint)")
  if _REFERENCE_HF.value:
    cli.require_path("reference_hf", _REFERENCE_HF.value, "HF folder")
  if _TOKENIZER_FROM.value:
    cli.require_path("tokenizer_from", _TOKENIZER_FROM.value, "tokenizer folder")
  output = _check_output(_OUTPUT.value, _OVERWRITE.value)
  workdir_lib.remove_temporaries(output)  # left by an interrupted conversion
  temporary = workdir_lib.temporary_sibling(output.absolute())
  try:
    with cli.user_input(f"--input={_INPUT.value}", ValueError, FileNotFoundError, FileExistsError), \
        workdir_lib.storage_operation("write", output):
      if _DIRECTION.value == "hf_to_orbax":
        hf_to_orbax(_INPUT.value, temporary, param_dtype=_PARAM_DTYPE.value)
      else:
        orbax_to_hf(_INPUT.value, temporary, reference_hf=_REFERENCE_HF.value,
                    tokenizer_from=_TOKENIZER_FROM.value, max_shard_size=_MAX_SHARD_SIZE.value)
    out = workdir_lib.publish_folder(temporary, output)
  finally:
    if temporary.exists():
      shutil.rmtree(temporary, ignore_errors=True)
  print(out)
  return 0


def main(argv=None) -> int:
  return cli.run_main(_run, FLAGS, argv, doc=__doc__)


if __name__ == "__main__":
  sys.exit(main())
