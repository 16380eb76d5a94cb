"""Rewards and evaluation scorers against hand-written completions (`docs/tasks.md` §2-§5, §9)."""

import functools

import pytest
from hypothesis import given, settings, strategies as st

from dmpo_jax.tasks import countdown, get_task, gsm8k, math_task, math_utils, sudoku
from dmpo_jax.tasks import format_rewards as fmt

PERFECT = "<reasoning>\nFirst 2+2.\nThen done.\n</reasoning>\n<answer>\n4\n</answer>\n"
ONE_LINE = "<reasoning>\nFirst 2+2.\n</reasoning>\n<answer>\n4\n</answer>\n"
GSM = {"answer": "4"}


def rewards(task_name, completion, example, style):
  return {name: fn(completion, example) for name, fn in get_task(task_name).reward_functions(style)}


# ---------------------------------------------------------------- GSM8K
def test_gsm8k_fixed_perfect_is_max():
  values = rewards("gsm8k", PERFECT, GSM, "fixed")
  assert values == {"xmlcount": 0.5, "soft_format": 0.5, "strict_format": 0.5, "int": 0.5,
                    "correctness": 2.0}


def test_gsm8k_d1_no_dotall_quirk():
  # Multi-line reasoning: the soft regex without DOTALL never matches, nor does the strict one.
  values = rewards("gsm8k", PERFECT, GSM, "d1")
  assert values["soft_format"] == 0.0 and values["strict_format"] == 0.0
  # One reasoning line: strict matches (the one-line interior needs no newline), soft does not
  # ("<reasoning>.*?</reasoning>" must cross a newline).
  values = rewards("gsm8k", ONE_LINE, GSM, "d1")
  assert values["strict_format"] == 0.5 and values["soft_format"] == 0.0
  single = "<reasoning>x</reasoning><answer>4</answer>"
  assert rewards("gsm8k", single, GSM, "d1")["soft_format"] == 0.5


def test_gsm8k_d1_xmlcount_double_penalty():
  # Hand computation: 4 x 0.125; third branch penalises "tail!" (5 chars), fourth "\ntail!"
  # minus one (6 - 1 = 5 chars): 0.5 - 0.005 - 0.005 = 0.49.
  text = PERFECT + "tail!"
  assert fmt.xmlcount_reward(text, {}, "d1") == pytest.approx(0.49)
  assert fmt.xmlcount_reward(text, {}, "fixed") == pytest.approx(0.495)
  # Without the final newline the third branch measures the whole text (len 54): 0.5 - 0.054 + 0.001.
  no_newline = PERFECT[:-1]
  assert fmt.xmlcount_reward(no_newline, {}, "d1") == pytest.approx(0.5 - 0.001 * len(no_newline) + 0.001)
  assert fmt.xmlcount_reward(no_newline, {}, "fixed") == pytest.approx(0.5)
  # SPG: third branch measures the text after "\n<answer>\n" ("4\n</answer>\n" = 12 chars).
  assert fmt.xmlcount_reward(PERFECT, {}, "spg") == pytest.approx(0.5 - 0.012 + 0.0)


def test_gsm8k_d1_isdigit_and_exact_string_quirks():
  negative = "<answer>\n-3\n</answer>"
  assert gsm8k.int_reward(negative, {}, "d1") == 0.0
  assert gsm8k.int_reward(negative, {}, "fixed") == 0.5
  commas = "<answer>\n1,000\n</answer>"
  assert gsm8k.correctness_reward(commas, {"answer": "1000"}, "d1") == 0.0
  assert gsm8k.correctness_reward(commas, {"answer": "1000"}, "fixed") == 2.0
  assert gsm8k.correctness_reward("<answer>$18.</answer>", {"answer": "18"}, "fixed") == 2.0
  assert gsm8k.correctness_reward("<answer>18.0</answer>", {"answer": "18"}, "fixed") == 2.0
  assert gsm8k.correctness_reward("<answer>18.5</answer>", {"answer": "18"}, "fixed") == 0.0
  # No tag: d1 compares the whole completion.
  assert gsm8k.correctness_reward("18", {"answer": "18"}, "d1") == 2.0
  assert gsm8k.correctness_reward("18", {"answer": "18"}, "fixed") == 0.0
  assert gsm8k.int_reward("18", {}, "d1") == 0.5


