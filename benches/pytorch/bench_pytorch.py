"""PyTorch eager baseline for `lean bench`: the same small-image models, timed the same way.

Usage (a venv with torch and torchvision from PyPI):
    python benches/pytorch/bench_pytorch.py [--threads 2] [--batch-sizes 1,64] [--input-size 3,32,32]
        [--device cpu|cuda]

Models mirror lean-models' small-image variants: torchvision's ResNet-18 with a 3x3 stride-1
stem and no max-pool (resnet18_cifar); the same with every 3x3 in the residual blocks replaced by
a lean convolution written the way a PyTorch user would (1x1 conv + depthwise 3x3 conv whose
weight is masked to the five-point stencil, summed) (lean_resnet18_cifar); torchvision's
MobileNetV2 x0.75 and ShuffleNetV2 x1.0 with a stride-1 stem (and no max-pool for ShuffleNetV2).
Latency is the median over --reps timed runs after warm-up; a training step is forward,
cross-entropy, backward and an SGD (momentum 0.9) update.
"""
import argparse
import json
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision


class LeanConv(nn.Module):
    """Pointwise 1x1 conv plus a grouped conv with the five-point stencil, summed."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.pointwise = nn.Conv2d(cin, cout, 1, stride=stride, bias=False)
        # Smallest group size that fits (depthwise with a channel multiplier when cout > cin).
        g = 1
        while cin % g or cout % (cin // g):
            g += 1
        self.stencil = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, groups=cin // g, bias=False)
        mask = torch.tensor([[0.0, 1, 0], [1, 1, 1], [0, 1, 0]])
        self.register_buffer("mask", mask.view(1, 1, 3, 3))

    def forward(self, x):
        w = self.stencil.weight * self.mask
        return self.pointwise(x) + F.conv2d(x, w, stride=self.stencil.stride, padding=1, groups=self.stencil.groups)


def resnet18_cifar(lean, in_ch, num_classes):
    m = torchvision.models.resnet18(num_classes=num_classes)
    m.conv1 = nn.Conv2d(in_ch, 64, 3, 1, 1, bias=False)
    m.maxpool = nn.Identity()
    if lean:
        for layer in (m.layer1, m.layer2, m.layer3, m.layer4):
            for block in layer:
                c1, c2 = block.conv1, block.conv2
                block.conv1 = LeanConv(c1.in_channels, c1.out_channels, c1.stride[0])
                block.conv2 = LeanConv(c2.in_channels, c2.out_channels, 1)
    return m


def mobilenet_v2_cifar(width, in_ch, num_classes):
    m = torchvision.models.mobilenet_v2(width_mult=width, num_classes=num_classes)
    first = m.features[0][0]
    m.features[0][0] = nn.Conv2d(in_ch, first.out_channels, 3, 1, 1, bias=False)
    return m


def shufflenet_v2_cifar(in_ch, num_classes):
    m = torchvision.models.shufflenet_v2_x1_0(num_classes=num_classes)
    first = m.conv1[0]
    m.conv1[0] = nn.Conv2d(in_ch, first.out_channels, 3, 1, 1, bias=False)
    m.maxpool = nn.Identity()
    return m


MODELS = {
    "resnet18_cifar": lambda c, n: resnet18_cifar(False, c, n),
    "lean_resnet18_cifar": lambda c, n: resnet18_cifar(True, c, n),
    "mobilenet_v2_075_cifar": lambda c, n: mobilenet_v2_cifar(0.75, c, n),
    "shufflenet_v2_x1_0_cifar": shufflenet_v2_cifar,
}


def median_ms(fn, reps, warmup=2, sync=lambda: None):
    """Median wall time of `fn` in ms; `sync` waits for the device (a GPU runs asynchronously)."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="*", default=list(MODELS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-sizes", default="1,64")
    p.add_argument("--input-size", default="3,32,32")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--train", action="store_true")
    p.add_argument("--device", default="cpu", help="cpu or cuda (timed with torch.cuda.synchronize)")
    args = p.parse_args()
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    c, h, w = (int(v) for v in args.input_size.split(","))
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else torch.backends.cpu.get_cpu_capability()
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, {where}")
    for name in args.models:
        for b in (int(v) for v in args.batch_sizes.split(",")):
            model = MODELS[name](c, args.num_classes).to(dev)
            x = torch.randn(b, c, h, w, device=dev)
            y = torch.randint(0, args.num_classes, (b,), device=dev)
            row = {"model": name, "batch_size": b, "img_size": h,
                   "param_count": sum(p.numel() for p in model.parameters())}
            model.eval()
            with torch.inference_mode():
                row["infer_step_time"] = median_ms(lambda: model(x), args.reps, sync=sync)
            row["infer_samples_per_sec"] = b * 1e3 / row["infer_step_time"]
            if args.train:
                model.train()
                opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

                def step():
                    opt.zero_grad(set_to_none=True)
                    F.cross_entropy(model(x), y).backward()
                    opt.step()

                row["train_step_time"] = median_ms(step, args.reps, sync=sync)
                row["train_samples_per_sec"] = b * 1e3 / row["train_step_time"]
            print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}), flush=True)


if __name__ == "__main__":
    main()
