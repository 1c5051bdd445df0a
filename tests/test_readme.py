"""The README's commands are the ones CI runs, and its quick start runs."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _bash_blocks(text):
    return re.findall(r"```bash\n(.*?)\n```", text, flags=re.S)


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    test_command = next(block for block in _bash_blocks(readme) if "pytest" in block)
    ci_lines = [
        line
        for line in (ROOT / ".ci" / "run").read_text().splitlines()
        if line and not line.startswith(("#", "set ", "cd "))
    ]
    assert ci_lines == [test_command]


def test_readme_quick_start_runs():
    readme = (ROOT / "README.md").read_text()
    code = re.search(r"```python\n(.*?)\n```", readme, flags=re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README quick start", "exec"), namespace)
    assert namespace["params"]["w"].shape == (8, 1)
    assert float(abs(namespace["params"]["w"]).sum()) > 0
