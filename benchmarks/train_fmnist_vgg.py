"""Train fmnist-vgg: the second accuracy reference for rebirth slimming, with the op kinds
fmnist-inception lacks (Keras style): PReLU activations, BatchNorm *after* the activation,
2x2 max-pools, global average pooling.

    conv1 1->32 -> PReLU -> BN -> pool1 2x2/2                                      28 -> 14
    conv2a 32->64 -> PReLU -> BN -> conv2b 64->64 -> PReLU -> BN -> pool2 2x2/2    14 -> 7
    conv3a 64->128 -> PReLU -> BN -> conv3b 128->128 -> PReLU -> BN -> pool3 2x2/2  7 -> 4
    global average pool -> dropout -> fc 128->10

Trained on the full Fashion-MNIST train split (Debian dataset-fashion-mnist), seeded, with
the recipe of train_fmnist_inception.py, exported to ONNX with the layer names above.

    pip install torch==2.13.0
    python benchmarks/train_fmnist_vgg.py            # ~7 min on 2 cores
writes tvm_rebirth/frontend/zoo_data/fmnist_vgg.onnx and benchmarks/fmnist_vgg/train_log.txt
"""

from torch import nn

from train_fmnist_inception import arguments, train_and_export


class FmnistVGG(nn.Module):
    def __init__(self):
        super().__init__()
        # (conv name, in, out, pool after it): attribute names become ONNX layer names
        self.layers = [("conv1", 1, 32, "pool1"), ("conv2a", 32, 64, None),
                       ("conv2b", 64, 64, "pool2"), ("conv3a", 64, 128, None),
                       ("conv3b", 128, 128, "pool3")]
        for conv, cin, cout, pool in self.layers:
            suffix = conv[len("conv"):]
            setattr(self, conv, nn.Conv2d(cin, cout, 3, padding=1))
            setattr(self, f"prelu{suffix}", nn.PReLU(cout, init=0.1))
            setattr(self, f"bn{suffix}", nn.BatchNorm2d(cout))
            if pool:
                setattr(self, pool, nn.MaxPool2d(2, 2, ceil_mode=True))
        self.pool5 = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(0.3)
        self.classifier = nn.Linear(128, 10)

    def forward(self, x):
        for conv, _, _, pool in self.layers:
            suffix = conv[len("conv"):]
            m = self._modules
            x = m[f"bn{suffix}"](m[f"prelu{suffix}"](m[conv](x)))
            if pool:
                x = m[pool](x)
        return self.classifier(self.drop(self.pool5(x).flatten(1)))


def main():
    args = arguments("fmnist-vgg", 6, "fmnist_vgg.onnx", "fmnist_vgg/train_log.txt")
    train_and_export(FmnistVGG, "fmnist-vgg", args.epochs, args.threads, args.out, args.log)


if __name__ == "__main__":
    main()
