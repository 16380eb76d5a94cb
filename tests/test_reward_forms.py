"""Fixed-style training rewards credit a correct answer in every common form inside <answer>.

LLaDA-8B-Instruct writes ``<answer>\\n\\boxed{43500}\\n</answer>``; the d1-family exact string
compare gives it 0 (tasks' reward docstrings), the fixed style full credit. Expected values are the
task's published reward values (GSM8K correctness 2.0, int 0.5; MATH correctness 2.0; Countdown
1.0 / 0.1 / 0).
"""

import pytest

from dmpo_jax.tasks import countdown, get_task, gsm8k, math_task, sudoku

GSM_GOLD = {"answer": "43500"}
CORRECT_FORMS = [
    "<answer>\n\\boxed{43500}\n</answer>",           # LLaDA-8B-Instruct
    "<answer>43500</answer>",
    "<answer>\n43,500\n</answer>",
    "<answer>$43,500</answer>",
    "<answer>\\$43{,}500.</answer>",
    "<answer>43500.</answer>",
    "<answer>43500 dollars</answer>",
    "<answer>\\boxed{43500\\text{ dollars}}</answer>",
    "<answer>$43500$</answer>",
    "<reasoning>...</reasoning>\n<answer>\n\\boxed{43500}",  # cut at EOS before </answer>
    "<answer>41000</answer> no wait <answer>\\boxed{43500}</answer>",  # the last answer counts
]
WRONG_FORMS = [
    "<answer>43501</answer>",
    "<answer>43500 or 43501</answer>",
    "<answer>\\boxed{43500} \\boxed{43501}</answer>",
    "<answer>4,35,00</answer>",
    "<answer>43500 = 2 * 21750 + 1</answer>",
    "The answer is 43500.",                              # no <answer> tag
    "<answer></answer>",
]


@pytest.mark.parametrize("completion", CORRECT_FORMS)
def test_gsm8k_fixed_credits_common_forms(completion):
  assert gsm8k.correctness_reward(completion, GSM_GOLD, "fixed") == 2.0
  assert gsm8k.int_reward(completion, GSM_GOLD, "fixed") == 0.5


@pytest.mark.parametrize("completion", WRONG_FORMS)
def test_gsm8k_fixed_rejects_wrong_or_ambiguous_answers(completion):
  assert gsm8k.correctness_reward(completion, GSM_GOLD, "fixed") == 0.0


def test_gsm8k_d1_style_keeps_exact_string_compare():
  """d1: extract_xml_answer is "\\boxed{43500}", not the string "43500" -> 0; isdigit() fails -> 0."""
  completion = "<answer>\n\\boxed{43500}\n</answer>"
  for style in ("d1", "dmpo", "spg"):
    assert gsm8k.correctness_reward(completion, GSM_GOLD, style) == 0.0
    assert gsm8k.int_reward(completion, GSM_GOLD, style) == 0.0
  assert gsm8k.correctness_reward("<answer>\n43500\n</answer>", GSM_GOLD, "d1") == 2.0


def test_int_reward_fixed():
  """0.5 for an integer in any common form (signed), 0 for decimals and prose."""
  example = {"answer": "0"}
  assert gsm8k.int_reward("<answer>-12</answer>", example, "fixed") == 0.5
  assert gsm8k.int_reward("<answer>\\boxed{-1,200}</answer>", example, "fixed") == 0.5
  assert gsm8k.int_reward("<answer>2.5</answer>", example, "fixed") == 0.0
  assert gsm8k.int_reward("<answer>twelve</answer>", example, "fixed") == 0.0


@pytest.mark.parametrize("completion", [
    "<answer>\\boxed{\\frac{1}{2}}</answer>", "<answer>\n$\\frac{1}{2}$\n</answer>",
    "<answer>1/2.</answer>", "<answer>\\(\\dfrac12\\)</answer>", "<answer>\n\\boxed{\\frac{1}{2}}",
    "no tag, just \\boxed{0.5}"])
def test_math_fixed_credits_common_forms(completion):
  assert math_task.correctness_reward(completion, {"answer": "\\frac{1}{2}"}, "fixed") == 2.0


def test_math_fixed_thousands_commas_and_wrong_answers():
  assert math_task.correctness_reward("<answer>\\boxed{43{,}500}</answer>", GSM_GOLD, "fixed") == 2.0
  assert math_task.correctness_reward("<answer>\\boxed{43,500}</answer>", GSM_GOLD, "fixed") == 2.0
  assert math_task.correctness_reward("<answer>\\boxed{\\frac{1}{3}}</answer>",
                                      {"answer": "\\frac{1}{2}"}, "fixed") == 0.0


CD = {"numbers": [30, 100, 93], "target": 23}