def test_gsm8k_eval_scorer():
  task = get_task("gsm8k")
  assert task.score("... \\boxed{...} then \\boxed{1,234}", {"answer": "1234"})["correct"]
  assert task.score("\\boxed{x = 12 apples}", {"answer": "12"})["correct"]
  assert task.score("<answer>it is 3 or 12</answer>", {"answer": "12"})["correct"]
  assert not task.score("no answer 12", {"answer": "12"})["correct"]
  assert not task.score("\\boxed{13}<answer>12</answer>", {"answer": "12"})["correct"]


def test_gsm8k_gold_extraction():
  task = get_task("gsm8k")
  example = task.normalize({"question": "q", "answer": "work <<2*3=6>>6\n#### 1,200"})
  assert example["answer"] == "1,200"
  assert task.score("\\boxed{1200}", example)["correct"]


# ---------------------------------------------------------------- MATH
def test_math_strip_string_and_is_equiv():
  assert math_utils.strip_string("\\dfrac{1}{2}") == "\\frac{1}{2}"
  assert math_utils.strip_string("0.5") == "\\frac{1}{2}"
  assert math_utils.strip_string("3/4") == "\\frac{3}{4}"
  assert math_utils.strip_string("\\frac12") == "\\frac{1}{2}"
  assert math_utils.strip_string("\\sqrt3") == "\\sqrt{3}"
  assert math_utils.strip_string("x = 5") == "5"
  assert math_utils.strip_string("90^\\circ") == "90"
  assert math_utils.strip_string("\\left( 1, 2 \\right)") == "(1,2)"
  assert math_utils.strip_string("10\\%") == "10"
  assert math_utils.strip_string(".5") == "\\frac{1}{2}"
  assert math_utils.strip_string("5\\text{ cm}") == "5"
  assert math_utils.is_equiv("\\tfrac{3}{4}", "3/4")
  assert not math_utils.is_equiv("\\frac{1}{3}", "\\frac{1}{2}")
  assert math_utils.is_equiv(None, None) and not math_utils.is_equiv("1", None)


def test_math_boxed_extraction():
  text = "a \\boxed{\\frac{1}{2}} b \\boxed{x^{2}} c"
  assert math_utils.last_boxed_only_string(text) == "\\boxed{x^{2}}"
  assert math_utils.remove_boxed("\\boxed{x^{2}}") == "x^{2}"
  assert math_utils.remove_boxed(math_utils.last_boxed_only_string("so \\boxed 5$.")) == "5"
  assert math_utils.last_boxed_only_string("\\fbox{7}") == "\\fbox{7}"
  assert math_utils.last_boxed_only_string("\\boxed{unclosed") is None


def test_math_rewards_and_d1_boxed_bug():
  example = {"answer": "\\frac{1}{2}"}
  tags_boxed = "<reasoning>r</reasoning><answer>\\boxed{\\dfrac12}</answer>"
  tags_only = "<answer>1/2</answer>"
  boxed_only = "so \\boxed{0.5}"
  neither = "one half"
  # fixed credits the bare answer inside <answer> (1/2 = \frac{1}{2} after strip_string): 2 + 0.75.
  expected = {"fixed": (3.0, 2.75, 2.5, 0.25), "dmpo": (3.0, 0.75, 2.5, 0.25),
              "d1": (2.75, 0.75, 2.25, 0.25)}
  for style, values in expected.items():
    got = tuple(sum(rewards("math", c, example, style).values())
                for c in (tags_boxed, tags_only, boxed_only, neither))
    assert got == pytest.approx(values), style
  # The d1 bug: the check string is a backspace + "oxed".
  assert math_task.boxed_and_answer_tags_format_reward(tags_boxed, {}, "d1") == 0.75


