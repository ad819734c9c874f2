"""README's Python API example runs as written and does what it says."""

import re
from pathlib import Path

import tvm
from tvm import relax

import tvm_rebirth.learn.finetune  # noqa: F401 -- as other tests do; the API must survive it

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


def test_results_section_is_generated_from_the_result_files(monkeypatch):
    """README's Results are exactly what benchmarks/run_all.py renders from results/*.json,
    and every result file names a script that exists."""
    import importlib.util
    import json

    bench = README.parent / "benchmarks"
    monkeypatch.syspath_prepend(str(bench))  # as when run as a script: _common beside it
    spec = importlib.util.spec_from_file_location("run_all", bench / "run_all.py")
    run_all = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_all)
    text = README.read_text()
    section = text.split(run_all.BEGIN, 1)[1].split(run_all.END, 1)[0]
    assert section == "\n" + run_all.render(), "run `python benchmarks/run_all.py --readme-only`"
    for path in sorted((bench / "results").glob("*.json")):
        command = run_all.command_of(json.loads(path.read_text())).split()
        assert command[0] == "python" and (README.parent / command[1]).is_file(), path


def test_reliability_count_is_generated_from_its_result_file(monkeypatch):
    """README's count of issue 20's cases (in its Reliability section) is exactly what
    benchmarks/reliability.py renders from results/reliability.json, and adds up."""
    import importlib.util
    import json

    bench = README.parent / "benchmarks"
    monkeypatch.syspath_prepend(str(bench))
    spec = importlib.util.spec_from_file_location("reliability", bench / "reliability.py")
    reliability = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reliability)
    text = README.read_text()
    section = text[text.index("## Reliability"):]
    section = section[:section.index("\n## ")]
    assert reliability.BEGIN in section and reliability.END in section
    block = section.split(reliability.BEGIN, 1)[1].split(reliability.END, 1)[0]
    data = json.loads((bench / "results" / "reliability.json").read_text())
    assert block == "\n" + reliability.render(data), \
        "run `python benchmarks/run_all.py --readme-only`"
    assert data["cases"] == len(data["tests"]) == data["passed"] + data["failed"] + \
        data["skipped"] == sum(data["by_file"].values())
    assert data["command"] == "python benchmarks/reliability.py"
