"""Writes the PyTorch reference ("golden") files the tests compare our models against.

    python benches/pytorch/make_golden.py --out DIR
    LEAN_GOLDEN_DIR=DIR cargo test ...

docs/golden.md says what each file holds and what the tests require. The project's CI reads a
copy made with torch 2.15 / torchvision 0.29 (CPU, seeded); files made with this script by another
torch build differ in their random values but are checked the same way.
"""

import argparse
import os

import torch
import torchvision
from safetensors.torch import save_file

EVAL_MODELS = ["resnet18", "mobilenet_v2", "shufflenet_v2_x1_0"]


def eval_reference(name, out, seed):
    """NAME.safetensors (state dict, randomised BN statistics) and NAME.io.safetensors."""
    torch.manual_seed(seed)
    model = getattr(torchvision.models, name)(weights=None)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    model.eval()
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        y = model(x)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(out, f"{name}.safetensors"))
    save_file({"input": x, "output": y.contiguous()}, os.path.join(out, f"{name}.io.safetensors"))


def training_trace(out, seed):
    """shufflenet_v2_x0_5.train.safetensors: two SGD steps of ShuffleNetV2 x0.5 in float64."""
    torch.manual_seed(seed)
    model = torchvision.models.shufflenet_v2_x0_5(weights=None, num_classes=10).double().train()
    x = torch.randn(32, 3, 64, 64, dtype=torch.float64)
    labels = torch.randint(0, 10, (32,), dtype=torch.int64)
    trace = {f"init.{k}": v.clone().contiguous() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, dampening=0, weight_decay=5e-3, nesterov=True)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    losses = []
    for step in range(2):
        opt.zero_grad()
        loss = loss_fn(model(x), labels)
        loss.backward()
        if step == 0:
            for k, p in model.named_parameters():
                trace[f"grad.{k}"] = p.grad.clone().contiguous()
        opt.step()
        losses.append(loss.item())
    trace.update({f"final.{k}": v.clone().contiguous() for k, v in model.state_dict().items()})
    trace["input"], trace["labels"] = x, labels
    trace["losses"] = torch.tensor(losses, dtype=torch.float64)
    save_file(trace, os.path.join(out, "shufflenet_v2_x0_5.train.safetensors"))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder to write the files into")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    for i, name in enumerate(EVAL_MODELS):
        eval_reference(name, args.out, args.seed + i)
    training_trace(args.out, args.seed + len(EVAL_MODELS))
    print(f"wrote {len(EVAL_MODELS) * 2 + 1} files to {args.out}")


if __name__ == "__main__":
    main()
