"""Rewards and scorers are bounded in time and never raise (adversarial completions).

The bound is `reward_timing.TIME_BOUND_S` (50 ms) per call on completions up to 64 KiB.
Time is the CPU time of the calling thread (robust to other jobs on a shared machine), the least
of two calls with the garbage collector paused (`steady_cpu_seconds`); the tests assert `SLACK`
times the bound so a slow CI machine does not flake, and ``benchmarks/reward_time.py`` reports
the real numbers. Each linear scan is also checked against the regex it replaces, on generated
text. The math-verify and RewardPool limits are wall-clock limits by design; their tests check
that the limit fired (a kill counter), with wall-clock bounds far above the limit.
"""

import gc
import re
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from dmpo_jax.tasks import (code_tasks, countdown, get_task, gsm8k, math_task, math_utils,
                            math_verify_worker, reward_pool, reward_ranges, reward_timing, sudoku,
                            text_scan)

SLACK = 3.0
LIMIT_S = SLACK * reward_timing.TIME_BOUND_S
CORPUS = reward_timing.adversarial_completions()


def steady_cpu_seconds(call, repeats=2):
  """(CPU seconds, result) of the cheapest of ``repeats`` calls, with the garbage collector
  paused: the bound is on the scorer's own work. A collection of the whole test process's
  objects that happens to start inside a call (about 0.6 s of CPU with JAX and 4 million objects
  in the process, on the 2-core CI machine) or a first call's lazy import is not the scorer's
  cost; a super-linear scan is slow in every call."""
  enabled = gc.isenabled()
  gc.disable()
  try:
    return min((reward_timing.cpu_seconds(call) for _ in range(repeats)), key=lambda r: r[0])
  finally:
    if enabled:
      gc.enable()


def assert_fast_and_total(task_name, completion, name=""):
  """Every reward and scorer of the task: within the time bound, a value, and every reward in its
  documented range (`reward_ranges`)."""
  for label, call in reward_timing.scorer_calls(task_name, completion):
    seconds, result = steady_cpu_seconds(call)
    assert seconds <= LIMIT_S, f"{task_name} {label} on {name}: {1000 * seconds:.1f} ms"
    assert result is None or isinstance(result, (float, int, str, dict)), label
    if label.startswith("reward/"):
      _, style, reward = label.split("/")
      problem = reward_ranges.violation(task_name, reward, style, completion, result)
      assert problem is None, f"{problem} on {name}"


@pytest.mark.parametrize("task_name", reward_timing.TEXT_TASKS)
def test_adversarial_corpus_within_bound(task_name):
  for name, completion in CORPUS:
    assert len(completion) <= 2 * text_scan.MAX_TEXT_CHARS + 100
    assert_fast_and_total(task_name, completion, name)


# The slow inputs found against the regex extractors (each was seconds to minutes before).
def test_mbpp_begin_done_whitespace():
  """\\[BEGIN\\]\\s*(.*?)\\s*\\[DONE\\] was cubic: 3.6 s at 2,000 whitespace characters."""
  for n in (2000, 4000, 60000):
    completion = "[BEGIN]" + " " * n + "x"
    seconds, code = steady_cpu_seconds(
        lambda c=completion: code_tasks.extract_code(c, mbpp_style=True))
    assert seconds <= LIMIT_S and code is None
  assert code_tasks.extract_code("[BEGIN]\n 'def f(): pass' \n[DONE]", True) == "def f(): pass"


def test_answer_and_soft_format_repeats():
  """<answer>(.*?)</answer> and the soft-format regex were quadratic (> 25 s at 100k repeats)."""
  for n in (10_000, 100_000):
    for completion in ("<answer>" * n, "<reasoning>" + "</reasoning>" * n,
                       "<reasoning>" + "</reasoning> <answer>" * n):
      for task_name in ("gsm8k", "countdown", "sudoku"):
        assert_fast_and_total(task_name, completion, f"{completion[:20]}x{n}")


def test_code_fence_spaces():
  """The code-fence regex took 14 s on 100k spaces."""
  for completion in ("```" + " " * 100_000, " " * 100_000, "```python" + " \t" * 50_000):
    seconds, code = steady_cpu_seconds(lambda c=completion: code_tasks.extract_code(c))
    assert seconds <= LIMIT_S and code is None


