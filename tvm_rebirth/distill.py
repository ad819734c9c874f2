"""Optional end-to-end refinement: distil the original model's outputs into the learned
rebirth (and refitted) convs with PyTorch (CPU), after the layer-wise stage.

The Relax function itself is interpreted op by op in torch, so what is trained is exactly
what TVM compiles: the learned convs become parameters, everything else stays constant.
Install the extra with ``pip install torch==2.13.0``.
"""

from __future__ import annotations

import sys
import time

import numpy as np

from .errors import RebirthError
from .passes.exact_merge import evaluate_constant


def _log(message):
    print(message, file=sys.stderr, flush=True)


def _ints(values):
    return [int(v) for v in values]


class RelaxInTorch:
    """Evaluates a Relax dataflow function with torch ops; convs named in ``trainable``
    (layer name -> (weight key, bias key)) get trainable weights and biases."""

    def __init__(self, func, trainable=None):
        import torch
        from tvm import relax

        self.torch, self.relax = torch, relax
        self.func = func
        self.bindings = [b for block in func.body.blocks for b in block.bindings]
        self.params = {}  # key -> torch Parameter
        self._const, self._bias = {}, {}
        trainable = trainable or {}
        conv_of_add = {}
        var2val = relax.analysis.get_var2val(func)
        for b in self.bindings:
            op = getattr(getattr(b.value, "op", None), "name", "")
            name = str(b.var.name)
            if op == "relax.nn.conv2d" and name in trainable:
                wkey, bkey = trainable[name]
                self.params[wkey] = torch.nn.Parameter(self._array(b.value.args[1]))
                self._const[b.value.args[1]] = self.params[wkey]
                conv_of_add[b.var] = bkey
            elif op == "relax.add" and b.value.args[0] in conv_of_add:
                bkey = conv_of_add[b.value.args[0]]
                bias = torch.from_numpy(
                    evaluate_constant(b.value.args[1], var2val).astype(np.float32).reshape(-1))
                self.params[bkey] = torch.nn.Parameter(bias.reshape(-1))
                self._bias[b.value.args[1]] = self.params[bkey]

    def _array(self, expr):
        return self.torch.from_numpy(np.ascontiguousarray(expr.value.numpy()))

    def value(self, expr, env):
        relax = self.relax
        if expr in self._bias:
            return self._bias[expr].reshape(1, -1, 1, 1)
        if expr in self._const:
            return self._const[expr]
        if isinstance(expr, relax.Var):
            return env[expr]
        if hasattr(expr, "value") and hasattr(expr.value, "numpy"):  # a constant
            tensor = self._array(expr)
            self._const[expr] = tensor
            return tensor
        if isinstance(expr, relax.Tuple):
            return [self.value(f, env) for f in expr.fields]
        raise RebirthError(f"end-to-end refinement: unsupported expression {type(expr).__name__}")

    def __call__(self, x):
        env = {self.func.params[0]: x}
        for b in self.bindings:
            env[b.var] = self._op(b.value, env)
        return env[self.func.body.body] if isinstance(self.func.body.body, self.relax.Var) \
            else self.value(self.func.body.body, env)

    def _op(self, call, env):
        torch = self.torch
        F = torch.nn.functional
        relax = self.relax
        if isinstance(call, relax.TupleGetItem):
            return self.value(call.tuple_value, env)[int(call.index)]
        op = getattr(call.op, "name", "")
        args = call.args
        a = call.attrs
        if op in ("relax.add", "relax.subtract", "relax.multiply", "relax.divide", "relax.power"):
            x, y = self.value(args[0], env), self.value(args[1], env)
            return {"relax.add": torch.add, "relax.subtract": torch.sub,
                    "relax.multiply": torch.mul, "relax.divide": torch.div,
                    "relax.power": torch.pow}[op](x, y)
        if op == "relax.nn.relu":
            return F.relu(self.value(args[0], env))
        if op == "relax.nn.conv2d":
            x, w = self.value(args[0], env), self.value(args[1], env)
            t, l, bottom, r = _ints(a.padding)
            return F.conv2d(F.pad(x, (l, r, t, bottom)), w, stride=_ints(a.strides),
                            dilation=_ints(a.dilation), groups=int(a.groups))
        if op in ("relax.nn.max_pool2d", "relax.nn.avg_pool2d"):
            x = self.value(args[0], env)
            t, l, bottom, r = _ints(a.padding)
            if op == "relax.nn.max_pool2d":
                x = F.pad(x, (l, r, t, bottom), value=float("-inf"))
                return F.max_pool2d(x, _ints(a.pool_size), _ints(a.strides),
                                    ceil_mode=bool(a.ceil_mode))
            if (t, l) == (bottom, r):
                return F.avg_pool2d(x, _ints(a.pool_size), _ints(a.strides), padding=(t, l),
                                    ceil_mode=bool(a.ceil_mode),
                                    count_include_pad=bool(a.count_include_pad))
            raise RebirthError("end-to-end refinement: asymmetric avg_pool2d padding")
        if op == "relax.nn.avg_pool3d":
            x = self.value(args[0], env)
            p = _ints(a.padding)
            return F.avg_pool3d(x, _ints(a.pool_size), _ints(a.strides), padding=p[:3],
                                count_include_pad=bool(a.count_include_pad))
        if op == "relax.expand_dims":
            x = self.value(args[0], env)
            for axis in sorted(_ints(a.axis)):
                x = x.unsqueeze(axis)
            return x
        if op == "relax.squeeze":
            x = self.value(args[0], env)
            for axis in sorted(_ints(a.axis), reverse=True):
                x = x.squeeze(axis)
            return x
        if op == "relax.reshape":
            shape = _ints(args[1].values)
            return self.value(args[0], env).reshape([-1] + shape[1:] if shape[0] == 1
                                                    else shape)
        if op == "relax.concat":
            return torch.cat(self.value(args[0], env), dim=int(a.axis))
        if op == "relax.mean":
            return self.value(args[0], env).mean(dim=_ints(a.axis), keepdim=bool(a.keepdims))
        if op == "relax.permute_dims":
            return self.value(args[0], env).permute(_ints(a.axes))
        if op == "relax.matmul":
            return torch.matmul(self.value(args[0], env), self.value(args[1], env))
        if op == "relax.nn.softmax":
            return F.softmax(self.value(args[0], env), dim=int(a.axis))
        raise RebirthError(f"end-to-end refinement does not support {op or type(call).__name__}")


