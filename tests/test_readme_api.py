"""Runs the README's Python API example on a tiny synthetic LLaDA checkpoint
(tests/helpers/hf_fixtures.py).

The block is taken verbatim from README.md ("### Python API"); only the checkpoint path is
replaced. It runs in a subprocess with XLA's fast-compile CPU options (code generation only, no
change to the numerics), then the test checks what the block computed.
"""

import pathlib
import re
import subprocess
import sys

import pytest

from tests.helpers import hf_fixtures

REPO = pathlib.Path(__file__).resolve().parents[1]
README_CHECKPOINT = '"/models/LLaDA-8B-Instruct"'

CHECKS = '''
assert len(completions) == 4 and all(isinstance(c, str) for c in completions)
assert rewards.shape == (4,)
# The sampler leaves the prompt in place and fills every generated position.
assert (sequences[:, :ids.shape[1]] == ids).all()
assert sequences.shape == (4, ids.shape[1] + 32) and (sequences != model.config.mask_token_id).all()
# On-policy (prepared with the same params) BGPO's ratio is 1, so the loss is -mean(A) over the
# group, and group-normalised advantages sum to zero.
assert abs(float(loss.loss)) < 1e-6, float(loss.loss)
assert jax.tree.structure(grads) == jax.tree.structure(params)
assert all(np.isfinite(np.asarray(g, np.float32)).all() for g in jax.tree.leaves(grads))
print("README API OK")
'''


def python_api_block() -> str:
  readme = (REPO / "README.md").read_text()
  section = readme.split("### Python API", 1)[1].split("\n## ", 1)[0]
  blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
  assert len(blocks) == 1, "the Python API section must hold exactly one python block"
  assert README_CHECKPOINT in blocks[0]
  return blocks[0]


@pytest.mark.slow
def test_readme_python_api_runs(tmp_path):
  checkpoint = tmp_path / "llada"
  hf_fixtures.make_llada_checkpoint(checkpoint, tokenizer="bpe")
  code = python_api_block().replace(README_CHECKPOINT, repr(str(checkpoint))) + CHECKS
  env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "HOME": str(tmp_path),
         "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"}
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=600, env=env, cwd=tmp_path)
  assert result.returncode == 0, result.stderr[-4000:]
  assert result.stdout.strip().endswith("README API OK")