def test_huge_numbers_do_not_raise():
  """A 5000-digit number raised ValueError in countdown scoring and the d1-style reward (int()
  refuses more than 4300 digits); d1's bare except makes that 'numbers not used' -> 0.1."""
  numbers = {"numbers": [1, 2, 3], "target": 6}
  big = "1" * 5000
  completion = f"<answer>{big}*2*3</answer>"
  for style in ("d1", "dmpo", "spg", "fixed"):
    assert countdown.countdown_reward(completion, numbers, style) == 0.1
  for eval_style in ("d1", "fixed"):
    assert not get_task("countdown").score(f"\\boxed{{{big}*2*3}}", numbers,
                                           eval_style=eval_style)["correct"]
  for style in ("d1", "fixed"):
    assert gsm8k.correctness_reward(f"<answer>{big}</answer>", {"answer": "18"}, style) == 0.0
    assert math_task.correctness_reward(f"\\boxed{{{big}}}", {"answer": "1"}, style) == 0.0
  assert math_utils.numeric_answer(big) is None  # beyond MAX_NUMERIC_ANSWER_CHARS
  assert get_task("gsm8k").score(f"\\boxed{{{big}}}", {"answer": "18"}, eval_style="d1")[
      "extracted"] == float(big)


def test_lone_surrogates_do_not_raise():
  """A lone surrogate raised UnicodeEncodeError; the text a reward sees has U+FFFD instead, so
  what is handed on (e.g. extracted code) encodes as UTF-8."""
  completion = "<answer>\\boxed{18}\ud800</answer>```python\nprint('\udfff')\n```"
  for task_name in reward_timing.TEXT_TASKS:
    assert_fast_and_total(task_name, completion, "surrogates")
  code = code_tasks.extract_code(completion)
  code.encode("utf-8")
  assert "\ufffd" in code
  assert gsm8k.correctness_reward("<answer>18\ud800</answer>", {"answer": "18"}) == 0.0
  assert text_scan.bounded_text("a\ud83d\ude00b") == "a\ufffd\ufffdb"


@pytest.mark.slow
def test_math_verify_hard_timeout():
  """math-verify never returns on \\boxed{9^{9^{9}}} and takes 11 s on 1000000!: the worker is
  killed at its call limit, the answer is False, and the next call works (fresh worker)."""
  pytest.importorskip("math_verify")
  worker = math_verify_worker.MathVerifyWorker(call_timeout_s=60.0)
  try:
    assert worker.equal("\\frac{1}{2}", "0.5")  # starts the worker, imports sympy
    for count, answer in enumerate(("9^{9^{9}}", "1000000!"), 1):
      worker.call_timeout_s = 1.0
      start = time.monotonic()
      assert not worker.equal("1", answer)
      # Killed at its limit (the counter), not finished: 9^{9^{9}} never returns, 1000000! takes
      # 11 s. The wall-clock bound is only a backstop, far above the 1 s limit (shared machines).
      assert worker.timeouts == count and time.monotonic() - start < 30.0
      worker.call_timeout_s = 60.0  # a fresh worker's first call may be slow on a loaded machine
      assert worker.equal("2", "2")  # replaced worker
    assert worker.timeouts == 2
  finally:
    worker.close()


# ------------------------------------------------------ property tests on generated text
_ADVERSARIAL_UNITS = st.sampled_from([
    "<answer>", "</answer>", "<reasoning>", "</reasoning>", "\n", " ", "\t", "{", "}", "\\boxed{",
    "\\boxed ", "\\fbox{", "9", "1", "12", "1,", "1.", "=", "-", "(", "```", "```python", "[BEGIN]",
    "[DONE]", "<|endoftext|>", "\\text{ ", "\\frac", "$", "\ud800", "<>answer>"])
ADVERSARIAL_TEXT = st.lists(st.tuples(_ADVERSARIAL_UNITS, st.integers(1, 3000)), min_size=1,
                            max_size=6).map(lambda runs: "".join(u * n for u, n in runs))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ADVERSARIAL_TEXT)
def test_property_rewards_bounded_and_total(text):
  """Long runs of tags, whitespace, braces and digits: every reward and scorer of every text
  task stays within the bound and returns a value."""
  for task_name in reward_timing.TEXT_TASKS:
    assert_fast_and_total(task_name, text, repr(text[:40]))


