"""Every ```python block of README.md runs verbatim.

The blocks are taken in order and each one is executed in a fresh namespace, in this
process (so torch and transformers are imported once). A traceback points at README.md
and the block's own line numbers. A block that uses CUDA (the word ``cuda`` in its code)
is skipped where CUDA is not available; every other block must pass on a CPU.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parent.parent / "README.md"

# A fence opening a python block, its body, and the closing fence, each at a line start.
_BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


def python_blocks(text: str) -> list[tuple[int, str]]:
    """``(line of the block's first code line, code)`` for every python block, in order."""
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1)) for m in _BLOCK.finditer(text)]


def needs_cuda(code: str) -> bool:
    """Whether the code (comments left out) mentions CUDA."""
    body = "\n".join(line.split("#", 1)[0] for line in code.splitlines())
    return re.search(r"cuda", body, re.IGNORECASE) is not None


BLOCKS = python_blocks(README.read_text(encoding="utf-8"))


def test_readme_has_python_examples() -> None:
    assert BLOCKS, f"no ```python block found in {README}"


@pytest.mark.parametrize("line,code", BLOCKS, ids=[f"README.md:{ln}" for ln, _ in BLOCKS])
def test_readme_block_runs(line: int, code: str) -> None:
    if needs_cuda(code) and not torch.cuda.is_available():
        pytest.skip("this README example needs CUDA, which is not available here")
    # Leading newlines put the block's lines at their README line numbers in tracebacks.
    compiled = compile("\n" * (line - 1) + code, str(README), "exec")
    exec(compiled, {"__name__": "__readme__"})