def test_math_verify_option_and_eval_scorer():
  task = get_task("math")
  example = {"answer": "\\frac{1}{2}"}
  assert task.score("<answer>\\frac{1}{2}</answer>", example)["correct"]  # fallback to <answer>
  assert not task.score("\\boxed{\\frac{2}{4}}", example)["correct"]
  assert task.score("\\boxed{\\frac{2}{4}}", example, use_math_verify=True)["correct"]
  assert not task.score("\\boxed{\\frac{1}{3}}", example, use_math_verify=True)["correct"]
  assert math_task.correctness_reward("\\boxed{2/4}", example, "fixed", use_math_verify=True) == 2.0
  assert math_task.correctness_reward("\\boxed{2/4}", example, "fixed") == 0.0


def test_math_eval_prompt_quote():
  example = {"problem": "What is 1+1?"}
  content = get_task("math").eval_prompt(example).messages[0]["content"]
  assert "</answer>\" \n\n\nWhat is 1+1?" in content
  stripped = math_task.MathTask(strip_quote=True).eval_prompt(example).messages[0]["content"]
  assert "</answer>\n\n\nWhat is 1+1?" in stripped


# ---------------------------------------------------------------- Countdown
CD = {"numbers": [3, 5, 7], "target": 22}


@pytest.mark.parametrize("style", ["d1", "fixed"])
def test_countdown_reward_levels(style):
  r = functools.partial(countdown.countdown_reward, example=CD, style=style)
  assert r("<answer>3*5+7</answer>") == 1.0
  assert r("<answer>(7+5)*3-14</answer>") == 0.1  # extra number
  assert r("<answer>3+5+7</answer>") == 0.1  # wrong value
  assert r("no tags 3*5+7") == 0.0
  assert r("<answer>3*5+7</answer> then <answer>3+5+7</answer>") == 0.1  # last block counts
  assert r("<answer>7/(5-5)*3</answer>") == 0.1
  assert r("<answer>3/(5-5)+7</answer>") == 0.1  # wrong numbers first


def test_countdown_d1_quirks_vs_fixed():
  example = {"numbers": [2, 5, 3], "target": 11}
  # "2.5" is read by d1 as the numbers 2 and 5; 2.5*... : 2.5 * 3 + 3.5 is not allowed anyway.
  assert countdown.countdown_reward("<answer>2.5*2+3*2</answer>", {"numbers": [2, 5, 2, 3, 2],
                                                                    "target": 11}, "d1") == 1.0
  assert countdown.countdown_reward("<answer>2.5*2+3*2</answer>", {"numbers": [2, 5, 2, 3, 2],
                                                                    "target": 11}, "fixed") == 0.1
  # Power: allowed by d1's character class, rejected by the fixed grammar.
  assert countdown.countdown_reward("<answer>2**3+5-3+1</answer>", {"numbers": [2, 3, 5, 3, 1],
                                                                     "target": 11}, "d1") == 1.0
  assert countdown.countdown_reward("<answer>2**3+5-3+1</answer>", {"numbers": [2, 3, 5, 3, 1],
                                                                     "target": 11}, "fixed") == 0.1
  # The d1 hang: 9**9**9 must come back at once with 0.1.
  assert countdown.countdown_reward("<answer>9**9**9</answer>", {"numbers": [9, 9, 9],
                                                                 "target": 1}, "d1") == 0.1
  assert countdown.countdown_reward("<answer>2*5+3</answer>", example, "d1") == 0.1
  assert countdown.countdown_reward("<answer>2*(3+5)-5</answer>", example, "d1") == 0.1
  assert countdown.countdown_reward("<answer>2*3+5</answer>", example, "fixed") == 1.0
  # Exact arithmetic: 1/3*3 == 1 exactly.
  assert countdown.countdown_reward("<answer>1/3*3</answer>", {"numbers": [1, 3, 3],
                                                               "target": 1}, "fixed") == 1.0


def test_countdown_python_semantics_match_eval():
  for expression in ["1+2*3", "7/2", "7//2", "-3+4", "2**-1", "(1+2)*(3-4)/5", "1.5*2"]:
    assert countdown.evaluate_python_semantics(expression) == eval(expression)  # pylint: disable=eval-used


