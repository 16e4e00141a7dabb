"""The README's standalone example runs as written (a method in a plain PyTorch loop)."""
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_starts_with_the_two_commands():
    text = README.read_text()
    first_block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    assert "make demo" in first_block and "make test" in first_block


def test_standalone_example_trains_two_tasks(capsys):
    text = README.read_text()
    code = re.search(r"<!-- standalone-example -->\n```python\n(.*?)```", text, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README standalone example", "exec"), namespace)
    printed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in printed] == ["digits-0-1", "digits-2-3"]
    assert namespace["method"].task.name == "digits-2-3"
    assert namespace["losses"]["loss"].item() < 0.7  # learned the second task (chance CE ~ ln 2 plus smoothing)
