"""Where the instructions go: guest aarch64 instructions of every kernel call of one
inference on the emulated Cortex-A72 (qemu-user, 1 thread), grouped by kind.

    python benchmarks/guest_profile.py --model googlenet [--rebirth [--kinds streamline]]
                                       [--top 25] [--json]

The original model (or with --rebirth its default plan slimmed with seeded placeholder
weights: the graph and kernels a fine-tuned rebirth model runs) is cross-built as the peers
benchmark builds it (logits, untuned);
in the guest, the Relax VM's instrument hook marks every kernel call for the counting plugin
(`segments=`), which writes each call's own count. Each call's MACs come from its PrimFunc
(conv / dense), so convs show instructions per MAC (the floor is 0.25: one FMLA = 4 MACs).
Writes benchmarks/results/guest_profile_<model>[_rebirth[_<kinds>]].{json,md}.
"""

import argparse
import collections
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from _common import table, write

from tvm_rebirth import flow
from tvm_rebirth.compile.build import compile_module, export_library
from tvm_rebirth.compile.targets import resolve_target
from tvm_rebirth.deploy.peers import logits_module
from tvm_rebirth.deploy.remote import GUEST_PRELUDE, count_guest_run, plugin_path
from tvm_rebirth.report.profile import kernel_macs

# runs in the emulated device's Python: each VM call between two lseek markers, its symbol
# appended to argv[3] in the order the plugin writes the segments
GUEST_PROFILE = GUEST_PRELUDE + """x = tvm.runtime.tensor(np.load(sys.argv[2]), tvm.cpu())
vm["main"](x)  # the first run allocates
names = []


def instrument(func, symbol, before, ret, *args):
    if before:
        names.append(symbol)
        mark(0x5EB1)
    else:
        mark(0x5EB2)
    return 0


vm.set_instrument(instrument)
vm["main"](x)
with open(sys.argv[3], "w") as f:
    f.write("\\n".join(names) + "\\n")
"""


def profile_calls(mod, x, target, what: str) -> tuple:
    """(instructions of one inference, [kernel symbol per call], [instructions per call])
    of ``mod`` cross-built for ``target``, on the emulated device."""
    with tempfile.TemporaryDirectory(prefix="tvm-rebirth-profile-") as tmp:
        work = Path(tmp)
        lib = work / "model.so"
        export_library(compile_module(mod, target).executable, str(lib), target)
        (work / "guest.py").write_text(GUEST_PROFILE)
        np.save(work / "x.npy", x)
        segments = work / "segments.txt"
        total = count_guest_run([work / "guest.py", lib, work / "x.npy", work / "names.txt"],
                                work / "count.txt", 1, what,
                                plugin=f"{plugin_path()},segments={segments}")
        return total, (work / "names.txt").read_text().split(), \
            [int(v) for v in segments.read_text().split()]


def kind_of(name: str) -> str:
    for key in ("winograd", "conv2d", "matmul",
                "dense", "max_pool", "avg_pool", "adaptive", "lrn", "channel_window", "power",
                "concat", "softmax", "pad", "transpose", "reshape", "add", "relu"):
        if key in name:
            return key
    return "other"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="googlenet")
    parser.add_argument("--rebirth", action="store_true",
                        help="the default plan's slimmed model (seeded placeholder weights)")
    parser.add_argument("--kinds", default=None, help="site kinds of the plan (default: all)")
    parser.add_argument("--target", default="cortex-a72")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    model = flow.load(args.model)
    mod, label = model.mod, args.model
    if args.rebirth:
        from tvm_rebirth.passes import rebirth_pipeline

        kinds = args.kinds.split(",") if args.kinds else flow.SITE_KINDS
        plan = flow.find_plan(model, kinds=kinds)
        mod = rebirth_pipeline(plan, None)(mod)
        label += "_rebirth" + (f"_{'_'.join(kinds)}" if args.kinds else "")
    target = resolve_target(args.target)
    x = np.random.default_rng(0).standard_normal(model.input_shapes[model.input_name]).astype("float32")
    logits = logits_module(mod)
    total, names, counts = profile_calls(logits, x, target, f"profile of {args.model}")
    if len(names) != len(counts):
        sys.exit(f"error: {len(names)} calls but {len(counts)} counted segments")
    macs = kernel_macs(logits, target)
    calls = collections.defaultdict(lambda: [0, 0, 0])  # instructions, calls, macs
    for name, n in zip(names, counts):
        calls[name][0] += n
        calls[name][1] += 1
        calls[name][2] += macs.get(name, 0)
    by_kind = collections.Counter()
    for name, (n, _, _) in calls.items():
        by_kind[kind_of(name)] += n
    conv_macs = sum(m for _, _, m in calls.values())
    conv_instr = sum(n for name, (n, _, m) in calls.items() if m)
    result = {"model": args.model, "rebirth": args.rebirth, "kinds": args.kinds,
              "target": args.target,
              "instructions": total, "kernel_instructions": sum(counts),
              "mac_kernels": {"instructions": conv_instr, "macs": conv_macs,
                              "per_mac": round(conv_instr / max(conv_macs, 1), 4)},
              "by_kind": dict(by_kind.most_common()),
              "calls": {name: {"instructions": n, "calls": c, "macs": m,
                               "per_mac": round(n / m, 4) if m else None}
                        for name, (n, c, m) in sorted(calls.items(), key=lambda kv: -kv[1][0])}}
    rows = [[name, f"{v['instructions']:.3g}", v["calls"], f"{v['macs']:.3g}" if v["macs"] else "-",
             f"{v['per_mac']:.3f}" if v["per_mac"] else "-"]
            for name, v in list(result["calls"].items())[:args.top]]
    md = (f"# Guest instructions per kernel: {label.replace('_', ' ')}, "
          f"emulated Cortex-A72, 1 thread\n\n"
          f"Whole inference (between the VM's calls too): {total:.4g}; in kernels "
          f"{sum(counts):.4g}; MAC kernels {conv_instr:.4g} for {conv_macs:.4g} MACs "
          f"({result['mac_kernels']['per_mac']:.3f}/MAC).\n\n"
          + table([[k, f"{n:.3g}", f"{n / sum(counts):.1%}"] for k, n in by_kind.most_common()],
                  ["kind", "instructions", "share"])
          + "\n\n" + table(rows, ["kernel", "instructions", "calls", "MACs", "instr/MAC"])
          + f"\n\nReproduce: `python benchmarks/guest_profile.py {' '.join(sys.argv[1:])}`\n")
    write(f"guest_profile_{label}", result, md)
    print(json.dumps(result, indent=1) if args.json else md)


if __name__ == "__main__":
    os.environ.setdefault("TVM_NUM_THREADS", "1")
    main()