# Pieces of real answers and of the attacks on them (alternatives, scale words, units, long
# trailing text), glued at random: the fuzz corpus of the range check.
_PIECES = st.sampled_from([
    "<reasoning>\n", "\n</reasoning>\n", "<answer>\n", "\n</answer>", "\n</answer>\n", "<answer>",
    "</answer>", "\\boxed{", "}", "18", "17", "6", "1234", "43,500", "0.5", "-3", " thousand",
    " hundred", " million", "k", " or ", "either ", "\\text{ (or } 18)", "\\text{ dollars}", "$",
    "\\%", ".", ",", "=", "+", "*", "/", "(", ")", "1", "2", "3", "4", "\n", " ", "x", "\\frac{1}{2}",
    "```", "[BEGIN]", "[DONE]", "\ud800", "é"])
FUZZ_TEXT = st.one_of(
    st.lists(st.tuples(_PIECES, st.integers(1, 40)), max_size=12).map(
        lambda runs: "".join(p * n for p, n in runs)),
    st.lists(_PIECES, max_size=40).map("".join).map(lambda t: t + "z" * 5000),
    st.text(max_size=400), ADVERSARIAL_TEXT)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(FUZZ_TEXT, st.sampled_from(["18", "43500", "17", "0"]))
@pytest.mark.slow
def test_property_every_reward_stays_in_its_documented_range(text, gold):
  """Every reward of every text task and style, on fuzzed completions: in its documented range
  (`reward_ranges`, docs/tasks.md §9.3), within the time bound, never raising."""
  for task_name in ("gsm8k", "math", "countdown", "sudoku", "digit_sort"):
    example = dict(reward_timing.example_for(task_name))
    if task_name in ("gsm8k", "math"):
      example["answer"] = gold
    for style in ("d1", "dmpo", "spg", "fixed"):
      for name, function in get_task(task_name).reward_functions(style):
        seconds, value = reward_timing.cpu_seconds(lambda f=function: f(text, example))
        assert seconds <= LIMIT_S, (task_name, style, name, 1000 * seconds)
        problem = reward_ranges.violation(task_name, name, style, text, value)
        assert problem is None, (problem, text[:200])


def test_xmlcount_floor():
  """Trailing text: the fixed style's penalty stops at the closing tag's 0.125 (it reached -59.5);
  the reproduction styles keep the reference's, within their documented floor of -0.002 n."""
  text = "<reasoning>\nr\n</reasoning>\n<answer>\n18\n</answer>" + "x" * 60000
  from dmpo_jax.tasks import format_rewards  # pylint: disable=import-outside-toplevel
  assert format_rewards.xmlcount_reward(text, {}, "fixed") == 0.375
  assert format_rewards.xmlcount_reward(text[:-59990], {}, "fixed") == 0.49
  spg = format_rewards.xmlcount_reward(text, {}, "spg")
  assert spg == pytest.approx(0.5 - 0.001 * (len("18\n</answer>") + 60000) - 0.001 * 59999)
  assert -0.002 * len(text) <= spg < -119


_SHORT = st.lists(st.sampled_from(["<reasoning>", "</reasoning>", "<answer>", "</answer>", "\n", " ",
                                   "a", "1", "```", "`", "\t", "python", "py", "3", "[BEGIN]",
                                   "[DONE]", ",", "|", "2", "x"]), max_size=12).map("".join)
SOFT = r"<reasoning>.*?</reasoning>\s*<answer>.*?</answer>"
STRICT = r"^<reasoning>\n.*?\n</reasoning>\n<answer>\n.*?\n</answer>\n$"


@settings(max_examples=400, deadline=None)
@given(_SHORT, st.sampled_from(["", "<reasoning>", "<reasoning>\n"]),
       st.sampled_from(["", "\n</answer>\n", "\n</answer>\n\n"]))