def test_countdown_eval_scorer():
  task = get_task("countdown")
  assert task.score("<answer>\\boxed{3 \\times 5 + 7}</answer>", CD)["correct"]
  assert task.score("<answer>\\boxed{3*5+7 = 22}</answer>", CD)["correct"]
  assert task.score("<answer>3*5+7</answer>", CD)["correct"]
  assert task.score("3*5+7", CD)["correct"]
  assert not task.score("\\boxed{3+5+7}", CD)["correct"]
  example = task.normalize({"input": "30,100,93", "output": "23"})
  assert example == {"numbers": [30, 100, 93], "target": 23}
  assert task.score("\\boxed{100 - 93 + 30 - 14}", example)["correct"] is False
  assert task.score("\\boxed{93 - 100 + 30}", example)["correct"]


# ---------------------------------------------------------------- Sudoku
PUZZLE = "1034002130004300"
SOLUTION = "1234342121434312"


def test_sudoku_reward_partial_credit():
  example = {"puzzle": PUZZLE, "solution": SOLUTION}
  empty = PUZZLE.count("0")
  assert empty == 8
  assert sudoku.sudoku_reward(f"<answer>\n{SOLUTION}\n</answer>", example) == 1.0
  wrong_two = list(SOLUTION)
  wrong_two[1] = "4"  # empty cell
  wrong_two[5] = "1"  # empty cell
  wrong_two[0] = "4"  # given cell: not counted
  text = "<answer>" + " ".join("".join(wrong_two)) + "</answer>"
  assert sudoku.sudoku_reward(text, example) == pytest.approx(6 / 8)
  # Short answer is padded with '0': the first 4 cells only (empty cells 1 -> '2' correct).
  assert sudoku.sudoku_reward("<answer>1234</answer>", example) == pytest.approx(1 / 8)
  assert sudoku.sudoku_reward(SOLUTION, example) == 0.0


def test_sudoku_scorer_and_summary():
  task = get_task("sudoku")
  example = {"puzzle": PUZZLE, "solution": SOLUTION}
  rows = [task.score(f"<answer>{SOLUTION}</answer>", example),
          task.score("final grid: 1 2 3 4 | 3 4 2 1 | 2 1 4 3 | 4 3 1 1", example),
          task.score("nothing", example)]
  assert [r["correct_cells"] for r in rows] == [8, 7, 0]
  summary = task.summarize(rows)
  assert summary["cell_accuracy"] == pytest.approx(100 * 15 / 24)
  assert summary["accuracy"] == summary["cell_accuracy"]
  assert summary["solve_rate"] == pytest.approx(100 / 3)


# ---------------------------------------------------------------- fuzzing
ALPHABET = st.sampled_from(list("<>/\\{}()[]0123456789+-*/.=, \nabx") +
                           ["<answer>", "</answer>", "<reasoning>", "</reasoning>", "\\boxed{",
                            "**", "\n</answer>\n", "\\frac", "\\sqrt", "####"])
TEXT = st.lists(ALPHABET, max_size=60).map("".join)
FUZZ_EXAMPLES = {"gsm8k": {"answer": "12"}, "math": {"answer": "\\frac{1}{2}"},
                 "countdown": {"numbers": [3, 5, 7], "target": 22},
                 "sudoku": {"puzzle": PUZZLE, "solution": SOLUTION}}
RANGES = {"gsm8k": (-1.0, 4.0), "math": (0.0, 3.0), "countdown": (0.0, 1.0), "sudoku": (0.0, 1.0)}


@settings(max_examples=150, deadline=None)
@given(text=st.one_of(TEXT, st.text(max_size=80)))
def test_rewards_never_raise_and_stay_in_range(text):
  for name, example in FUZZ_EXAMPLES.items():
    task = get_task(name)
    low, high = RANGES[name]
    for style in ("d1", "dmpo", "spg", "fixed"):
      total = sum(fn(text, example) for _, fn in task.reward_functions(style))
      assert low <= total <= high, (name, style, text, total)
    score = task.score(text, example)
    assert 0.0 <= score["score"] <= 1.0
