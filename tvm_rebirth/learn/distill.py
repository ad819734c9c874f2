"""Retraining with labels (``finetune --e2e --e2e-labels``): the learned rebirth (and
refitted) convs trained in PyTorch (CPU) on labels with the original model as teacher, after
the layer-wise stage. Unlabeled refinement and block reconstruction train with TVM's own
gradients instead (``train.py``); this path stays until the labeled loss moves there too.

The Relax function is interpreted op by op in torch, so what is trained is what TVM
compiles: the learned convs become parameters, everything else stays constant. Install the
extra with ``pip install torch==2.13.0``.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from ..errors import RebirthError
from ..passes.dataflow import evaluate_constant

logger = logging.getLogger(__name__)




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


def check_labels(mod, labels, count, func_name="main"):
    """Labels for retraining: one class index per image, each below the model's output
    width (checked before any fitting starts, so a bad file fails fast)."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) != count:
        raise RebirthError(f"end-to-end refinement: {labels.size} labels for {count} images")
    shape = [int(d) for d in mod[func_name].ret_ty.shape.values]
    classes = int(np.prod(shape[1:]))
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= classes):
        raise RebirthError(f"end-to-end refinement: labels must lie in 0..{classes - 1} (the "
                           f"model has {classes} outputs), got {int(labels.min())}.."
                           f"{int(labels.max())}")


def distill(original_mod, rebirth_mod, trainable, images, labels=None, flip=False, epochs=3,
            batch=64, lr=2e-3, seed=0, temperature=4.0) -> tuple:
    """Train the ``trainable`` convs of ``rebirth_mod`` towards ``original_mod`` on ``images``;
    returns ({key: array}, report).

    Unlabeled: the loss is the squared error between both models' outputs. With ``labels``
    (the paper's retraining): half cross-entropy on the labels, half the original model's
    softened outputs (knowledge distillation at ``temperature``). ``flip`` adds seeded
    horizontal flips (the original model sees the same flipped image). Every 8th image is
    held out: the weights of the epoch that does best on them are returned (the layer-wise
    ones if none does). AdamW with a one-cycle learning-rate schedule."""
    try:
        import torch
    except ImportError:
        raise RebirthError("end-to-end refinement needs PyTorch: pip install torch==2.13.0") \
            from None
    torch.manual_seed(seed)
    F = torch.nn.functional
    teacher = RelaxInTorch(original_mod["main"])
    student = RelaxInTorch(rebirth_mod["main"], trainable)
    if not student.params:
        raise RebirthError("end-to-end refinement: no learned conv found in the rebirth model")
    x_all = torch.from_numpy(np.ascontiguousarray(images, np.float32))
    held = torch.arange(len(x_all)) % 8 == 7
    train_rows = ~held if held.any() else torch.ones_like(held)  # < 8 images: check on all
    check_rows = held if held.any() else train_rows
    train, check = x_all[train_rows], x_all[check_rows]
    y_train = y_check = None
    if labels is not None:  # checked by finetune before any fitting (check_labels)
        y_all = torch.from_numpy(np.asarray(labels).astype(np.int64).reshape(-1))
        y_train, y_check = y_all[train_rows], y_all[check_rows]
    start = time.time()
    logger.info(f"[finetune] end-to-end: original outputs of {len(x_all)} images"
        + (" and their flips" if flip else ""))
    with torch.no_grad():
        def logits(model, x):
            return torch.cat([model(x[i:i + batch]).reshape(len(x[i:i + batch]), -1)
                              for i in range(0, len(x), batch)])
        target_train = logits(teacher, train)
        target_flip = logits(teacher, train.flip(3)) if flip else None
        target_check = logits(teacher, check)

    def evaluate():
        with torch.no_grad():
            out = logits(student, check)
        result = {"output_rel_error": float((out - target_check).norm() / target_check.norm()),
                  "agreement": float((out.argmax(1) == target_check.argmax(1)).float().mean())}
        if y_check is not None:
            result["top1"] = float((out.argmax(1) == y_check).float().mean())
        return result

    def loss_of(out, target, y):
        if y is None:
            return F.mse_loss(out, target)
        t = temperature
        kd = F.kl_div(F.log_softmax(out / t, 1), F.softmax(target / t, 1),
                      reduction="batchmean") * t * t
        return 0.5 * kd + 0.5 * F.cross_entropy(out, y)

    def score(result):  # what "better" means on the held-out images
        return (result["top1"], -result["output_rel_error"]) if "top1" in result \
            else (-result["output_rel_error"],)

    def snapshot():
        return {key: param.detach().numpy().astype(np.float32).copy()
                for key, param in student.params.items()}

    before = evaluate()
    best, best_epoch, best_arrays = before, 0, snapshot()
    steps = epochs * ((len(train) + batch - 1) // batch)
    opt = torch.optim.AdamW(student.params.values(), lr=lr, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1),
                                                pct_start=0.15)
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        perm = torch.randperm(len(train), generator=gen)
        for i in range(0, len(train), batch):
            idx = perm[i:i + batch]
            xb, target = train[idx], target_train[idx]
            if flip:
                flips = torch.rand(len(idx), generator=gen) < 0.5
                xb = torch.where(flips[:, None, None, None], xb.flip(3), xb)
                target = torch.where(flips[:, None], target_flip[idx], target)
            out = student(xb).reshape(len(idx), -1)
            loss = loss_of(out, target, None if y_train is None else y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        now = evaluate()
        if score(now) > score(best):
            best, best_epoch, best_arrays = now, epoch + 1, snapshot()
        logger.info(f"[finetune] end-to-end epoch {epoch + 1}/{epochs}: held-out output error "
            f"{now['output_rel_error']:.4f}"
            + (f", top-1 {now['top1'] * 100:.2f}%" if "top1" in now else "")
            + f" ({time.time() - start:.0f}s)")
    # early stopping on the held-out images: a refinement that made them worse is not kept
    after, arrays = best, best_arrays
    if best_epoch < epochs:
        logger.info(f"[finetune] end-to-end: keeping the weights after epoch {best_epoch} "
            "(best on the held-out images)" if best_epoch else
            "[finetune] end-to-end: no epoch beat the layer-wise weights on the held-out "
            "images; keeping those")
    report = {"kept_epoch": best_epoch,
              "output_rel_error_before": round(before["output_rel_error"], 6),
              "output_rel_error_after": round(after["output_rel_error"], 6),
              "held_out_agreement_after": round(after["agreement"], 4),
              "loss": "cross-entropy + distillation" if labels is not None else
                      "output squared error (distillation)",
              "flip": bool(flip), "epochs": epochs, "images": len(train),
              "held_out_images": len(check), "parameters": len(arrays),
              "seconds": round(time.time() - start, 1)}
    if labels is not None:
        report["held_out_top1_before"] = round(before["top1"], 4)
        report["held_out_top1_after"] = round(after["top1"], 4)
    return arrays, report
