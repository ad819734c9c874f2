"""README's Python API example runs as written and does what it says."""

import re
from pathlib import Path

import tvm
from tvm import relax

import tvm_rebirth.finetune  # noqa: F401 -- as other tests do; the API must survive it

README = Path(__file__).resolve().parents[1] / "README.md"


def test_python_api_snippet_runs():
    text = README.read_text()
    section = text[text.index("## Python API"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    scope = {}
    exec(compile(code, "README.md (Python API)", "exec"), scope)  # noqa: S102
    plan, slim, same = scope["plan"], scope["slim"], scope["same"]
    assert plan.enabled_sites() and scope["report"]["sites"]
    convs = lambda mod: sum(1 for b in mod["main"].body.blocks[0].bindings
                            if isinstance(b.value, relax.Call)
                            and getattr(b.value.op, "name", "") == "relax.nn.conv2d")
    assert convs(slim) < convs(scope["model"].mod)  # slimmed
    tvm.ir.assert_structural_equal(tvm.relax.transform.FoldConstant()(same), slim)