def distill(original_mod, rebirth_mod, trainable, images, epochs=3, batch=64, lr=1e-3,
            seed=0, log=_log) -> dict:
    """Train the ``trainable`` convs of ``rebirth_mod`` so its outputs match
    ``original_mod``'s on ``images``; returns {key: array} and a report."""
    try:
        import torch
    except ImportError:
        raise RebirthError("end-to-end refinement needs PyTorch: pip install torch==2.13.0") \
            from None
    torch.manual_seed(seed)
    teacher = RelaxInTorch(original_mod["main"])
    student = RelaxInTorch(rebirth_mod["main"], trainable)
    if not student.params:
        raise RebirthError("end-to-end refinement: no learned conv found in the rebirth model")
    opt = torch.optim.Adam(student.params.values(), lr=lr)
    x_all = torch.from_numpy(np.ascontiguousarray(images, np.float32))
    held = torch.arange(len(x_all)) % 8 == 7
    train, check = x_all[~held], x_all[held]
    with torch.no_grad():
        target_train = torch.cat([teacher(train[i:i + batch]) for i in range(0, len(train), batch)])
        target_check = torch.cat([teacher(check[i:i + batch]) for i in range(0, len(check), batch)])

    def check_error():
        with torch.no_grad():
            out = torch.cat([student(check[i:i + batch]) for i in range(0, len(check), batch)])
        return float((out - target_check).norm() / target_check.norm())

    before = check_error()
    gen = torch.Generator().manual_seed(seed)
    start = time.time()
    for epoch in range(epochs):
        perm = torch.randperm(len(train), generator=gen)
        for i in range(0, len(train), batch):
            idx = perm[i:i + batch]
            loss = torch.nn.functional.mse_loss(student(train[idx]), target_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        log(f"[finetune] end-to-end epoch {epoch + 1}/{epochs}: held-out output error "
            f"{check_error():.4f} ({time.time() - start:.0f}s)")
    after = check_error()
    arrays = {}
    for key, param in student.params.items():
        arrays[key] = param.detach().numpy().astype(np.float32)
    return arrays, {"output_rel_error_before": round(before, 6),
                    "output_rel_error_after": round(after, 6), "epochs": epochs,
                    "images": len(train), "parameters": len(arrays),
                    "seconds": round(time.time() - start, 1)}
