"""Train fmnist-inception: the accuracy reference for rebirth slimming (no pretrained
GoogLeNet weights exist offline, so we train a GoogLeNet-style net on real data).

Same layer kinds as GoogLeNet: conv -> pool -> LRN stem, conv -> LRN -> pool, three inception
modules with pool branches, a stride-2 pool between stages, global average pool, FC.
Trained on the full Fashion-MNIST train split (Debian dataset-fashion-mnist), seeded,
exported to ONNX with BVLC-style layer names.

    pip install torch==2.13.0
    python benchmarks/train_fmnist_inception.py            # ~30 min on 2 cores
writes tvm_rebirth/frontend/zoo_data/fmnist_inception.onnx and benchmarks/fmnist_inception/train_log.txt
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tvm_rebirth.frontend.datasets import fashion_mnist  # noqa: E402

MEAN, STD = 72.94, 90.02  # Fashion-MNIST train pixel statistics (0..255)


class _LRNFunction(torch.autograd.Function):
    """Exports as one ONNX LRN node (torch would decompose it); same formula as torch's."""

    @staticmethod
    def forward(ctx, x):
        return nn.functional.local_response_norm(x, 5, 1e-4, 0.75, 1.0)

    @staticmethod
    def symbolic(g, x):
        return g.op("LRN", x, size_i=5, alpha_f=1e-4, beta_f=0.75, bias_f=1.0)


class LRN(nn.LocalResponseNorm):
    exporting = False

    def __init__(self):
        super().__init__(5, 1e-4, 0.75, 1.0)

    def forward(self, x):
        return _LRNFunction.apply(x) if LRN.exporting else super().forward(x)


class Inception(nn.Module):
    def __init__(self, cin, c1, c3r, c3, c5r, c5, pp):
        super().__init__()
        # attribute names become ONNX layer names: inception_3a/1x1 ... (GoogLeNet's)
        setattr(self, "1x1", nn.Conv2d(cin, c1, 1))
        setattr(self, "3x3_reduce", nn.Conv2d(cin, c3r, 1))
        setattr(self, "3x3", nn.Conv2d(c3r, c3, 3, padding=1))
        setattr(self, "5x5_reduce", nn.Conv2d(cin, c5r, 1))
        setattr(self, "5x5", nn.Conv2d(c5r, c5, 5, padding=2))
        self.pool, self.pool_proj = nn.MaxPool2d(3, 1, 1), nn.Conv2d(cin, pp, 1)
        self.out_channels = c1 + c3 + c5 + pp

    def forward(self, x):
        r, m = torch.relu, self._modules
        return torch.cat([r(m["1x1"](x)), r(m["3x3"](r(m["3x3_reduce"](x)))),
                          r(m["5x5"](r(m["5x5_reduce"](x)))), r(self.pool_proj(self.pool(x)))], 1)


