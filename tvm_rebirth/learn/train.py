"""Training with TVM itself: chosen convs of a region of a Relax function fitted by gradient
descent, the region's loss and its gradients compiled by ``relax.transform.Gradient``.

    trainer = RegionTrainer(func, outputs=[y_var],
                            trainable={"conv2": ("site/weight", "site/bias")}, batch=32)
    inputs = trainer.capture(images)        # the vars the region reads, per image
    result = trainer.fit(inputs, [y_target], held_out, arrays)   # arrays: starting weights

The region is the bindings of ``func`` (a function without dataflow blocks) on a path from a
trainable conv (or, ``from_params``, from the parameters) to ``outputs``: exactly the IR the
model build compiles, compiled with its kernels. Its batch dimension becomes ``batch``
(flattening reshapes follow). Each trainable conv's weight, and the constant bias added
right after it, become parameters; everything else stays as it is. The loss is the sum over
outputs of the mean squared error, each divided by its target's mean square, so every
output counts alike; or (``loss="labels"``, one output: the logits) the paper's retraining
loss, half cross-entropy on one-hot labels and half cross-entropy on a teacher's softened
probabilities at ``temperature`` (knowledge distillation, scaled by its square). Adam with
a linear warm-up and a cosine decay runs on the host; every epoch the held-out loss (with
labels: the held-out top-1, then the loss) is measured and the best epoch's weights are
kept (the starting weights when no epoch beats them).
"""

from __future__ import annotations

import dataclasses
import logging
import time

import numpy as np

from ..errors import RebirthError
from ..passes.dataflow import Dataflow, evaluate_constant, op_name
from . import gradients

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class TrainResult:
    """What ``RegionTrainer.fit`` did: learned ``arrays`` (weight/bias key -> array), the
    loss (squared error relative to the targets' mean square) before and after on the
    held-out and the fitted images, the epochs run and the one kept (0: the starting
    weights); with the squared-error loss, ``fit_target_losses``/``held_out_target_losses``:
    each target's term of ``fit_after``/``held_out_after`` (the terms the loss sums)."""
    arrays: dict
    held_out_before: float
    held_out_after: float
    fit_before: float
    fit_after: float
    epochs: int
    kept_epoch: int
    seconds: float
    fit_target_losses: list = dataclasses.field(default_factory=list)
    held_out_target_losses: list = dataclasses.field(default_factory=list)

    def diverging(self, share: float) -> list:
        """Indices of the targets whose fitted loss is below ``share`` of their held-out
        loss (the sign of too few images): one target can diverge while the sum does not,
        when the other targets' terms are much larger."""
        return [i for i, (fit, held) in enumerate(zip(self.fit_target_losses,
                                                      self.held_out_target_losses))
                if fit < share * held]


def _region(graph: Dataflow, starts, outputs) -> tuple:
    """(bindings in order, input vars): the bindings on a path from a ``starts`` var to an
    ``outputs`` var, with the constant-only bindings they read; the inputs are the other
    vars they read (computed before the region, or function parameters)."""
    from tvm import relax

    below, todo = set(), list(starts)
    while todo:  # everything computed from the starts
        var = todo.pop()
        if var in below:
            continue
        below.add(var)
        todo.extend(u for u in graph.users_of(var) if u in graph.value)
    region, todo = set(), [v for v in outputs if v in below]
    while todo:  # ... that an output is computed from
        var = todo.pop()
        if var in region or var not in graph.value:  # a parameter
            continue
        region.add(var)
        todo.extend(v for v in relax.analysis.free_vars(graph.value[var]) if v in below)
    reads = {v for r in region for v in relax.analysis.free_vars(graph.value[r])} - region
    constants = {v for v in reads if v in graph.value and graph.is_const(v)}
    while constants - region:
        region |= constants
        reads = {v for r in region for v in relax.analysis.free_vars(graph.value[r])} - region
        constants = {v for v in reads if v in graph.value and graph.is_const(v)}
    inputs = sorted(reads, key=lambda v: graph.position.get(v, -1))
    return [b for b in graph.bindings if b.var in region], inputs


def function_macs(func) -> int:
    """Multiply-adds of one image through all of ``func``'s convs and matmuls."""
    return _macs_per_image(Dataflow(func).bindings)


