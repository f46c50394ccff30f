"""Ours against PyTorch eager (NCHW and channels-last) and ONNX Runtime, back to back in one run.

Usage (a venv with torch, torchvision, onnx and onnxruntime from PyPI; build ours first with
`cargo build --release -p lean-cli`):
    python benches/compare_pytorch.py [--threads 2] [--reps 7] [--lean target/release/lean]
                                      [--models ...] [--no-onnx] [--json-out FILE]

For each model (3x32x32, 10 classes) at batch 1 and 64 it times inference (eval mode) and a
training step (forward, cross-entropy, backward, SGD momentum update): ours through
`lean bench --format json`, PyTorch's models from benches/pytorch/bench_pytorch.py in NCHW and in
channels-last, and ONNX Runtime (inference only) on the PyTorch model exported to ONNX. Ours is
also timed with BatchNorm folded (as ONNX Runtime runs a model). Every engine gets the same number
of threads. It prints the CPU model and ISA, the ratio table (time of theirs / time of ours: above
1 means we are faster), and the GMAC/s we reach against this machine's f32 GEMM peak as measured
here with a large torch.mm.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "pytorch"))
from bench_pytorch import MODELS, median_ms  # noqa: E402


def cpu_description():
    model, flags = "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model == "unknown CPU":
                    model = line.split(":", 1)[1].strip()
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    isa = [f for f in ("avx2", "fma", "avx512f", "avx512bw", "avx512_bf16", "amx_tile") if f in flags]
    return model, isa


def gemm_peak_gmacs(threads):
    """Multiply-accumulates per second of a large f32 matrix product (the practical peak)."""
    torch.set_num_threads(threads)
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    ms = median_ms(lambda: torch.mm(a, b), 5, warmup=2)
    return n**3 / (ms * 1e-3) / 1e9


def ours(lean, models, threads, reps):
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    cmd = [lean, "bench", *models, "--batch-sizes", "1,64", "--train", "--format", "json", "--reps", str(reps)]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return {(r["model"], r["batch_size"]): r for r in json.loads(out)}


def torch_times(name, b, reps, channels_last):
    model = MODELS[name](3, 10)
    x = torch.randn(b, 3, 32, 32)
    y = torch.randint(0, 10, (b,))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    model.eval()
    with torch.inference_mode():
        infer = median_ms(lambda: model(x), reps)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return infer, median_ms(step, reps)


def onnx_time(name, b, reps, threads, tmp):
    import onnxruntime as ort

    model = MODELS[name](3, 10).eval()
    x = torch.randn(b, 3, 32, 32)
    path = os.path.join(tmp, f"{name}-{b}.onnx")
    try:
        torch.onnx.export(model, (x,), path, input_names=["x"], output_names=["y"], dynamo=False)
    except TypeError:
        torch.onnx.export(model, (x,), path, input_names=["x"], output_names=["y"])
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    feed = {"x": x.numpy()}
    return median_ms(lambda: sess.run(None, feed), reps)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="*", default=list(MODELS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--lean", default="target/release/lean")
    p.add_argument("--no-onnx", action="store_true")
    p.add_argument("--json-out")
    args = p.parse_args()
    cpu, isa = cpu_description()
    torch.set_num_threads(args.threads)
    print(f"# CPU: {cpu}; ISA: {' '.join(isa)}; {args.threads} threads")
    print(f"# torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()})", flush=True)

    mine = ours(args.lean, args.models, args.threads, args.reps)
    print(f"# ours: lean_ops ISA {next(iter(mine.values()))['isa']}", flush=True)
    peak = gemm_peak_gmacs(args.threads)
    print(f"# f32 GEMM peak here (torch.mm 2048^3, {args.threads} threads): {peak:.1f} GMAC/s", flush=True)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            for b in (1, 64):
                r = mine[(name, b)]
                t_inf, t_tr = torch_times(name, b, args.reps, False)
                cl_inf, cl_tr = torch_times(name, b, args.reps, True)
                ort_inf = None if args.no_onnx else onnx_time(name, b, args.reps, args.threads, tmp)
                macs = r["macs"] * b
                rows.append({
                    "model": name, "batch": b,
                    "ours_infer_ms": r["infer_step_time"], "ours_folded_ms": r["infer_folded_step_time"],
                    "ours_train_ms": r["train_step_time"],
                    "torch_infer_ms": t_inf, "torch_train_ms": t_tr,
                    "torch_cl_infer_ms": cl_inf, "torch_cl_train_ms": cl_tr, "ort_infer_ms": ort_inf,
                    "ours_infer_gmacs": macs / (r["infer_step_time"] * 1e-3) / 1e9,
                    "ours_train_gmacs": 3 * macs / (r["train_step_time"] * 1e-3) / 1e9,
                })
                print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in rows[-1].items()}),
                      file=sys.stderr, flush=True)

    def ratio(a, b):
        return "-" if a is None or b is None else f"{a / b:.2f}"

    print()
    print("| model | batch | ours infer ms | torch/ours infer | torch-CL/ours infer | ours train ms "
          "| torch/ours train | torch-CL/ours train | ours folded ms | ORT ms | ORT/ours folded "
          "| ours GMAC/s infer / train (% of peak) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ort_ms = "-" if r["ort_infer_ms"] is None else f"{r['ort_infer_ms']:.2f}"
        print(f"| {r['model']} | {r['batch']} | {r['ours_infer_ms']:.2f} | {ratio(r['torch_infer_ms'], r['ours_infer_ms'])} "
              f"| {ratio(r['torch_cl_infer_ms'], r['ours_infer_ms'])} | {r['ours_train_ms']:.2f} "
              f"| {ratio(r['torch_train_ms'], r['ours_train_ms'])} | {ratio(r['torch_cl_train_ms'], r['ours_train_ms'])} "
              f"| {r['ours_folded_ms']:.2f} | {ort_ms} | {ratio(r['ort_infer_ms'], r['ours_folded_ms'])} "
              f"| {r['ours_infer_gmacs']:.1f} / {r['ours_train_gmacs']:.1f} "
              f"({100 * r['ours_infer_gmacs'] / peak:.0f}% / {100 * r['ours_train_gmacs'] / peak:.0f}%) |")
    by = {(r["model"], r["batch"]): r for r in rows}
    if ("resnet18_cifar", 64) in by and ("lean_resnet18_cifar", 64) in by:
        d, l = by[("resnet18_cifar", 64)], by[("lean_resnet18_cifar", 64)]
        print()
        print(f"lean/dense wall-time ratio at batch 64 — ours: inference {d['ours_infer_ms'] / l['ours_infer_ms']:.2f}x, "
              f"training {d['ours_train_ms'] / l['ours_train_ms']:.2f}x; PyTorch: inference "
              f"{d['torch_infer_ms'] / l['torch_infer_ms']:.2f}x, training {d['torch_train_ms'] / l['torch_train_ms']:.2f}x")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"cpu": cpu, "isa": isa, "threads": args.threads, "gemm_peak_gmacs": peak,
                       "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