class FmnistInception(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.pool1 = nn.MaxPool2d(3, 2, 1)            # 28 -> 14
        self.norm1 = LRN()
        self.conv2_reduce = nn.Conv2d(32, 32, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.norm2 = LRN()
        self.pool2 = nn.MaxPool2d(3, 2, 1)            # 14 -> 7
        self.inception_3a = Inception(64, 24, 32, 48, 8, 16, 16)      # 104
        self.inception_3b = Inception(104, 32, 48, 64, 12, 24, 24)    # 144
        self.pool3 = nn.MaxPool2d(3, 2, 1)            # 7 -> 4
        self.inception_4a = Inception(144, 48, 48, 96, 16, 32, 32)    # 208
        self.pool5 = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(0.3)
        self.classifier = nn.Linear(208, 10)

    def forward(self, x):
        x = self.norm1(self.pool1(torch.relu(self.conv1(x))))
        x = torch.relu(self.conv2_reduce(x))
        x = self.pool2(self.norm2(torch.relu(self.conv2(x))))
        x = self.pool3(self.inception_3b(self.inception_3a(x)))
        x = self.pool5(self.inception_4a(x)).flatten(1)
        return self.classifier(self.drop(x))


def preprocess(images):
    return ((images.astype(np.float32) - MEAN) / STD)[:, None]


def evaluate(model, x, y, batch=500):
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            correct += (model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum().item()
    return correct / len(x)


def export(model, path):
    """ONNX export with layer names from the module path (conv1, inception_3a/pool_proj...)."""
    import onnx

    model.eval()
    tmp = str(path) + ".raw"
    LRN.exporting = True
    try:
        torch.onnx.export(model, torch.zeros(1, 1, 28, 28), tmp, input_names=["data"],
                          output_names=["logits"], opset_version=13, dynamo=False,
                          dynamic_axes={"data": {0: "batch"}, "logits": {0: "batch"}})
    finally:
        LRN.exporting = False
    m = onnx.load(tmp)
    os.remove(tmp)
    for node in m.graph.node:
        parts = [p for p in node.name.split("/") if p]
        base = "/".join(p.replace(".", "/") for p in parts[:-1])
        if node.op_type == "Concat" and base:
            node.name = f"{base}/output"
        elif node.op_type == "Relu":
            node.name = f"{base}/relu" if base else "relu"
        elif base:
            node.name = base
    names = {}
    for node in m.graph.node:  # keep names unique (torch may emit helpers per module)
        if node.name in names:
            names[node.name] += 1
            node.name = f"{node.name}_{names[node.name]}"
        else:
            names[node.name] = 0
    onnx.checker.check_model(m)
    onnx.save(m, str(path))


def train_and_export(make_model, name, epochs, threads, out, log):
    """Build ``make_model()`` after seeding (its initial weights are seeded too), train it on
    the Fashion-MNIST train split (AdamW + one-cycle, flips, label smoothing), log each
    epoch's test top-1 to ``log`` and export ONNX to ``out``."""
    torch.manual_seed(0)
    np.random.seed(0)
    torch.set_num_threads(threads)
    model = make_model()
    xtr, ytr = fashion_mnist("train")
    xte, yte = fashion_mnist("test")
    xtr, xte = torch.from_numpy(preprocess(xtr)), torch.from_numpy(preprocess(xte))
    ytr, yte = torch.from_numpy(ytr.astype(np.int64)), torch.from_numpy(yte.astype(np.int64))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=5e-4)
    steps = epochs * (len(xtr) // 128)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=4e-3, total_steps=steps)
    log_lines = [f"{name}: torch {torch.__version__}, threads {threads}, seed 0, "
                 f"{len(xtr)} train / {len(xte)} test images, {epochs} epochs"]
    print(log_lines[0], flush=True)
    start = time.time()
    gen = torch.Generator().manual_seed(0)
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(xtr), generator=gen)
        total = 0.0
        for i in range(0, len(xtr) - 127, 128):
            idx = perm[i:i + 128]
            xb = xtr[idx]
            flip = torch.rand(len(idx), generator=gen) < 0.5  # horizontal flips
            xb = torch.where(flip[:, None, None, None], xb.flip(3), xb)
            loss = nn.functional.cross_entropy(model(xb), ytr[idx], label_smoothing=0.05)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        acc = evaluate(model, xte, yte)
        line = (f"epoch {epoch + 1:2d}  loss {total / len(xtr):.4f}  test top-1 {acc * 100:.2f}%  "
                f"elapsed {time.time() - start:.0f}s")
        print(line, flush=True)
        log_lines.append(line)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    export(model, out)
    final = {"test_top1": acc, "epochs": epochs, "seconds": round(time.time() - start)}
    log_lines.append("final " + json.dumps(final))
    Path(log).parent.mkdir(parents=True, exist_ok=True)
    Path(log).write_text("\n".join(log_lines) + "\n")
    print(f"wrote {out}", flush=True)


def arguments(name, epochs, default_out, default_log):
    ap = argparse.ArgumentParser(description=f"train {name} on Fashion-MNIST")
    ap.add_argument("--epochs", type=int, default=epochs)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "tvm_rebirth" / "frontend" / "zoo_data" / default_out))
    ap.add_argument("--log", default=str(ROOT / "benchmarks" / default_log))
    return ap.parse_args()


def main():
    args = arguments("fmnist-inception", 8, "fmnist_inception.onnx",
                     "fmnist_inception/train_log.txt")
    train_and_export(FmnistInception, "fmnist-inception", args.epochs, args.threads,
                     args.out, args.log)


if __name__ == "__main__":
    main()
