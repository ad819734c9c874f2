"""Issue 20's fault and bad-input cases, counted: runs tests/test_faults.py and
tests/test_faults_tuning.py with pytest (one file at a time, TVM_NUM_THREADS=1 unless set),
reads each case's outcome from pytest's JUnit XML (a parametrized test counts once per
parameter set), groups the cases by the issue's defect item (the `# -- N. ...` comment
above each test) and rewrites the count in README's Reliability section.

    python benchmarks/reliability.py                # run the cases, write results, README
    python benchmarks/reliability.py --readme-only  # README's count from the JSON as it is

writes benchmarks/results/reliability.{json,md}; README's block between the
`reliability:begin` and `reliability:end` markers is generated here from reliability.json
and nothing else (tests/test_readme.py checks that it matches; `run_all.py --readme-only`
regenerates it with the Results section).
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
README = ROOT / "README.md"
BEGIN, END = "<!-- reliability:begin -->", "<!-- reliability:end -->"
FILES = ["tests/test_faults.py", "tests/test_faults_tuning.py"]
# issue 20's defect items, as the issue names them (shortened)
ITEMS = {1: "`-o` destroys what is at the path", 2: "a torn tuning record breaks later runs",
         3: "hangs with no message (network waits)", 4: "`tune` fails with exit 0",
         5: "bad weights accepted", 6: "plan typos ignored",
         7: "models outside one float NCHW input", 8: "Ctrl-C during `tune`",
         9: "the tracker outlives its recorded PID", 10: "numeric flags unchecked",
         11: "calibration data", 12: "misleading messages",
         13: "leftover candidate folders"}
SECTION = re.compile(r"^# -- ([\d, ]+)\.")
TEST = re.compile(r"^def (test_\w+)")


def items_of(path: Path) -> dict:
    """{test function: [defect items]} from the `# -- N. ...` (or `# -- N, M. ...`) comment
    that opens the section a test sits in."""
    found, current = {}, []
    for line in path.read_text().splitlines():
        match = SECTION.match(line)
        if match:
            current = [int(n) for n in match.group(1).replace(" ", "").split(",") if n]
        match = TEST.match(line)
        if match:
            found[match.group(1)] = list(current)
    return found


def _first_line(text) -> str:
    return (str(text or "").strip().splitlines() or [""])[0][:200]


def run_file(test_file: str) -> tuple:
    """Run one test file; ([case dicts], pytest's exit status, seconds)."""
    items = items_of(ROOT / test_file)
    env = dict(os.environ)
    env.setdefault("TVM_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory(prefix="reliability-") as tmp:
        xml = Path(tmp) / "junit.xml"
        started = time.time()
        proc = subprocess.run([sys.executable, "-m", "pytest", test_file, "-q",
                               "-p", "no:cacheprovider", f"--junitxml={xml}"],
                              cwd=ROOT, env=env, check=False)
        seconds = time.time() - started
        if not xml.exists():
            raise SystemExit(f"pytest {test_file} wrote no report (exit {proc.returncode})")
        cases = {}
        for case in ET.parse(xml).getroot().iter("testcase"):
            name = case.get("name")
            outcome, message = "passed", ""
            for child in case:
                if child.tag in ("failure", "error"):
                    outcome, message = "failed", child.get("message") or child.text
                    break
                if child.tag == "skipped":
                    outcome, message = "skipped", child.get("message") or child.text
            # a teardown error repeats the case: it counts once, as failed
            previous = cases.get(name)
            if previous and previous["outcome"] == "failed":
                continue
            cases[name] = {"file": test_file, "case": name,
                           "items": items.get(name.split("[", 1)[0], []),
                           "outcome": outcome, "seconds": round(float(case.get("time", 0)), 1),
                           "message": _first_line(message)}
    return list(cases.values()), proc.returncode, seconds


def summarize(cases) -> dict:
    count = lambda cs, what: sum(1 for c in cs if c["outcome"] == what)  # noqa: E731
    by_item = []
    for number, title in ITEMS.items():
        mine = [c for c in cases if number in c["items"]]
        by_item.append({"item": number, "title": title, "cases": len(mine),
                        "passed": count(mine, "passed"), "failed": count(mine, "failed"),
                        "skipped": count(mine, "skipped")})
    by_file = {f: sum(1 for c in cases if c["file"] == f) for f in FILES}
    return {"cases": len(cases), "passed": count(cases, "passed"),
            "failed": count(cases, "failed"), "skipped": count(cases, "skipped"),
            "unassigned": sum(1 for c in cases if not c["items"]), "by_file": by_file,
            "by_item": by_item}


def _table(rows, header) -> str:
    from _common import table

    return table(rows, header)


def item_table(data) -> str:
    rows = [[f"{i['item']}. {i['title']}", i["cases"] or "-", i["passed"] if i["cases"] else "-",
             i["failed"] if i["cases"] else "-", i["skipped"] if i["cases"] else "-"]
            for i in data["by_item"]]
    return _table(rows, ["defect (issue 20)", "cases", "passed", "failed", "skipped"])


def render(data) -> str:
    """README's block: the count, by defect item, with how to reproduce it."""
    files = ", ".join(f"`{f}` {n}" for f, n in data["by_file"].items())
    text = (f"**{data['cases']} cases tried, {data['passed']} passed, {data['failed']} failed, "
            f"{data['skipped']} skipped** ({files}; a parametrized test counts once per "
            "parameter set, a case can serve several items):\n\n" + item_table(data) + "\n")
    skipped = [c for c in data["tests"] if c["outcome"] != "passed"]
    if skipped:
        text += "\nNot passed: " + "; ".join(
            f"`{c['case']}` {c['outcome']} ({c['message']})" for c in skipped) + ".\n"
    return (text + f"\nGenerated by `{data['command']}` (revision {data.get('revision') or '?'},"
            f" {data['machine'].get('threads', '?')} TVM thread(s)).\n")


def update_readme(data=None) -> bool:
    """Replace README's reliability block by the render of results/reliability.json; True
    if it changed."""
    import json

    if data is None:
        path = RESULTS / "reliability.json"
        if not path.exists():
            return False
        data = json.loads(path.read_text())
    readme = README.read_text()
    if BEGIN not in readme or END not in readme:
        raise SystemExit(f"{README}: the {BEGIN} / {END} markers are missing")
    head, rest = readme.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    new = head + BEGIN + "\n" + render(data) + END + tail
    if new != readme:
        README.write_text(new)
    return new != readme


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--readme-only", action="store_true",
                    help="do not run the tests; regenerate README's block from the JSON")
    args = ap.parse_args()
    if not args.readme_only:
        from _common import write

        cases, statuses, seconds = [], {}, 0.0
        for test_file in FILES:
            print(f"[reliability] pytest {test_file}", file=sys.stderr, flush=True)
            found, status, took = run_file(test_file)
            cases += found
            statuses[test_file] = status
            seconds += took
        data = dict(summarize(cases), pytest_exit=statuses, wall_seconds=round(seconds),
                    tests=cases)
        md = ("# Issue 20: fault and bad-input cases\n\n"
              + f"{data['cases']} cases, {data['passed']} passed, {data['failed']} failed, "
                f"{data['skipped']} skipped in {data['wall_seconds']} s.\n\n"
              + item_table(data) + "\n\n"
              + _table([[c["file"].split("/")[-1], c["case"],
                         ", ".join(map(str, c["items"])) or "-", c["outcome"], c["seconds"]]
                        for c in cases], ["file", "case", "items", "outcome", "s"]))
        write("reliability", data, md)
    import json

    changed = update_readme(json.loads((RESULTS / "reliability.json").read_text()))
    print(f"[reliability] README Reliability count {'updated' if changed else 'unchanged'}",
          file=sys.stderr)
    failed = 0 if args.readme_only else data["failed"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
