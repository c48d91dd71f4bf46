"""The README's API tour runs as written."""

import re
from pathlib import Path

README = Path(__file__).parent.parent / "README.md"


def test_api_tour_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README lost its API tour"
    code = blocks[0].replace("/tmp/w.safetensors", str(tmp_path / "w.safetensors"))
    exec(compile(code, "README.md", "exec"), {})
