"""One training step of the default fine-tune's distillation, fmnist-inception with every site
slimmed (``plan --select all``): the whole slimmed network's compiled loss and TVM gradients
for a batch of 32 (`learn.finetune.DistillationRegion`), its median step, the forward loss
alone, the teacher's forward, and where a step's time goes, kernel by kernel (the Relax VM's
instrument, summed over steps). Weights: the closed-form start on 256 calibration images
(the step's time does not depend on them).

    python benchmarks/training_step.py [--steps 30] [--top 12]   # ~1 min on 2 cores

writes benchmarks/results/training_step.{json,md}
"""

import argparse
import collections
import os
import statistics
import sys
import time

os.environ.setdefault("TVM_NUM_THREADS", "2")

import numpy as np  # noqa: E402

from _common import machine, write  # noqa: E402
from run_all import training_step_table, training_step_text  # noqa: E402

from tvm_rebirth import flow  # noqa: E402
from tvm_rebirth.learn.finetune import DistillationRegion, finetune  # noqa: E402

MODEL = "fmnist-inception"


def median_ms(run, steps: int) -> float:
    """The median wall time of ``run()`` over ``steps`` calls, after two warm-up calls."""
    for _ in range(2):
        run()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def kernel_times(trainer, step, steps: int) -> dict:
    """{PrimFunc or VM builtin: (ms per step, calls per step)} of ``steps`` calls of
    ``step()`` (a training step of ``trainer``)."""
    from tvm.runtime.vm import VMInstrumentReturnKind

    spent, calls, started = collections.defaultdict(float), collections.Counter(), {}

    def instrument(func, name, before_run, ret_value, *args):
        if before_run:
            started[name] = time.perf_counter()
        else:
            spent[name] += time.perf_counter() - started.pop(name)
            calls[name] += 1
        return VMInstrumentReturnKind.NO_OP

    trainer.vm.set_instrument(instrument)
    for _ in range(steps):
        step()
    trainer.vm.set_instrument(None)
    return {name: (spent[name] * 1000 / steps, calls[name] // steps) for name in spent}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--top", type=int, default=12, help="kernels listed")
    args = ap.parse_args()
    model = flow.load(MODEL)
    plan = flow.find_plan(model)
    images, _ = flow.calibration(model, flow.RebirthOptions(images=256), plan)
    weights, _ = finetune(model, plan, images, reconstruct_epochs=0, distill_epochs=0)
    region = DistillationRegion.of(model, plan, dict(weights.arrays))
    start = time.time()
    trainer, teacher = region.trainer(), region.teacher()
    compile_seconds = time.time() - start
    batch, rng = trainer.batch, np.random.default_rng(0)
    x = images[rng.integers(0, len(images), batch)]
    targets = teacher.run(x)
    arrays = {k: np.asarray(weights.arrays.get(k, trainer.initial[k]), np.float32)
              for k in trainer.keys}
    scales = [1.0] * len(targets)
    def step():
        trainer.gradients([x], targets, arrays, scales)

    step_ms = median_ms(step, args.steps)
    forward = median_ms(lambda: trainer.loss([x], targets, arrays, scales), args.steps)
    teacher_ms = median_ms(lambda: teacher.run(x), args.steps)
    kernels = kernel_times(trainer, step, args.steps)
    ranked = sorted(kernels.items(), key=lambda item: -item[1][0])
    payload = {"model": MODEL, "sites": len(plan.enabled_sites()), "batch": batch,
               "steps": args.steps, "macs_per_image": trainer.macs_per_image,
               "compile_seconds": round(compile_seconds, 1),
               "step_ms": round(step_ms, 2), "forward_ms": round(forward, 2),
               "teacher_ms": round(teacher_ms, 2),
               "step_gmacs": round(3 * trainer.macs_per_image * batch / step_ms / 1e6, 1),
               "kernels_ms": round(sum(ms for ms, _ in kernels.values()), 2),
               "top_kernels": [{"name": name, "ms": round(ms, 3), "calls": count}
                               for name, (ms, count) in ranked[:args.top]],
               "machine": machine()}
    md = ("# fmnist-inception every site: one distillation training step\n\n"
          + training_step_table(payload) + "\n\n" + training_step_text(payload))
    write("training_step", payload, md)
    print(md)


if __name__ == "__main__":
    sys.exit(main())
