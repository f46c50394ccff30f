"""Ours against PyTorch eager (NCHW and channels-last) and ONNX Runtime, back to back in one run.

Usage (a venv with torch, torchvision, onnx and onnxruntime from PyPI; build ours first with
`cargo build --release -p lean-cli`):
    python benches/compare_pytorch.py [--threads 2] [--reps 7] [--rounds 3]
                                      [--lean target/release/lean] [--models ...] [--no-onnx]
                                      [--json-out FILE]

For each model (3x32x32, 10 classes) at batch 1 and 64 it times inference (eval mode) and a
training step (forward, cross-entropy, backward, SGD momentum update): ours through
`lean bench --format json`, PyTorch's models from benches/pytorch/bench_pytorch.py in NCHW and in
channels-last, and ONNX Runtime (inference only) on the PyTorch model exported to ONNX. Ours is
also timed with BatchNorm folded (as ONNX Runtime runs a model). Every engine gets the same number
of threads. It prints the CPU model and ISA, the ratio table (time of theirs / time of ours: above
1 means we are faster), and the GMAC/s we reach against this machine's f32 GEMM peak as measured
here with a large torch.mm.

The engines are timed cell by cell (model x batch), each right after the other, in `--rounds`
rounds whose order alternates (ours first, then theirs first): on a shared VM whose speed moves
by 1.5x from one minute to the next, ratios of times taken minutes apart say more about the
machine than about the code. Each printed time is the median over the rounds, each ratio the
median of the per-round ratios.
"""
import argparse
import json
import os
import statistics
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


def ours(lean, model, b, threads, reps):
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    cmd = [lean, "bench", model, "--batch-sizes", str(b), "--train", "--format", "json", "--reps", str(reps)]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out)[0]


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


def onnx_session(name, b, threads, tmp):
    """The PyTorch model exported to ONNX, in an ONNX Runtime session, and its input."""
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
    return sess, {"x": x.numpy()}