def _macs_per_image(bindings) -> int:
    """Multiply-adds of one image through the region's convs and matmuls (batch-1 shapes)."""
    total = 0
    for b in bindings:
        op = op_name(b.value)
        if op == "relax.nn.conv2d":
            out = [int(d) for d in b.var.ty.shape]
            weight = [int(d) for d in b.value.args[1].ty.shape]
            total += int(np.prod(out[1:])) * int(np.prod(weight[1:]))
        elif op == "relax.matmul":
            a, w = ([int(d) for d in arg.ty.shape] for arg in b.value.args)
            total += int(np.prod(a[1:])) * w[-1]
    return total


def _trainable_convs(graph: Dataflow, trainable) -> list:
    return [b.var for b in graph.bindings if str(b.var.name) in trainable
            and op_name(b.value) == "relax.nn.conv2d"]


def reaches(func, trainable, outputs) -> bool:
    """True when every var of ``outputs`` is computed from a conv named in ``trainable``."""
    graph = Dataflow(func)
    bindings, _ = _region(graph, _trainable_convs(graph, trainable), outputs)
    inside = {b.var for b in bindings}
    return all(v in inside for v in outputs)


def region_inputs(func, trainable, outputs) -> list:
    """The vars a ``RegionTrainer`` of these arguments reads (its ``inputs``), without
    building it."""
    graph = Dataflow(func)
    return _region(graph, _trainable_convs(graph, trainable), outputs)[1]


