"""The README's Quick start holds exactly two commands and CI runs the second one verbatim."""

import pathlib
import re

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_quick_start_commands_match_ci():
  readme = (REPO / "README.md").read_text()
  section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
  blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
  assert len(blocks) == 1, "Quick start must have exactly one code block"
  commands = [line for line in blocks[0].splitlines() if line.strip()]
  assert len(commands) == 2, commands
  assert "launch/train.py --config=configs/demo.py" in commands[0]
  ci_lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
  assert commands[1].strip() in ci_lines, (commands[1], ci_lines)