@pytest.mark.parametrize("completion", [
    "<answer>30-(100-93)</answer>", "<answer>\n\\boxed{30 - (100 - 93)}\n</answer>",
    "<answer>$30 - (100 - 93) = 23$</answer>", "<answer>30 - (100 - 93).</answer>",
    "<answer>30 - (100 - 93)", "<answer>\\boxed{30 \u2212 (100 \u2212 93)}</answer>"])
def test_countdown_fixed_credits_common_forms(completion):
  assert countdown.countdown_reward(completion, CD, "fixed") == 1.0


def test_countdown_fixed_format_and_no_tag():
  assert countdown.countdown_reward("<answer>\\boxed{30 + 100 - 93}</answer>", CD, "fixed") == 0.1
  assert countdown.countdown_reward("<answer>30 * 100 / 93 * 1</answer>", CD, "fixed") == 0.1
  assert countdown.countdown_reward("30-(100-93)", CD, "fixed") == 0.0
  # d1 semantics: the boxed answer is no expression over its character class -> 0.1.
  assert countdown.countdown_reward("<answer>\\boxed{30-(100-93)}</answer>", CD, "d1") == 0.1


def test_sudoku_fixed_reads_unclosed_answer():
  example = {"puzzle": "1200340000430021", "solution": "1234341221434321"}
  completion = "<answer>\n1234 3412 2143 4321"
  assert sudoku.sudoku_reward(completion, example, "fixed") == 1.0
  assert sudoku.sudoku_reward(completion, example, "d1") == 0.0  # no closed block


# ------------------------------------------------------------------ one answer, its real value
@pytest.mark.parametrize("use_math_verify", [False, True])
def test_an_answer_offering_alternatives_gets_no_credit(use_math_verify):
  """``\\boxed{17 \\text{ (or } 18)}`` was credited for gold 17 (Hendrycks strips the text as
  units) and for gold 18 (math-verify reads the last number)."""
  if use_math_verify:
    pytest.importorskip("math_verify")
  for completion in ("<answer>\\boxed{17 \\text{ (or } 18)}</answer>",
                     "<answer>\\boxed{17 \\text{ or } 18}</answer>",
                     "<answer>either 17 or 18</answer>"):
    for gold in ("17", "18"):
      assert math_task.correctness_reward(completion, {"answer": gold}, "fixed",
                                          use_math_verify=use_math_verify) == 0.0, (completion, gold)
      assert not get_task("math").score(completion, {"answer": gold},
                                         use_math_verify=use_math_verify)["correct"]
  assert math_task.correctness_reward("<answer>\\boxed{18}</answer>", {"answer": "18"}, "fixed",
                                      use_math_verify=use_math_verify) == 2.0


def test_math_verify_compares_one_parsed_answer():
  pytest.importorskip("math_verify")
  from dmpo_jax.tasks import math_utils  # pylint: disable=import-outside-toplevel
  assert not math_utils.math_verify_equal("17", "17, 18")       # a set where the gold is one value
  assert math_utils.math_verify_equal("\\{17, 18\\}", "18, 17")  # a set gold: the same set
  assert not math_utils.math_verify_equal("17", "17 \\text{ (or } 18)")
  assert math_utils.math_verify_equal("\\frac{1}{2}", "0.5")


@pytest.mark.parametrize("answer,value", [
    ("18 thousand", 18000), ("18 hundred", 1800), ("18k", 18000), ("18 K", 18000),
    ("1.5 million", 1500000), ("18 \\text{ thousand}", 18000), ("2 dozen", 24),
    ("18 thousand dollars", 18000), ("18 kg", 18), ("18", 18)])
def test_scale_words_change_the_value(answer, value):
  """The fixed style credited ``18 thousand`` and ``18 hundred`` for gold 18."""
  completion = f"<answer>{answer}</answer>"
  for gold in ("18", "1800", "18000", "24", "1500000"):
    expected = 2.0 if int(gold) == value else 0.0
    assert gsm8k.correctness_reward(completion, {"answer": gold}, "fixed") == expected, (answer, gold)
    assert math_task.correctness_reward(f"<answer>\\boxed{{{answer}}}</answer>", {"answer": gold},
                                        "fixed") == expected, (answer, gold)
  assert get_task("gsm8k").score(f"\\boxed{{{answer}}}", {"answer": str(value)})["correct"]


def test_a_variable_is_no_scale_or_unit_of_the_gold():
  """MATH gold ``2k`` is an expression: only ``2k`` itself matches (``2`` matched before, the
  ``k`` read as a unit)."""
  for completion, reward in (("2k", 2.0), ("2 k", 2.0), ("2", 0.0), ("2000", 0.0)):
    assert math_task.correctness_reward(f"<answer>\\boxed{{{completion}}}</answer>",
                                        {"answer": "2k"}, "fixed") == reward, completion
