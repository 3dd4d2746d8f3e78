"""The GPU suite's measuring tools: synchronised timing, peak memory, FLOP counts, and the
printed table's rows."""

from __future__ import annotations

import gc
import os
import subprocess
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

# Dense (no sparsity) peaks from the vendors' data sheets, TFLOP/s: (bf16 tensor core, fp32).
# An 8192^3 bf16 matmul reaches about 790 of the H200's 989 here, so 80 % MFU is the practical top.
CHIP_PEAKS = (("H200", 989.0, 67.0), ("H100 PCIe", 756.0, 51.0), ("H100 NVL", 835.0, 60.0),
              ("H100", 989.0, 67.0), ("A100", 312.0, 19.5))


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_memory(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device):
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def timed(fn, warmup: int, steps: int, device) -> tuple[float, float]:
    """(seconds per call over ``steps`` after ``warmup`` calls, seconds of the first call)."""
    tick = time.perf_counter()
    fn()
    sync(device)
    first = time.perf_counter() - tick
    for _ in range(warmup - 1):
        fn()
    sync(device)
    tick = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return (time.perf_counter() - tick) / steps, first


def flops_of(fn) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def per_sample_gflop(encode, inputs, count: int = 4) -> float:
    """Forward GFLOP per sample, counted on a few samples (an encoder's cost is per sample).

    Counted with autograd on: under no_grad the counter's module hooks fail on modules that
    take a parameter as input (CSKT's prompt projections), and a few samples keep it cheap.
    """
    return flops_of(lambda: encode(inputs[:count])) / len(inputs[:count]) / 1e9


def fmt(value, spec):
    width = "".join(ch for ch in spec.split(".")[0] if ch.isdigit())
    return format("-", f">{width}") if value is None else format(value, spec)


HEADER = (f"{'what':<12} {'method':<9} {'batch':>6} {'mode':<8} {'rate/s':>10} {'peak GiB':>8} "
          f"{'GFLOP':>8} {'ceiling/s':>10} {'MFU %':>6}  note")


def row(c: dict) -> str:
    note = c.get("reason", "") if c["status"] != "ok" else ""
    if c["what"] == "train" and c["status"] == "ok":
        note = f"stage {c['stage']}"
        if "compile_s" in c:
            note += f", first step {c['compile_s']:.1f} s, {c['graphs']} graph{'s' * (c['graphs'] != 1)}"
    elif c["what"] == "text" and c["status"] == "ok":
        note = f"tokenize {c['tokenize_per_s_cpu']:.0f}/s on CPU"
    elif c["what"] == "eval" and c["status"] == "ok":
        m = c["metrics"]
        note = (f"{c['seconds']:.1f} s; R1 {m['R1']:.2f} R5 {m['R5']:.2f} R10 {m['R10']:.2f} "
                f"mAP {m['mAP']:.2f} mINP {m['mINP']:.2f}; fp32 ceiling")
    elif c["what"] == "eval_library" and c["status"] == "ok":
        note = (f"{c['seconds']:.1f} s; tpr_ray.streaming kernels, {c['shards']} shards; "
                f"metrics as the suite's: {c.get('same_as_suite', '-')}, top-10 rows alike: "
                f"{100 * c.get('top_k_rows_same', float('nan')):.2f} %")
    elif c["what"] == "eval_check" and c["status"] == "ok":
        note = (f"suite and library equal to tpr_ray.evaluation.metrics: {c['equal']} ({c['queries']} x {c['gallery']}, "
                f"{c['queries_tied_at_k']} queries tied at k)")
    mfu = c.get("mfu")
    return (f"{c['what']:<12} {c.get('method', '-'):<9} {c['batch']:>6} {c['mode']:<8} "
            f"{fmt(c.get('samples_per_s'), '10.0f')} {fmt(c.get('peak_gib'), '8.2f')} "
            f"{fmt(c.get('gflop_per_sample'), '8.2f')} {fmt(c.get('ceiling_per_s'), '10.0f')} "
            f"{fmt(None if mfu is None else 100 * mfu, '6.1f')}  {note}").rstrip()


def chip_peaks(device, peak_tflops: float | None, peak_fp32_tflops: float | None) -> dict:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    bf16 = fp32 = None
    source = "none: pass --peak-tflops"
    for key, chip_bf16, chip_fp32 in CHIP_PEAKS:
        if device.type == "cuda" and key in name:
            bf16, fp32, source = chip_bf16, chip_fp32, f"data sheet ({key})"
            break
    if peak_tflops:
        bf16, source = peak_tflops, "--peak-tflops"
    if peak_fp32_tflops:
        fp32 = peak_fp32_tflops
    return {"name": name, "bf16": bf16, "fp32": fp32, "source": source}


def environment(device, peaks) -> dict:
    import open_clip

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], check=False, capture_output=True, text=True, timeout=10,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"device": peaks["name"], "peak_bf16_tflops": peaks["bf16"], "peak_fp32_tflops": peaks["fp32"],
            "peak_source": peaks["source"], "torch": torch.__version__, "cuda": torch.version.cuda,
            "open_clip": open_clip.__version__, "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
            "commit": commit}
