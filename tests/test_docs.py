"""The Python examples of `docs/layers.md` run as written, in order."""

import re
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs" / "layers.md"


def test_layers_page_examples_run(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", DOCS.read_text(), re.S)
    assert len(blocks) >= 4
    monkeypatch.chdir(tmp_path)  # an example saves a model
    namespace = {}
    for block in blocks:
        exec(compile(block, str(DOCS), "exec"), namespace)
