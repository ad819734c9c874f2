"""The fine-tune's captures of the network slimmed so far, compiled once for all sites.

Fitting a site needs its inputs as the network computes them with every site before it
slimmed; training its block needs the block's inputs with the site slimmed too. Compiling
each of those networks on its own took most of a fine-tune (GoogLeNet: 14 builds of the
network up to a site). Their structure is known before any weight is learned: learning
only changes the values of the rebirth convs and of the convs refitted after them. So
every capture is one function of a single module, those weights its parameters, and the
module is built once (functions share their kernels), for batches of ``capture_batch``
images; a capture then runs with the weights learned so far:

    captures = SlimmedCaptures({name: CaptureRequest(func, variables, trainable)})
    columns = captures.run(name, real_func, real_variables, images, label)

``run`` finds the request's vars in the function the caller built with the real weights
by position, after checking that both functions compute the same ops in the same order,
and passes that function's own weights of the learned convs: what it computes is what
the real function computes. When the functions differ it returns None and the caller
compiles that capture on its own.
"""

from __future__ import annotations

import dataclasses
import logging
import time

from ..passes.dataflow import Dataflow, op_name
from .train import (LearnedWeights, batched_runs, batched_type, capture_batch,
                    make_substitute)

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class CaptureRequest:
    """``variables`` of ``func`` (a function without dataflow blocks, built with placeholder
    weights of the right shapes), computed with the convs of ``trainable`` ({conv binding
    name: (weight key, bias key)}) taking their weights and biases as parameters."""
    func: object
    variables: list
    trainable: dict


def _places(func, graph: Dataflow, variables) -> list | None:
    """Where each var is computed: ("param", index) or ("binding", position); None when a
    var is neither."""
    params = {p: i for i, p in enumerate(func.params)}
    places = []
    for var in variables:
        if var in params:
            places.append(("param", params[var]))
        elif var in graph.position:
            places.append(("binding", graph.position[var]))
        else:
            return None
    return places


def _ops(graph: Dataflow) -> list:
    return [op_name(b.value) for b in graph.bindings]


class SlimmedCaptures:
    """The requests' functions, built as one module for this CPU (see the module
    docstring)."""

    def __init__(self, requests: dict, target=None, batch=None):
        import tvm
        from tvm import relax

        from ..compile.build import compile_module

        start = time.time()
        first = next(iter(requests.values()), None)
        self.batch = batch or (capture_batch(first.func.params[0].ty.shape) if first else 1)
        self._requests, self._params, self._op_lists, self._places, names = {}, {}, {}, {}, {}
        builder = relax.BlockBuilder()
        for i, (key, request) in enumerate(requests.items()):
            graph = Dataflow(request.func)
            places = _places(request.func, graph, request.variables)
            if places is None:
                continue
            name = f"capture{i}"
            self._params[key] = self._emit(builder, name, request, graph, self.batch)
            self._requests[key], self._op_lists[key], names[key] = request, _ops(graph), name
            self._places[key] = places
        mod = builder.get()
        functions = {gv: relax.analysis.remove_all_unused(f) for gv, f in mod.functions.items()}
        self._names = names
        self.vm = relax.VirtualMachine(
            compile_module(tvm.IRModule(functions), target, tuned=False).executable, tvm.cpu())
        self.build_seconds = time.time() - start
        logger.info(f"[finetune] built the captures of {len(names)} fitting step(s) as one "
                    f"module in {self.build_seconds:.1f}s")

    @staticmethod
    def _emit(builder, name, request, graph, batch) -> list:
        """Emit the request's function for ``batch`` images; returns the (weight key, shape)
        of each parameter it takes after the inputs."""
        from tvm import relax

        func = request.func
        weights = LearnedWeights(graph, graph.bindings, request.trainable)
        inputs = [relax.Var(str(p.name), batched_type(p.ty, batch)) for p in func.params]
        mapping = dict(zip(func.params, inputs))
        substitute = make_substitute()(mapping, batch, weights.swaps)
        with builder.function(name, inputs + [weights.params[k] for k in weights.keys]):
            with builder.dataflow():
                weights.emit(builder, graph.bindings, mapping, substitute)
                out = builder.emit_output(relax.Tuple([mapping[v] for v in request.variables]))
            builder.emit_func_output(out)
        return [(k, weights.initial[k].shape) for k in weights.keys]

    def run(self, key, func, variables, images, label) -> list | None:
        """``variables`` of ``func`` (the network slimmed with the weights learned so far)
        for each image, one stacked array per var, computed by the request ``key``'s
        function with ``func``'s own weights; None when that request was not built, or
        ``func`` computes other ops or lacks one of its learned convs."""
        import tvm

        from ..compile.build import to_numpy

        request = self._requests.get(key)
        if request is None:
            return None
        graph = Dataflow(func)
        places, wanted = _places(func, graph, variables), self._places[key]
        learned = LearnedWeights(graph, graph.bindings, request.trainable)
        if places is None or len(func.params) != len(request.func.params) \
                or _ops(graph) != self._op_lists[key] or any(p not in wanted for p in places) \
                or [(k, learned.initial[k].shape) for k in learned.keys] != self._params[key]:
            logger.info(f"[finetune] {label}: the network differs from the one built for it; "
                        "compiling this capture on its own")
            return None
        device = tvm.cpu()
        weights = [tvm.runtime.tensor(learned.initial[k], device) for k in learned.keys]
        function = self.vm[self._names[key]]
        picks = [wanted.index(p) for p in places]

        def run(x):
            outs = to_numpy(function(tvm.runtime.tensor(x, device), *weights))
            return [outs[pick] for pick in picks]

        return batched_runs(run, images, self.batch, label)