def test_linear_scans_equal_the_regexes(body, prefix, suffix):
  text = prefix + body + suffix
  for dotall in (False, True):
    flags = re.DOTALL if dotall else 0
    assert text_scan.soft_format_matches(text, dotall) == bool(re.match(SOFT, text, flags))
    assert text_scan.strict_format_matches(text, dotall) == bool(re.match(STRICT, text, flags))
  blocks = re.findall(r"<answer>(.*?)</answer>", text, re.DOTALL)
  assert [text[a:b] for a, b in text_scan.tag_blocks(text, "<answer>", "</answer>")] == blocks
  assert text_scan.last_answer_block(text) == (blocks[-1].strip() if blocks else None)
  fence = r"```[ \t]*(?:python|py|Python|python3)?[ \t]*\n(.*?)```"
  assert code_tasks.fenced_blocks(text) == re.findall(fence, text, re.DOTALL)
  match = re.search(r"\[BEGIN\]\s*(.*?)\s*\[DONE\]", text, re.DOTALL)
  assert code_tasks.begin_done_body(text) == (match.group(1) if match else None)
  runs = re.findall(r"(?:[1-4][\s,|\-]*){15}[1-4]", text * 3)
  assert sudoku.last_grid_run(text * 3) == (re.sub(r"\D", "", runs[-1]) if runs else None)


# ------------------------------------------------------------------------------ RewardPool
def test_reward_pool_matches_in_process():
  examples = [{"answer": "18"}, {"answer": "7"}, {"answer": "3"}]
  completions = ["<answer>\\boxed{18}</answer>", "<answer>8</answer>", "<answer>" * 20000]
  expected = reward_pool.RewardPool("gsm8k", "fixed", 0)(completions, examples)
  pool = reward_pool.RewardPool("gsm8k", "fixed", 2)
  try:
    np.testing.assert_array_equal(pool(completions, examples), expected)
    assert pool.last_failures == []
  finally:
    pool.close()


@pytest.mark.slow
def test_reward_pool_wall_limit_scores_zero_and_replaces_worker(monkeypatch, fixture_data_dir):
  """A call past the wall limit (a program that sleeps) scores 0 with a reason; its worker is
  killed and replaced, and the pool keeps working."""
  # The pool's worker processes read the data folder from the environment (fixture files here).
  monkeypatch.setenv("DMPO_JAX_DATA_DIR", str(fixture_data_dir))
  task = get_task("mbpp")
  example = task.load_eval(data_dir=fixture_data_dir)[0]
  solution = "[BEGIN]\n" + example["code"] + "\n[DONE]"
  sleeper = "[BEGIN]\nimport time\ntime.sleep(30)\n[DONE]"
  pool = reward_pool.RewardPool("mbpp", "fixed", 1, timeout_s=3.0)
  try:
    start = time.monotonic()
    rewards = pool([sleeper, solution], [example, example])
    assert time.monotonic() - start < 25.0
    np.testing.assert_array_equal(rewards, [0.0, 1.0])
    assert [index for index, _ in pool.last_failures] == [0]
    assert "wall limit" in pool.last_failures[0][1]
    assert pool.replaced_workers == 1
    np.testing.assert_array_equal(pool([solution], [example]), [1.0])
    assert pool.last_failures == []
  finally:
    pool.close()


def _stack_partners(text):
  partners, stack = {}, []
  for index, char in enumerate(text):
    if char == "{":
      stack.append(index)
    elif char == "}" and stack:
      partners[stack.pop()] = index
  return partners


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["{", "}", "a", "\\boxed", "\\fbox", "\ud800"]), max_size=16)
       .map("".join))
def test_vectorised_brace_matching_equals_a_stack(text):
  assert text_scan.brace_partners(text) == _stack_partners(text)
  start = text.rfind("\\boxed")
  if start >= 0 and "\\boxed " not in text:
    depth, expected = 0, -1
    for index in range(start, len(text)):
      depth += {"{": 1, "}": -1}.get(text[index], 0)
      if text[index] == "}" and depth == 0:
        expected = index
        break
    assert text_scan.first_balanced_close(text, start) == expected


def test_reward_pool_propagates_task_errors_and_recovers():
  """A reward that raises (here: an example without its gold field) is a bug: the error names the
  completion; in-flight calls are dropped, so the next call gets only its own answers."""
  pool = reward_pool.RewardPool("gsm8k", "fixed", 2)
  try:
    with pytest.raises(RuntimeError, match="KeyError.*<answer>7"):
      pool(["<answer>7</answer>", "<answer>8</answer>"], [{}, {"answer": "8"}])
    # int 0.5 + correctness 2.0 (no reasoning tags, no newlines: no format rewards).
    np.testing.assert_array_equal(pool(["<answer>8</answer>"], [{"answer": "8"}]), [2.5])
  finally:
    pool.close()
