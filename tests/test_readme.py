"""The README's code examples run as written."""
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_toy_example_runs():
    blocks = [b for b in python_blocks() if "def loss" in b]
    assert blocks, "the README lost its toy example"
    namespace = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    import lisa_jax
    active = lisa_jax.active_layers(namespace["state"])
    assert active.shape == (2,)


def test_readme_set_up_commands_match_ci():
    text = README.read_text()
    ci = (README.parent / ".ci" / "run").read_text()
    assert "lisa-jax train --demo" in text
    test_cmd = re.search(r"&& (python3 -m pytest)", text).group(1)
    assert test_cmd in ci