def affordable_steps(func, trainable, outputs, batch: int, max_macs: float) -> int:
    """How many training steps of ``batch`` images the region from the ``trainable`` convs
    to ``outputs`` can take within ``max_macs`` multiply-adds (forward and backward, ~3x
    the forward's), without building anything."""
    graph = Dataflow(func)
    bindings, _ = _region(graph, _trainable_convs(graph, trainable), outputs)
    return int(max_macs // max(3 * _macs_per_image(bindings) * batch, 1))


class LearnedWeights:
    """The trainable convs of ``bindings`` (by binding name, ``trainable``: {conv name:
    (weight key, bias key)}) with their weights, and the constant bias added right after
    each, as parameters of a function built from those bindings.

    ``keys``: the parameters' keys in order; ``params``: {key: relax.Var}; ``initial``:
    {key: the constant it replaces}; ``swaps``: {call: (argument index, replacement)} for
    ``make_substitute``, completed by ``emit``."""

    def __init__(self, graph: Dataflow, bindings, trainable: dict):
        from tvm import relax

        self._relax = relax
        inside = {b.var for b in bindings}
        self.keys, self.initial, self.params, self.swaps, self._biases = [], {}, {}, {}, {}
        for b in bindings:
            name = str(b.var.name)
            if name not in trainable or op_name(b.value) != "relax.nn.conv2d":
                continue
            wkey, bkey = trainable[name]
            self._add(wkey, evaluate_constant(b.value.args[1], graph.var2val))
            self.swaps[b.value] = (1, self.params[wkey])
            adds = [u for u in graph.users_of(b.var) if u in inside and
                    op_name(graph.value[u]) == "relax.add"]
            if bkey is not None and len(adds) == 1:
                add = graph.value[adds[0]]
                self._add(bkey, evaluate_constant(add.args[1], graph.var2val).reshape(-1))
                self._biases[add] = self.params[bkey]

    def _add(self, key, array) -> None:
        self.initial[key] = np.asarray(array, np.float32)
        self.params[key] = self._relax.Var(key, self._relax.TensorType(
            self.initial[key].shape, "float32"))
        self.keys.append(key)

    def emit(self, builder, bindings, mapping, substitute) -> None:
        """Emit ``bindings`` into ``builder``'s open dataflow block through ``substitute``
        (built on ``mapping`` and ``swaps``), each bias parameter reshaped for its add."""
        relax = self._relax
        for add, bias in self._biases.items():  # (C,) -> (1, C, 1, 1), as leaf vars
            self.swaps[add] = (1, builder.emit(relax.op.reshape(
                bias, [1, int(bias.ty.shape[0]), 1, 1])))
        for b in bindings:
            mapping[b.var] = builder.emit(substitute.visit_expr(b.value),
                                          name_hint=str(b.var.name))


def make_substitute():
    """A mutator class (built lazily: tvm imports stay inside functions) that maps vars to
    the training function's own, gives reshapes the new batch, and swaps trainable weights
    and biases for parameters."""
    from tvm import relax

    @relax.expr_functor.mutator
    class Substitute(relax.PyExprMutator):
        def __init__(self, mapping, batch, swaps):
            super().__init__()
            self.mapping, self.batch, self.swaps = mapping, batch, swaps

        def visit_var_(self, var):
            return self.mapping.get(var, var)

        def visit_dataflow_var_(self, var):
            return self.mapping.get(var, var)

        def visit_call_(self, call):
            if op_name(call) == "relax.reshape" and isinstance(call.args[1], relax.ShapeExpr):
                data = self.visit_expr(call.args[0])
                shape = [int(d) for d in call.args[1].values]
                if int(call.args[0].ty.shape[0]) == 1 and int(data.ty.shape[0]) == self.batch:
                    shape[0] = self.batch  # the batch dim of a flatten
                return relax.op.reshape(data, shape)
            swap = self.swaps.get(call)
            if swap is None:
                return super().visit_call_(call)
            index, replacement = swap
            args = [replacement if i == index else self.visit_expr(a)
                    for i, a in enumerate(call.args)]
            return relax.Call(call.op, args, call.attrs)

    return Substitute


def _emit_region(builder, name, weights: LearnedWeights, bindings, inputs, batch, outputs,
                 extra_params, value) -> list:
    """Emit the function ``name``: the region's ``bindings`` for ``batch`` images, from its
    ``inputs`` and ``weights``' parameters (then ``extra_params``) to ``value(builder, [the
    outputs' vars])``; returns the weight parameters (``weights`` serves one function)."""
    from tvm import relax

    region_inputs = [relax.Var(f"input{i}", batched_type(v.ty, batch))
                     for i, v in enumerate(inputs)]
    mapping = dict(zip(inputs, region_inputs))
    substitute = make_substitute()(mapping, batch, weights.swaps)
    params = [weights.params[k] for k in weights.keys]
    with builder.function(name, region_inputs + params + list(extra_params)):
        with builder.dataflow():
            weights.emit(builder, bindings, mapping, substitute)
            out = builder.emit_output(value(builder, [mapping[o] for o in outputs]))
        builder.emit_func_output(out)
    return params


def _squared_error_terms(builder, outputs, targets, scales) -> list:
    """Per output: the mean squared error x its scale."""
    from tvm import relax

    terms = []
    for out, wanted, scale in zip(outputs, targets, scales):
        diff = builder.emit(relax.op.subtract(out, wanted))
        terms.append(builder.emit(relax.op.multiply(
            relax.op.mean(relax.op.multiply(diff, diff)), scale)))
    return terms


def _squared_error(builder, outputs, targets, scales):
    """The sum over outputs of the mean squared error x its scale."""
    from tvm import relax

    loss = None
    for term in _squared_error_terms(builder, outputs, targets, scales):
        loss = term if loss is None else builder.emit(relax.op.add(loss, term))
    return loss


def _retraining_loss(builder, logits, labels, teacher, batch, temperature):
    """0.5 x cross-entropy(logits, labels) + 0.5 x T^2 x cross-entropy(logits / T, teacher),
    the batch mean; ``labels`` one-hot, ``teacher`` softmax(teacher logits / T). (The
    teacher term is KL divergence up to the teacher's own entropy, a constant.)"""
    from tvm import relax

    op = relax.op
    flat = builder.emit(op.reshape(logits, [batch, int(labels.ty.shape[1])]))
    hard = builder.emit(op.sum(op.multiply(labels, op.nn.log_softmax(flat))))
    soft = builder.emit(op.sum(op.multiply(teacher, op.nn.log_softmax(
        op.divide(flat, relax.const(temperature, "float32"))))))
    total = builder.emit(op.add(op.multiply(hard, relax.const(0.5, "float32")),
                                op.multiply(soft, relax.const(0.5 * temperature ** 2,
                                                              "float32"))))
    return builder.emit(op.divide(total, relax.const(-float(batch), "float32")))


# images per run of a capture: batches amortise the VM's per-call cost and run the kernels
# on more rows (GoogLeNet's 13 slimmed captures: 73 s one image a run, 64 s three images a
# run, znver3); small images afford more
CAPTURE_BATCH_ELEMENTS = 1 << 19
CAPTURE_BATCH_MAX = 32


def capture_batch(shape) -> int:
    """Images per capture run for an input of ``shape`` (batch first): as many as fit
    ``CAPTURE_BATCH_ELEMENTS`` input elements, 1 to ``CAPTURE_BATCH_MAX``."""
    elements = int(np.prod([int(d) for d in list(shape)[1:]]))
    return int(min(CAPTURE_BATCH_MAX, max(1, CAPTURE_BATCH_ELEMENTS // max(elements, 1))))


def first_output(func):
    """``func``'s output var (its first, when it returns a tuple)."""
    from tvm import relax

    out = func.body.body
    return out.fields[0] if isinstance(out, relax.Tuple) else out


def padded_batch(images, batch: int) -> np.ndarray:
    """``images`` (at most ``batch``) as float32, zero-padded to ``batch`` rows."""
    images = np.asarray(images, np.float32)
    if len(images) == batch:
        return images
    padded = np.zeros((batch, *images.shape[1:]), np.float32)
    padded[:len(images)] = images
    return padded


def batched_type(ty, batch: int):
    """The tensor type ``ty`` with ``batch`` as its first dimension."""
    from tvm import relax

    return relax.TensorType([batch] + [int(d) for d in list(ty.shape)[1:]], ty.dtype)


def emit_batched(builder, name, func, batch, outputs, attrs=None) -> None:
    """Emit ``func`` (a function without dataflow blocks) as the function ``name`` for
    ``batch`` images (its parameters and flattening reshapes take the new batch), returning
    a tuple of its vars for ``outputs``."""
    from tvm import relax

    graph = Dataflow(func)
    params = [relax.Var(p.name, batched_type(p.ty, batch)) for p in func.params]
    mapping = dict(zip(func.params, params))
    substitute = make_substitute()(mapping, batch, {})
    with builder.function(name, params, attrs=attrs):
        with builder.dataflow():
            for b in graph.bindings:
                mapping[b.var] = builder.emit(substitute.visit_expr(b.value),
                                              name_hint=str(b.var.name))
            result = builder.emit_output(relax.Tuple([mapping[v] for v in outputs]))
        builder.emit_func_output(result)


def batched_runs(run, images, batch: int, label: str) -> list:
    """``run(x)`` (a list of arrays, batch first) over ``images`` in batches of ``batch``
    (the last one padded with zeros, its padding's rows dropped), one array per output with
    a row per image, with progress in the log."""
    columns, start, logged = None, time.time(), 0
    images = np.asarray(images, np.float32)
    for first in range(0, len(images), batch):
        chunk = images[first:first + batch]
        outs = run(padded_batch(chunk, batch))
        if columns is None:  # filled in place: the captures can take gigabytes
            columns = [np.empty((len(images), *out.shape[1:]), out.dtype) for out in outs]
        for column, out in zip(columns, outs):
            column[first:first + len(chunk)] = out[:len(chunk)]
        done = first + len(chunk)
        if done - logged >= 64 or done == len(images):
            logged = done
            logger.info(f"[finetune]   {label}: {done}/{len(images)} images "
                        f"({time.time() - start:.1f}s)")
    return columns or []


def batched_head(func, batch, outputs, attrs=None):
    """A module whose "main" is ``func`` (a function without dataflow blocks) for ``batch``
    images up to ``outputs`` (vars of ``func``), returning them as a tuple; the bindings
    they do not need are dropped."""
    import tvm
    from tvm import relax

    builder = relax.BlockBuilder()
    emit_batched(builder, "main", func, batch, list(outputs), attrs=attrs)
    head = relax.analysis.remove_all_unused(builder.get()["main"])
    return tvm.IRModule({"main": head.with_attr("global_symbol", "main")})


def compute_vars(func, variables, images, label, target=None, batch=None) -> list:
    """``variables`` (vars of ``func``, a function without dataflow blocks) for each image,
    one stacked array per var: the function up to them, compiled as the model build compiles
    it for ``batch`` images a run (default: ``capture_batch``), with progress in the log."""
    from ..compile.build import Runner

    batch = batch or capture_batch(func.params[0].ty.shape)
    attrs = dict(func.attrs.items()) if func.attrs is not None else None
    runner = Runner(batched_head(func, batch, variables, attrs), target)
    return batched_runs(runner, images, batch, label)


class StagedArguments:
    """The arguments of a compiled function called thousands of times (a training step)
    as TVM tensors made once: each call copies the values into the tensors' memory,
    seen as numpy arrays, instead of making ~50 tensors a step (a tenth of
    fmnist-inception's distillation, measured)."""

    def __init__(self):
        self._buffers, self._tensors = [], []

    def __call__(self, values) -> list:
        import tvm

        for i, value in enumerate(values):
            value = np.asarray(value)
            if i == len(self._buffers):
                self._buffers.append(None)
                self._tensors.append(None)
            buffer = self._buffers[i]
            if buffer is None or buffer.shape != value.shape or buffer.dtype != value.dtype:
                self._tensors[i] = tvm.runtime.empty(value.shape, value.dtype)
                buffer = self._buffers[i] = np.from_dlpack(self._tensors[i])
            np.copyto(buffer, value)
        return self._tensors[:len(values)]


class RegionTrainer:
    """The compiled loss and gradients of a region of ``func`` (see the module docstring).

    ``trainable``: {conv binding name: (weight key, bias key)}. The region runs from those
    convs (``from_params``: from the function's parameters) to ``outputs`` (vars of
    ``func``, which must be a function without dataflow blocks); ``inputs`` are the vars it
    reads, computed before it (``capture`` computes them from images); ``initial`` the
    starting arrays (the function's constants)."""

    def __init__(self, func, outputs, trainable: dict, batch: int, target=None,
                 from_params=False, loss="mse", temperature=4.0):
        import tvm
        from tvm import relax

        from ..compile.build import compile_module

        gradients.register()
        graph = Dataflow(func)
        starts = list(func.params) if from_params else _trainable_convs(graph, trainable)
        bindings, inputs = _region(graph, starts, outputs)
        inside = {b.var for b in bindings}
        if not all(v in inside for v in outputs):
            raise RebirthError("the training region's outputs are not computed from its "
                               f"trainable convs ({', '.join(sorted(trainable))})")
        self.func, self.inputs, self.target = func, inputs, target
        self.macs_per_image = _macs_per_image(bindings)
        weights = LearnedWeights(graph, bindings, trainable)
        self.keys, self.initial = weights.keys, weights.initial
        if not self.keys:
            raise RebirthError("the training region has none of the trainable convs "
                               f"({', '.join(sorted(trainable))})")
        self.batch = batch
        if loss not in ("mse", "labels") or (loss == "labels" and len(outputs) != 1):
            raise RebirthError(f"training loss {loss!r}: use 'mse', or 'labels' with one "
                               "output (the logits)")
        self.scaled = loss == "mse"  # fit passes one scale per output
        if self.scaled:
            targets = [relax.Var(f"target{i}", batched_type(v.ty, batch))
                       for i, v in enumerate(outputs)]
            scales = [relax.Var(f"scale{i}", relax.TensorType([], "float32"))
                      for i in range(len(outputs))]
        else:  # one-hot labels and the teacher's softened probabilities, [batch, classes]
            classes = int(np.prod([int(d) for d in list(outputs[0].ty.shape)[1:]]))
            targets = [relax.Var(name, relax.TensorType([batch, classes], "float32"))
                       for name in ("labels", "teacher")]
            scales = []

        def value(builder, outs):
            if self.scaled:
                return _squared_error(builder, outs, targets, scales)
            return _retraining_loss(builder, outs[0], *targets, batch, temperature)

        builder = relax.BlockBuilder()
        params = _emit_region(builder, "loss", weights, bindings, inputs, batch, outputs,
                              targets + scales, value)
        if self.scaled:  # each output's term, to tell which target overfits
            term_targets, term_scales = ([relax.Var(str(v.name), v.ty) for v in group]
                                         for group in (targets, scales))
            _emit_region(builder, "terms", LearnedWeights(graph, bindings, trainable),
                         bindings, inputs, batch, outputs, term_targets + term_scales,
                         lambda b, outs: relax.Tuple(_squared_error_terms(
                             b, outs, term_targets, term_scales)))
        else:  # the logits alone, for the held-out top-1
            _emit_region(builder, "logits", LearnedWeights(graph, bindings, trainable),
                         bindings, inputs, batch, outputs, [],
                         lambda b, outs: b.emit(relax.op.reshape(outs[0], [batch, classes])))
        mod = builder.get()
        problems = gradients.untrainable_ops(mod["loss"])
        if problems:
            op, why = next(iter(problems.items()))
            raise RebirthError(f"cannot train through {op}: {why}")
        mod = relax.transform.Gradient("loss", require_grads=params)(mod)
        start = time.time()
        self.vm = relax.VirtualMachine(compile_module(mod, target, tuned=False).executable,
                                       tvm.cpu())
        logger.debug(f"[train] compiled a region of {len(bindings)} bindings, "
                     f"{len(self.keys)} trainable arrays, in {time.time() - start:.1f}s")
        self._staged = StagedArguments()

    def capture(self, images, label="region inputs") -> list:
        """The region's inputs for each image (one array per input var, batch first)."""
        return compute_vars(self.func, list(self.inputs), images, label, self.target)

    def _batches(self, count, rng):
        order = rng.permutation(count) if rng is not None else np.arange(count)
        for start in range(0, count - self.batch + 1, self.batch):
            yield order[start:start + self.batch]

    def _args(self, inputs, targets, arrays, scales):
        return self._staged(list(inputs) + [arrays[k] for k in self.keys] + list(targets)
                            + [np.float32(s) for s in scales])

    def gradients(self, inputs, targets, arrays, scales) -> tuple:
        """(loss, {key: gradient}) of one batch: ``inputs``/``targets`` hold ``batch`` rows,
        ``scales`` one factor per output (none for the labels loss)."""
        loss, grads = self.vm["loss_adjoint"](*self._args(inputs, targets, arrays, scales))
        return float(loss.numpy()), {k: g.numpy() for k, g in zip(self.keys, grads)}

    def _per_batch(self, function, inputs, targets, arrays, scales):
        """(row indices, the compiled ``function``'s result) for each whole batch of
        ``inputs`` in order (``targets``: rows alike)."""
        for i in self._batches(len(inputs[0]), None):
            yield i, self.vm[function](*self._args([x[i] for x in inputs],
                                                   [t[i] for t in targets], arrays, scales))

    def loss(self, inputs, targets, arrays, scales) -> float:
        """Mean loss over whole batches of ``inputs``."""
        values = [float(out.numpy())
                  for _, out in self._per_batch("loss", inputs, targets, arrays, scales)]
        return float(np.mean(values)) if values else float("nan")

    def target_losses(self, inputs, targets, arrays, scales) -> list:
        """Each output's term of the mean loss over whole batches of ``inputs`` (the
        squared-error loss: they sum to ``loss``)."""
        values = [[float(term.numpy()) for term in out]
                  for _, out in self._per_batch("terms", inputs, targets, arrays, scales)]
        return [float(v) for v in np.mean(values, axis=0)] if values else []

    def top1(self, inputs, labels, arrays) -> float:
        """The share of whole batches of ``inputs`` whose logits' argmax is the one-hot
        ``labels``' class (``loss="labels"`` trainers)."""
        hits = [np.argmax(out.numpy(), axis=1) == np.argmax(labels[i], axis=1)
                for i, out in self._per_batch("logits", inputs, [], arrays, [])]
        return float(np.mean(np.concatenate(hits))) if hits else float("nan")

    def fit(self, inputs, targets, held, arrays=None, epochs=20, lr=1e-3, seed=0,
            augment=None, label="region", progress=False, max_macs=None,
            patience=None) -> TrainResult:
        """Adam on the non-held images; the held-out images choose the epoch kept (the
        lowest loss; with ``loss="labels"`` the best top-1, then the lowest loss).
        ``arrays``: starting weights (default: the region's constants); ``augment(x, t,
        rng)`` may transform a batch of inputs and targets alike; ``progress`` logs every
        epoch at INFO (else DEBUG); ``max_macs`` caps the training's multiply-adds
        (forward and backward, ~3x the forward's), fewer epochs for big regions."""
        start = time.time()
        arrays = {k: np.array((arrays or self.initial).get(k, self.initial[k]), np.float32)
                  for k in self.keys}
        fit = ~held if held.any() else np.ones(len(held), bool)
        check = held if held.sum() >= self.batch else fit
        fit_in, fit_t = [x[fit] for x in inputs], [t[fit] for t in targets]
        check_in, check_t = [x[check] for x in inputs], [t[check] for t in targets]
        if len(fit_in[0]) < self.batch:
            raise RebirthError(f"{label}: {len(fit_in[0])} images to fit, fewer than one "
                               f"batch of {self.batch}")
        scales = np.array([1.0 / max(float(np.mean(t.astype(np.float64) ** 2)), 1e-12)
                           for t in fit_t], np.float32) if self.scaled else []
        def score(weights) -> tuple:
            """(what ranks the weights, lower is better, the held-out loss last; with the
            squared-error loss its per-target terms, which it sums)"""
            if self.scaled:
                terms = self.target_losses(check_in, check_t, weights, scales)
                return (float(sum(terms)),), terms
            return (-self.top1(check_in, check_t[0], weights),
                    self.loss(check_in, check_t, weights, scales)), []

        before, held_terms = score(arrays)
        best = before
        before_fit = self.loss(fit_in, fit_t, arrays, scales)
        best_arrays, kept = {k: v.copy() for k, v in arrays.items()}, 0
        moments = {k: (np.zeros_like(v), np.zeros_like(v)) for k, v in arrays.items()}
        rng = np.random.default_rng(seed)
        steps_per_epoch = len(fit_in[0]) // self.batch
        if max_macs is not None:
            affordable = max_macs // max(3 * self.macs_per_image * self.batch, 1)
            epochs = int(max(1, min(epochs, affordable // steps_per_epoch)))
        total, step = epochs * steps_per_epoch, 0
        warmup = max(1, total // 5)
        beta1, beta2 = 0.9, 0.999
        for epoch in range(1, epochs + 1):
            for index in self._batches(len(fit_in[0]), rng):
                x = [a[index] for a in fit_in]
                t = [a[index] for a in fit_t]
                if augment is not None:
                    x, t = augment(x, t, rng)
                _, grads = self.gradients(x, t, arrays, scales)
                step += 1
                # a linear warm-up (Adam's first steps would throw the good start away),
                # then a cosine decay
                rate = lr * min(1.0, step / warmup) * 0.5 * \
                    (1 + np.cos(np.pi * (step - 1) / total))
                for k, g in grads.items():
                    m, v = moments[k]
                    m *= beta1
                    m += (1 - beta1) * g
                    v *= beta2
                    v += (1 - beta2) * g * g
                    arrays[k] -= rate * (m / (1 - beta1 ** step)) / \
                        (np.sqrt(v / (1 - beta2 ** step)) + 1e-8)
            now, terms = score(arrays)
            if now < best:
                best, held_terms, kept = now, terms, epoch
                best_arrays = {k: v.copy() for k, v in arrays.items()}
            logger.log(logging.INFO if progress else logging.DEBUG,
                       f"[finetune] {label}: epoch {epoch}/{epochs}, held-out loss "
                       f"{now[-1]:.5f}" + ("" if self.scaled else
                                           f", top-1 {-now[0] * 100:.2f}%")
                       + f" ({time.time() - start:.0f}s)")
            if patience is not None and epoch - kept >= patience:
                epochs = epoch  # what was run
                break
        fit_terms = []
        if self.scaled:
            fit_terms = self.target_losses(fit_in, fit_t, best_arrays, scales)
            after_fit = float(sum(fit_terms))
        else:
            after_fit = self.loss(fit_in, fit_t, best_arrays, scales)
        return TrainResult(arrays=best_arrays, held_out_before=before[-1],
                           held_out_after=best[-1],
                           fit_before=before_fit, fit_after=after_fit, epochs=epochs,
                           kept_epoch=kept, seconds=round(time.time() - start, 2),
                           fit_target_losses=fit_terms, held_out_target_losses=held_terms)


class RegionForwards:
    """Regions of ``func`` (a function without dataflow blocks), each the bindings from its
    start var to ``outputs`` (as ``RegionTrainer``'s), compiled forward only for ``batch``
    images, as one module (they share their kernels); each region's trainable convs take
    their weights as parameters:

        forwards = RegionForwards(func, {key: (start, trainable)}, outputs, batch)
        outs = forwards.run(key, start_values, arrays, label)   # None: not built

    A region that reads any var besides its start (a skip connection from before it) is not
    built: its values are not given."""

    def __init__(self, func, regions: dict, outputs, batch: int, target=None):
        import tvm
        from tvm import relax

        from ..compile.build import compile_module

        graph = Dataflow(func)
        self.batch, self._keys, self._initial, names = batch, {}, {}, {}
        builder = relax.BlockBuilder()
        for i, (key, (start, trainable)) in enumerate(regions.items()):
            bindings, _ = _region(graph, [start], outputs)
            bindings = [b for b in bindings if not b.var.same_as(start)]  # given
            inside = {b.var for b in bindings}
            reads = {v for b in bindings for v in relax.analysis.free_vars(b.value)} - inside
            if reads - {start} or not all(v in inside for v in outputs):
                continue
            weights = LearnedWeights(graph, bindings, trainable)
            names[key] = f"region{i}"
            _emit_region(builder, names[key], weights, bindings, [start], batch, outputs, [],
                         lambda b, outs: relax.Tuple(outs))
            self._keys[key], self._initial[key] = weights.keys, weights.initial
        self._names = names
        self.vm = relax.VirtualMachine(compile_module(builder.get(), target, tuned=False)
                                       .executable, tvm.cpu()) if names else None
        self._tensor = tvm.runtime.tensor

    def run(self, key, values, arrays, label) -> list | None:
        """The outputs (one array per output, a row per row of ``values``) of region ``key``
        from ``values`` (its start var's, batch first) with the trainable convs' ``arrays``
        (those missing keep the function's own); None when that region was not built."""
        from ..compile.build import to_numpy

        if key not in self._names:
            return None
        function = self.vm[self._names[key]]
        own = self._initial[key]
        weights = [self._tensor(np.ascontiguousarray(arrays.get(k, own[k]), np.float32))
                   for k in self._keys[key]]
        return batched_runs(lambda x: to_numpy(function(self._tensor(x), *weights)), values,
                            self.batch, label)


class BatchedForward:
    """``func`` compiled for a batch of ``batch`` (flattening reshapes follow), up to
    ``outputs`` (vars of ``func``; default its first output): ``forward(x)`` the first of
    them, ``forward.run(x)`` all of them, as numpy arrays, for up to ``batch`` images (fewer
    are padded with zeros to the compiled batch; their outputs are dropped)."""

    def __init__(self, func, batch: int, target=None, outputs=None):
        import tvm
        from tvm import relax

        from ..compile.build import compile_module

        module = batched_head(func, batch, outputs or [first_output(func)])
        self.vm = relax.VirtualMachine(compile_module(module, target, tuned=False).executable,
                                       tvm.cpu())
        self._tensor = tvm.runtime.tensor
        self.batch = batch

    def run(self, x) -> list:
        from ..compile.build import to_numpy

        if len(x) > self.batch:
            raise RebirthError(f"{len(x)} images for a forward compiled for {self.batch}")
        outs = to_numpy(self.vm["main"](self._tensor(padded_batch(x, self.batch))))
        return [out[:len(x)] for out in outs]

    def __call__(self, x):
        return self.run(x)[0]


def image_augmentation(teacher, flip=True, shift=2, mix=0.5):
    """An ``augment`` for ``RegionTrainer.fit`` whose only input is the images and whose
    targets are ``teacher(images)`` (a list, one array per target): seeded horizontal
    flips, shifts by up to ``shift`` pixels (zero fill) and, for a ``mix`` share of each
    batch, a blend of two images (mixup); the teacher labels what the student sees, so
    every epoch sees new pairs."""

    def augment(x, t, rng):
        images = x[0].copy()
        n = len(images)
        if flip:
            flipped = rng.random(n) < 0.5
            images[flipped] = images[flipped][..., ::-1]
        if shift:
            for i, (dy, dx) in enumerate(rng.integers(-shift, shift + 1, size=(n, 2))):
                images[i] = np.roll(images[i], (dy, dx), axis=(-2, -1))
                if dy:
                    images[i][..., (slice(0, dy) if dy > 0 else slice(dy, None)), :] = 0
                if dx:
                    images[i][..., (slice(0, dx) if dx > 0 else slice(dx, None))] = 0
        mixed = rng.random(n) < mix
        if mixed.any():
            weight = rng.uniform(0.2, 0.8, size=(int(mixed.sum()), 1, 1, 1)).astype(np.float32)
            partner = images[rng.permutation(n)[:int(mixed.sum())]]
            images[mixed] = weight * images[mixed] + (1 - weight) * partner
        return [images], teacher(images)

    return augment


def softened(logits, temperature: float) -> np.ndarray:
    """softmax(logits / temperature) over the classes of [batch, ...] logits, [batch, K]."""
    z = logits.reshape(len(logits), -1).astype(np.float64) / temperature
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return (z / z.sum(axis=1, keepdims=True)).astype(np.float32)


def labeled_augmentation(teacher, temperature: float, flip=True, shift=0):
    """An ``augment`` for ``RegionTrainer.fit`` with ``loss="labels"``: the images shifted
    (and flipped) as ``image_augmentation`` does, without blends (a blend has no one label);
    the one-hot labels stay, the teacher's softened probabilities are recomputed."""
    moved = image_augmentation(teacher, flip=flip, shift=shift, mix=0.0)

    def augment(x, t, rng):
        images, (logits,) = moved(x, t, rng)
        return images, [t[0], softened(logits, temperature)]

    return augment