def time_cell(lean, name, b, args, session, ours_first):
    """One round of one cell: every engine's times (ms), ours first or theirs first."""
    t = {}

    def run_ours():
        r = ours(lean, name, b, args.threads, args.reps)
        t.update(macs=r["macs"], isa=r["isa"], ours_infer_ms=r["infer_step_time"],
                 ours_folded_ms=r["infer_folded_step_time"], ours_train_ms=r["train_step_time"])

    def run_theirs():
        t["torch_infer_ms"], t["torch_train_ms"] = torch_times(name, b, args.reps, False)
        t["torch_cl_infer_ms"], t["torch_cl_train_ms"] = torch_times(name, b, args.reps, True)
        if session is not None:
            sess, feed = session
            t["ort_infer_ms"] = median_ms(lambda: sess.run(None, feed), args.reps)
        else:
            t["ort_infer_ms"] = None

    for f in (run_ours, run_theirs) if ours_first else (run_theirs, run_ours):
        f()
    return t


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="*", default=list(MODELS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--lean", default="target/release/lean")
    p.add_argument("--no-onnx", action="store_true")
    p.add_argument("--json-out")
    args = p.parse_args()
    cpu, isa = cpu_description()
    torch.set_num_threads(args.threads)
    print(f"# CPU: {cpu}; ISA: {' '.join(isa)}; {args.threads} threads")
    print(f"# torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()})", flush=True)

    peak = gemm_peak_gmacs(args.threads)
    print(f"# f32 GEMM peak here (torch.mm 2048^3, {args.threads} threads): {peak:.1f} GMAC/s", flush=True)

    cells = [(name, b) for name in args.models for b in (1, 64)]
    rounds = {c: [] for c in cells}
    with tempfile.TemporaryDirectory() as tmp:
        sessions = {c: None if args.no_onnx else onnx_session(*c, args.threads, tmp) for c in cells}
        for k in range(args.rounds):
            for c in cells:
                t = time_cell(args.lean, *c, args, sessions[c], ours_first=k % 2 == 0)
                rounds[c].append(t)
                print(json.dumps({"round": k, "model": c[0], "batch": c[1],
                                  **{n: round(v, 3) if isinstance(v, float) else v for n, v in t.items()}}),
                      file=sys.stderr, flush=True)
    print(f"# ours: lean_ops ISA {rounds[cells[0]][0]['isa']}; {args.rounds} rounds", flush=True)

    def med(c, key):
        vals = [t[key] for t in rounds[c] if t[key] is not None]
        return statistics.median(vals) if vals else None

    def med_ratio(c, theirs, mine, c2=None):
        """Median over the rounds of theirs / mine (`c2`: theirs from another cell)."""
        vals = [a[theirs] / b[mine] for a, b in zip(rounds[c2 or c], rounds[c]) if a[theirs] is not None]
        return statistics.median(vals) if vals else None

    rows = []
    for c in cells:
        macs = rounds[c][0]["macs"] * c[1]
        row = {"model": c[0], "batch": c[1]}
        for key in ("ours_infer_ms", "ours_folded_ms", "ours_train_ms", "torch_infer_ms", "torch_train_ms",
                    "torch_cl_infer_ms", "torch_cl_train_ms", "ort_infer_ms"):
            row[key] = med(c, key)
        for theirs, mine in (("torch_infer_ms", "ours_infer_ms"), ("torch_cl_infer_ms", "ours_infer_ms"),
                             ("torch_train_ms", "ours_train_ms"), ("torch_cl_train_ms", "ours_train_ms"),
                             ("ort_infer_ms", "ours_folded_ms")):
            row[f"{theirs}/{mine}"] = med_ratio(c, theirs, mine)
        row["ours_infer_gmacs"] = macs / (row["ours_infer_ms"] * 1e-3) / 1e9
        row["ours_train_gmacs"] = 3 * macs / (row["ours_train_ms"] * 1e-3) / 1e9
        row["rounds"] = rounds[c]
        rows.append(row)

    def ratio(r, theirs, mine):
        v = r[f"{theirs}/{mine}"]
        return "-" if v is None else f"{v:.2f}"

    print()
    print("| model | batch | ours infer ms | torch/ours infer | torch-CL/ours infer | ours train ms "
          "| torch/ours train | torch-CL/ours train | ours folded ms | ORT ms | ORT/ours folded "
          "| ours GMAC/s infer / train (% of peak) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ort_ms = "-" if r["ort_infer_ms"] is None else f"{r['ort_infer_ms']:.2f}"
        print(f"| {r['model']} | {r['batch']} | {r['ours_infer_ms']:.2f} | {ratio(r, 'torch_infer_ms', 'ours_infer_ms')} "
              f"| {ratio(r, 'torch_cl_infer_ms', 'ours_infer_ms')} | {r['ours_train_ms']:.2f} "
              f"| {ratio(r, 'torch_train_ms', 'ours_train_ms')} | {ratio(r, 'torch_cl_train_ms', 'ours_train_ms')} "
              f"| {r['ours_folded_ms']:.2f} | {ort_ms} | {ratio(r, 'ort_infer_ms', 'ours_folded_ms')} "
              f"| {r['ours_infer_gmacs']:.1f} / {r['ours_train_gmacs']:.1f} "
              f"({100 * r['ours_infer_gmacs'] / peak:.0f}% / {100 * r['ours_train_gmacs'] / peak:.0f}%) |")
    dense, lean = ("resnet18_cifar", 64), ("lean_resnet18_cifar", 64)
    if dense in rounds and lean in rounds:
        # Per round: the two models' times of that round (dense and lean are timed minutes apart).
        def lr(key):
            return med_ratio(lean, key, key, c2=dense)

        print()
        print(f"lean/dense wall-time ratio at batch 64 (median of the rounds) — ours: inference "
              f"{lr('ours_infer_ms'):.2f}x, training {lr('ours_train_ms'):.2f}x; PyTorch: inference "
              f"{lr('torch_infer_ms'):.2f}x, training {lr('torch_train_ms'):.2f}x")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"cpu": cpu, "isa": isa, "threads": args.threads, "gemm_peak_gmacs": peak,
                       "torch": torch.__version__, "rounds": args.rounds, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
