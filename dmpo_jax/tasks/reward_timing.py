"""Adversarial completions and a timer for the reward-time bound (`benchmarks/reward_time.py`,
`tests/test_reward_bounds.py`).

Bound: every reward and evaluation scorer finishes in <= `TIME_BOUND_S` on any completion of up
to `text_scan.MAX_TEXT_CHARS` characters (code execution and math-verify excepted: they have
their own limits). Time is measured as the CPU time of the calling thread, which other jobs on
the machine do not inflate.
"""

from __future__ import annotations

import time
from typing import Callable, Dict, Iterator, List, Tuple

from dmpo_jax.tasks import base
from dmpo_jax.tasks import text_scan

TIME_BOUND_S = 0.050
N = text_scan.MAX_TEXT_CHARS


def _fill(unit: str, prefix: str = "", suffix: str = "") -> str:
  """``prefix + unit * k + suffix`` with k as large as fits in MAX_TEXT_CHARS characters."""
  room = N - len(prefix) - len(suffix)
  return prefix + unit * max(0, room // len(unit)) + suffix


def adversarial_completions() -> List[Tuple[str, str]]:
  """(name, completion) pairs, each at most MAX_TEXT_CHARS characters: long runs of tags,
  whitespace, braces, digits and fences that made regex extractors quadratic or worse, huge
  numbers, lone surrogates, deep nesting."""
  cases = [
      ("answer_open_tags", _fill("<answer>")),
      ("answer_open_spaces", _fill(" ", "<answer>")),
      ("answer_open_close_pairs", _fill("<answer></answer>")),
      ("answer_close_tags", _fill("</answer>")),
      ("reasoning_open_tags", _fill("<reasoning>")),
      ("soft_format_repeats", _fill("</reasoning>", "<reasoning>")),
      ("soft_format_answers", _fill("</reasoning> <answer>", "<reasoning>")),
      ("strict_format_repeats", _fill("\n</reasoning>\n<answer>\n", "<reasoning>\n")),
      ("strict_format_newlines", _fill("\n", "<reasoning>\n", "\n</answer>")),
      ("boxed_open", _fill("\\boxed{")),
      ("boxed_open_newlines", _fill("\\boxed{\n")),
      ("boxed_text_units", _fill("\\boxed{360\\text{ hours")),
      ("boxed_space", _fill("\\boxed ")),
      ("fbox_open", _fill("\\fbox{")),
      ("open_braces", _fill("{", "\\boxed")),
      ("close_braces", _fill("}", "\\boxed{")),
      ("nested_boxes", _fill("\\boxed{\\boxed{1}")),
      ("nested_boxes_closed", "\\boxed{" * (N // 8) + "}" * (N // 8 + 10)),
      ("number_free_boxes", _fill("\\boxed{\\boxed{x}}")),
      ("digits", _fill("9")),
      ("digits_in_answer", _fill("9", "<answer>", "</answer>")),
      ("digits_5000_in_answer", "<answer>1+" + "2" * 5000 + "+3</answer>"),
      ("digits_5000_boxed", "<answer>\\boxed{" + "7" * 5000 + "}</answer>"),
      ("digits_5000_countdown", "<answer>" + "1" * 5000 + "*2*3</answer>"),
      ("number_commas", _fill("1,", "<answer>", "</answer>")),
      ("decimals", _fill("1.", "<answer>", "</answer>")),
      ("grid_digits_spaced", _fill("1 ")),
      ("grid_digits_commas", _fill("1,", "<answer>")),
      ("grid_separators", "1" + " " * (N - 2) + "2"),
      ("sixteen_digit_words", _fill("1234123412341234 ")),
      ("digits_before_close", _fill("1234123412341234 </answer>")),
      ("fences", _fill("```")),
      ("fence_spaces", _fill(" ", "```")),
      ("fence_python_spaces", _fill(" ", "```python")),
      ("fence_tabs_newline", _fill("\t", "```", "\n")),
      ("begin_spaces", _fill(" ", "[BEGIN]", "x")),
      ("begin_tags", _fill("[BEGIN]")),
      ("done_tags", _fill("[DONE]")),
      ("equals_runs", _fill("1 ", "", "=")),
      ("equals_many", _fill("1=")),
      ("expression_spaces", _fill(" ", "<answer>1", "+2+3</answer>")),
      ("unary_minus_chain", _fill("-", "<answer>", "1+2+3</answer>")),
      ("nested_parens", _fill("(", "<answer>", "1+2+3</answer>")),
      ("power_tower", "<answer>" + "**".join(["9"] * 3) + "</answer>"),
      ("dollars", _fill("$")),
      ("text_units", _fill("\\text{ ", "\\boxed{", "}")),
      ("fracs", _fill("\\frac", "\\boxed{", "}")),
      ("sqrts", _fill("\\sqrt", "\\boxed{", "}")),
      ("slashes", _fill("1/", "<answer>", "</answer>")),
      ("end_tokens", _fill("<|endoftext|>", "<answer>")),
      ("code_fence_digits", _fill("``` 1 ", "<answer>")),
      ("malformed_answer_tags", _fill("<>answer>1")),
      ("lone_surrogates", _fill("\ud800", "", "<answer>\\boxed{18}</answer>")),
      ("surrogates_in_answer", "<answer>" + "\udfff" * 1000 + "</answer>"),
      ("mixed_tags", _fill("<reasoning>\n<answer>\\boxed{1</answer>``` [BEGIN] 1 ")),
      ("too_long", "<answer>" + "1" * (2 * N) + "</answer>"),
  ]
  return cases


def cpu_seconds(function: Callable[[], object]) -> Tuple[float, object]:
  """(CPU seconds of this thread, result) of one call."""
  start = time.thread_time()
  result = function()
  return time.thread_time() - start, result


def example_for(task_name: str) -> dict:
  return {
      "gsm8k": {"answer": "18"},
      "math": {"answer": "\\frac{1}{2}"},
      "countdown": {"numbers": [1, 2, 3], "target": 6},
      "sudoku": {"puzzle": "1034000000002001", "solution": "1234341243212143"},
      "digit_sort": {"digits": "4321", "answer": "1234"},
  }[task_name]


def scorer_calls(task_name: str, completion: str) -> Iterator[Tuple[str, Callable[[], object]]]:
  """(label, call) for every text reward (all reward styles) and every evaluation scorer (both
  evaluation styles) of a task; code tasks: the code extraction (execution is bounded by the
  sandbox)."""
  task = base.get_task(task_name)
  if task_name in ("humaneval", "mbpp"):
    from dmpo_jax.tasks import code_tasks  # pylint: disable=import-outside-toplevel
    yield "extract_code", lambda: code_tasks.extract_code(completion, mbpp_style=task_name == "mbpp")
    return
  example = example_for(task_name)
  for style in base.REWARD_STYLES:
    for name, function in task.reward_functions(style):
      yield f"reward/{style}/{name}", lambda f=function: f(completion, example)
  for eval_style in base.EVAL_STYLES if task_name in base.D1_EVAL_TASKS else ("fixed",):
    yield f"score/{eval_style}", lambda s=eval_style: task.score(completion, example, eval_style=s)


TEXT_TASKS = ("gsm8k", "math", "countdown", "sudoku", "digit_sort", "humaneval", "mbpp")


def slowest_times(cases=None, tasks=TEXT_TASKS) -> Dict[str, Dict[str, object]]:
  """Per task: the slowest call (CPU seconds), its label and completion name."""
  cases = adversarial_completions() if cases is None else cases
  out: Dict[str, Dict[str, object]] = {}
  for task_name in tasks:
    worst = {"seconds": 0.0, "call": None, "completion": None}
    for case_name, completion in cases:
      for label, call in scorer_calls(task_name, completion):
        seconds, _ = cpu_seconds(call)
        if seconds > worst["seconds"]:
          worst = {"seconds": seconds, "call": label, "completion": case_name}
    out[task_name] = worst
  return out
