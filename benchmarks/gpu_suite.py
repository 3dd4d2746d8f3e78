"""GPU benchmark suite: training steps, embedding and exact evaluation, each next to its ceiling.

    python benchmarks/gpu_suite.py                      # one H100/H200 (or A100), under 8 minutes
    python benchmarks/gpu_suite.py --smoke              # tiny sizes on CPU (CI runs this)
    python benchmarks/gpu_suite.py --peak-tflops 400    # another chip: its dense bf16 peak

Needs torch, open_clip and tpr_ray, not Ray: the GPU machine this is written for has no
Ray and no network (benchmarks/README.md says how to bring open_clip along as wheels).
Prints one table and writes JSON (``--out``). Every figure carries the arithmetic it
implies: GFLOP per sample counted by ``torch.utils.flop_counter`` on the real step, the
rate the chip's peak would allow, and MFU = GFLOP/sample x samples/s / peak.

A time budget (``--budget-s``) keeps the run bounded: a cell that would not fit in what is
left is skipped and says so, and a running cell is interrupted at the deadline. The
``torch.compile`` cells come last, because compiling costs far more than measuring; each
method compiles once, with a dynamic batch dimension, for all its batch sizes.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import signal
import sys
import time
from dataclasses import dataclass

STARTED = time.monotonic()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

from tpr_ray.methods.backbone import BackboneConfig  # noqa: E402
from tpr_ray.model.encode import autocast  # noqa: E402
from tpr_ray.methods import METHODS, get_method  # noqa: E402
from tpr_ray.training.optim import build_optimizer  # noqa: E402  (the optimizer training builds)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the suite's own modules beside it
from gpu_eval import (block_scores, count_ahead, exact_eval, library_eval, synthetic_embeddings,  # noqa: E402,F401
                      top_k_stable)
from gpu_measure import HEADER, chip_peaks, environment, flops_of, fmt, peak_gib, per_sample_gflop, reset_memory, row, sync, timed  # noqa: E402,F401

CUHK_TRAIN_IDS = 11003  # classifier width of the ID loss on CUHK-PEDES
WORDS = ("a man woman wearing black white blue red grey dark light long short sleeve shirt jacket coat "
         "jeans trousers skirt shoes boots bag backpack carrying walking holding hair glasses hat and "
         "with the his her on in is has of stripes dress sweater umbrella phone bicycle").split()


@dataclass
class Settings:
    model: str = "ViT-B-16"
    image_size: tuple[int, int] = (384, 128)
    methods: tuple[str, ...] = tuple(METHODS)
    train_batches: tuple[int, ...] = (64, 128)
    modes: tuple[str, ...] = ("eager", "compile")
    compile_backend: str = "inductor"
    compile_methods: tuple[str, ...] | None = None  # None: every method measured
    compile_batches: tuple[int, ...] | None = None  # None: every training batch size
    warmup_steps: int = 5
    timed_steps: int = 20
    embed_batches: tuple[int, ...] = (256, 512)
    text_batch: int = 512
    eval_queries: int = 10_000
    eval_gallery: int = 1_000_000
    eval_dim: int = 512
    eval_block: int = 1024
    eval_check: tuple[int, int] = (500, 50_000)  # queries x gallery compared with tpr_ray.evaluation.metrics
    eval_shard_rows: int = 250_000  # the library's streaming evaluator sees the gallery in shards
    images_per_person: int = 4
    top_k: int = 10
    budget_s: float = 420.0
    compile_estimate_s: float = 60.0

    @classmethod
    def smoke(cls) -> Settings:
        # Dynamo's capture alone (backend "eager") keeps the compile path tested at CI cost.
        return cls(model="tpr-tiny", image_size=(128, 64), train_batches=(4, 8), compile_backend="eager",
                   compile_methods=("baseline",), warmup_steps=1, timed_steps=2,
                   embed_batches=(8, 16), text_batch=16, eval_queries=96, eval_gallery=3000, eval_dim=32,
                   eval_block=40, eval_check=(40, 800), eval_shard_rows=700, budget_s=300.0, compile_estimate_s=5.0)


# --------------------------------------------------------------------------- measuring


class CellTimeout(Exception):
    pass


class Budget:
    """Wall-clock budget of the whole run, counted from the interpreter's start of this module."""

    def __init__(self, seconds: float):
        self.deadline = STARTED + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()

    @contextlib.contextmanager
    def alarm(self):
        """Interrupt the cell at the deadline (main thread, POSIX); elsewhere only the pre-check holds."""
        if not hasattr(signal, "setitimer"):
            yield
            return

        def stop(signum, frame):
            raise CellTimeout("interrupted at the time budget's end")

        previous = signal.signal(signal.SIGALRM, stop)
        signal.setitimer(signal.ITIMER_REAL, max(0.01, self.left()))
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)


def captions(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(15, 40))) + "." for _ in range(n)]


def build(name: str, s: Settings, device):
    cls = get_method(name)
    method = cls(BackboneConfig(s.model, None, tuple(s.image_size)), cls.default_recipe, num_classes=CUHK_TRAIN_IDS)
    return method.to(device)


def train_batch(method, batch_size: int, s: Settings, device, seed: int = 0) -> dict:
    """Two captions per person, as a caption-pair epoch gives them, so SDM sees several positives."""
    gen = torch.Generator().manual_seed(seed)
    person_ids = torch.arange(batch_size) // 2
    return {
        "images": torch.randn(batch_size, 3, *s.image_size, generator=gen).to(device),
        "tokens": method.tokenize(captions(batch_size, seed)).to(device),
        "person_ids": person_ids.to(device),
        "labels": (person_ids % CUHK_TRAIN_IDS).to(device),
    }


def train_cell(method, batch_size: int, s: Settings, device, compiled=None) -> dict:
    """Samples/s of the training step train.py runs: forward (losses), backward, optimizer step.

    ``compiled`` is ``torch.compile(method)``, shared by the method's batch sizes: the batch
    dimension is marked dynamic, so one compile serves them all.
    """
    stage = method.stages()[-1]
    method.set_stage(stage)
    method.train()
    optimizer = build_optimizer(method, stage)
    batch = train_batch(method, batch_size, s, device)
    model = method if compiled is None else compiled
    if compiled is not None:
        for value in batch.values():
            torch._dynamo.maybe_mark_dynamic(value, 0)

    def step():
        with autocast(device):
            losses = model(batch)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        optimizer.step()

    def forward_backward():
        with autocast(device):
            method(batch)["loss"].backward()
        method.zero_grad(set_to_none=True)

    gflop = flops_of(forward_backward) / batch_size / 1e9
    reset_memory(device)  # after the count: its eager pass must not set the compiled step's peak
    seconds, first = timed(step, s.warmup_steps, s.timed_steps, device)
    result = {"stage": stage.name, "samples_per_s": batch_size / seconds, "step_ms": 1e3 * seconds,
              "peak_gib": peak_gib(device), "gflop_per_sample": gflop,
              "trainable": method.parameter_counts()["trainable"],
              "optimizer": type(optimizer).__name__ + (" (fused)" if optimizer.defaults.get("fused") else "")}
    if compiled is not None:
        # Graph breaks (and recompiles) show here: a method that compiles whole has one graph.
        result.update(compile_s=first, graphs=int(counters["stats"]["unique_graphs"]))
    method.zero_grad(set_to_none=True)  # the gradients must not count in the next cell's peak
    return result


def inference_cell(encode, inputs, count: int, s: Settings, device) -> dict:
    """samples/s, peak memory and GFLOP per sample of ``encode(inputs)`` under bf16 autocast."""
    def run(x=inputs):
        with autocast(device):
            encode(x)

    gflop = per_sample_gflop(run, inputs)
    reset_memory(device)
    seconds, _ = timed(torch.inference_mode()(run), s.warmup_steps, s.timed_steps, device)
    return {"samples_per_s": count / seconds, "peak_gib": peak_gib(device), "gflop_per_sample": gflop}


def embed_cell(method, batch_size: int, s: Settings, device) -> dict:
    method.eval()
    images = torch.randn(batch_size, 3, *s.image_size).to(device)
    return inference_cell(method.encode_image, images, batch_size, s, device)


def text_cell(method, s: Settings, device) -> dict:
    method.eval()
    texts = captions(s.text_batch, seed=1)
    tick = time.perf_counter()
    tokens = method.tokenize(texts)
    tokenize_per_s = len(texts) / (time.perf_counter() - tick)
    return {**inference_cell(method.encode_text, tokens.to(device), len(texts), s, device),
            "tokenize_per_s_cpu": tokenize_per_s}


def eval_check_cell(s: Settings, device) -> dict:
    """The suite's device evaluator and the library's streaming kernels against tpr_ray.evaluation.metrics."""
    from tpr_ray.evaluation.metrics import retrieval_metrics, stable_descending_order

    nq, ng = s.eval_check
    q, g, qp, gp = synthetic_embeddings(nq, ng, s.eval_dim, s.images_per_person, device, seed=1)
    # Signs make integer scores: many exact ties, which the tie rule must order.
    q, g = q.sign(), g.sign()
    ours = exact_eval(q, g, qp, gp, top_k=s.top_k, block=max(nq, s.eval_block), skip_queries_without_positives=True)
    scores = block_scores(q, g).cpu().numpy()
    reference = retrieval_metrics(scores, qp.cpu().numpy(), gp.cpu().numpy(), skip_queries_without_positives=True)
    order = stable_descending_order(scores)[:, : s.top_k + 1]
    library = library_eval(q.cpu().numpy(), g.cpu().numpy(), qp.cpu().numpy(), gp.cpu().numpy(),
                           shard_rows=max(1, ng // 3), top_k=s.top_k, block=s.eval_block, device=device.type)
    same_metrics = all(ours["metrics"][key] == reference[key] == library["metrics"][key] for key in reference)
    same_top = bool(np.array_equal(ours["top_positions"].cpu().numpy(), order[:, : s.top_k])
                    and np.array_equal(library["top_positions"], order[:, : s.top_k]))
    # Queries whose top-k is decided by the tie rule: the k-th and the next item score the same.
    ranked = np.take_along_axis(scores, order, axis=1)
    return {"equal": same_metrics and same_top, "metrics_equal": same_metrics, "top_k_equal": same_top,
            "queries": nq, "gallery": ng, "queries_tied_at_k": int((ranked[:, -1] == ranked[:, -2]).sum())}


def eval_cell(s: Settings, device, peaks) -> dict:
    q, g, qp, gp = synthetic_embeddings(s.eval_queries, s.eval_gallery, s.eval_dim, s.images_per_person, device)
    reset_memory(device)
    sync(device)
    tick = time.perf_counter()
    out = exact_eval(q, g, qp, gp, top_k=s.top_k, block=s.eval_block, skip_queries_without_positives=True)
    sync(device)
    seconds = time.perf_counter() - tick
    gflop = 2.0 * s.eval_gallery * s.eval_dim / 1e9  # per query, the fp32 matmul
    ceiling = peaks["fp32"] * 1e3 / gflop if peaks["fp32"] else None
    return {"seconds": seconds, "samples_per_s": s.eval_queries / seconds, "peak_gib": peak_gib(device),
            "gflop_per_sample": gflop, "ceiling_per_s": ceiling,
            "mfu": gflop * s.eval_queries / seconds / (peaks["fp32"] * 1e3) if peaks["fp32"] else None,
            "metrics": dict(out["metrics"]), "top_k_shape": list(out["top_positions"].shape),
            "_top": out["top_positions"].cpu().numpy()}


def library_eval_cell(s: Settings, device, suite_result: dict | None) -> dict:
    """The same evaluation through the library's streaming kernels (what `tpr-ray eval` runs)."""
    q, g, qp, gp = (x.cpu().numpy() for x in synthetic_embeddings(
        s.eval_queries, s.eval_gallery, s.eval_dim, s.images_per_person, device))
    reset_memory(device)
    tick = time.perf_counter()
    out = library_eval(q, g, qp, gp, shard_rows=s.eval_shard_rows, top_k=s.top_k, block=s.eval_block,
                       device=device.type)
    seconds = time.perf_counter() - tick
    result = {"seconds": seconds, "samples_per_s": s.eval_queries / seconds, "peak_gib": peak_gib(device),
              "metrics": dict(out["metrics"]), "shards": -(-s.eval_gallery // s.eval_shard_rows)}
    if suite_result and suite_result.get("status") == "ok":
        # Two fp32 matmuls of different shapes may round a score differently, so a near-tie can
        # order differently: agreement is expected, not guaranteed (eval_check is exact).
        result["same_as_suite"] = result["metrics"] == suite_result["metrics"]
        result["top_k_rows_same"] = float(np.mean(np.all(out["top_positions"] == suite_result.pop("_top"), axis=1)))
    return result


# --------------------------------------------------------------------------- the run


class Suite:
    def __init__(self, s: Settings, device, peaks, out_path: str, smoke: bool):
        self.s, self.device, self.peaks, self.out_path = s, device, peaks, out_path
        self.budget = Budget(s.budget_s)
        self.cells: list[dict] = []
        self.compile_seconds: list[float] = []
        self.built = (None, None)  # (name, method or the exception its build raised)
        self.compiled_module = (None, None)  # (name, torch.compile of that method)
        self.report = {"suite": "tpr-ray gpu suite", "smoke": smoke, "settings": dataclasses.asdict(s),
                       "environment": environment(device, peaks), "cells": self.cells}

    def cell(self, what: str, config: dict, estimate_s: float, fn) -> dict:
        record = {"what": what, **config}
        left = self.budget.left()
        if left < estimate_s:
            record.update(status="skipped",
                          reason=f"time budget: {left:.0f} s left, the cell needs about {estimate_s:.0f} s")
        else:
            tick = time.monotonic()
            try:
                with self.budget.alarm():
                    record.update(fn(), status="ok")
            except torch.OutOfMemoryError:
                record.update(status="error", reason="out of GPU memory")
            except Exception as exc:  # a method that cannot compile, say: record it, measure the rest
                if isinstance(exc, CellTimeout) or self.budget.left() <= 0:
                    # Inductor re-raises the alarm's exception as its own error type.
                    record.update(status="skipped", reason="interrupted at the time budget's end")
                else:
                    record.update(status="error", reason=f"{type(exc).__name__}: {str(exc)[:300]}")
            record["wall_s"] = round(time.monotonic() - tick, 2)
        self.add_ceiling(record, what)
        self.cells.append(record)
        self.save()
        print(f"  {row(record)}", flush=True)
        return record

    def add_ceiling(self, record, what):
        if "gflop_per_sample" not in record or what == "eval":
            return
        peak = self.peaks["bf16"]
        record["ceiling_per_s"] = peak * 1e3 / record["gflop_per_sample"] if peak else None
        record["mfu"] = record["gflop_per_sample"] * record["samples_per_s"] / (peak * 1e3) if peak else None

    def save(self):
        self.report["elapsed_s"] = round(time.monotonic() - STARTED, 1)
        self.report["skipped"] = sum(c["status"] == "skipped" for c in self.cells)
        os.makedirs(os.path.dirname(os.path.abspath(self.out_path)), exist_ok=True)
        # Keys starting with "_" carry arrays from one cell to the next, not results.
        cells = [{k: v for k, v in c.items() if not k.startswith("_")} for c in self.cells]
        with open(self.out_path, "w") as f:
            json.dump({**self.report, "cells": cells}, f, indent=1, default=float)

    def run(self):
        s, device = self.s, self.device
        eager = 30.0 if device.type == "cuda" else 1.0
        for name in s.methods:
            for batch in s.train_batches:
                self.cell("train", {"method": name, "batch": batch, "mode": "eager"}, eager,
                          lambda name=name, batch=batch: train_cell(self.method(name), batch, s, device))
            for batch in s.embed_batches:
                self.cell("embed", {"method": name, "batch": batch, "mode": "eager"}, eager,
                          lambda name=name, batch=batch: embed_cell(self.method(name), batch, s, device))
            self.cell("text", {"method": name, "batch": s.text_batch, "mode": "eager"}, eager,
                      lambda name=name: text_cell(self.method(name), s, device))
        self.method(None)
        self.cell("eval_check", {"batch": s.eval_check[0], "mode": "eager"}, eager, lambda: eval_check_cell(s, device))
        suite_eval = self.cell("eval", {"batch": s.eval_queries, "mode": "eager"}, eager,
                               lambda: eval_cell(s, device, self.peaks))
        self.cell("eval_library", {"batch": s.eval_queries, "mode": "eager"}, eager,
                  lambda: library_eval_cell(s, device, suite_eval))
        suite_eval.pop("_top", None)
        if "compile" in s.modes:
            for name in s.compile_methods or s.methods:
                compiled_once = False
                for batch in s.compile_batches or s.train_batches:
                    # The first size pays for the compile, which the slowest so far estimates.
                    estimate = eager if compiled_once else max([s.compile_estimate_s] + self.compile_seconds)
                    record = self.cell("train", {"method": name, "batch": batch, "mode": "compile"}, estimate,
                                       lambda name=name, batch=batch: self.compiled(name, batch))
                    if record["status"] == "ok" and not compiled_once:
                        self.compile_seconds.append(record["wall_s"])
                        compiled_once = True
            self.method(None)
        self.save()
        return self.report

    def method(self, name):
        """The method being measured, built by its first cell; a failed build fails each of its cells."""
        if self.built[0] != name:
            self.built = self.compiled_module = (None, None)  # the previous method leaves the device first
            torch._dynamo.reset()
            reset_memory(self.device)
            try:
                self.built = (name, build(name, self.s, self.device) if name else None)
            except Exception as exc:
                self.built = (name, exc)
        if isinstance(self.built[1], Exception):
            raise self.built[1]
        return self.built[1]

    def compiled(self, name, batch):
        method = self.method(name)
        if self.compiled_module[0] != name:
            counters.clear()
            self.compiled_module = (name, torch.compile(method, backend=self.s.compile_backend))
        return train_cell(method, batch, self.s, self.device, compiled=self.compiled_module[1])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (tpr-tiny, a small evaluation); runs on CPU")
    parser.add_argument("--out", default="runs/gpu_suite.json", help="where the JSON goes")
    parser.add_argument("--budget-s", type=float, help="wall-clock budget of the whole run (default 420, smoke 300)")
    parser.add_argument("--peak-tflops", type=float, help="the chip's dense bf16 peak when it is not an H100/H200/A100")
    parser.add_argument("--peak-fp32-tflops", type=float, help="the chip's fp32 peak (the evaluation's matmul)")
    parser.add_argument("--methods", help="comma-separated subset of " + ",".join(METHODS))
    parser.add_argument("--no-compile", action="store_true", help="eager cells only")
    parser.add_argument("--compile-backend", help="torch.compile backend (default inductor; smoke: eager)")
    parser.add_argument("--device", help="cuda or cpu (default: cuda when present)")
    args = parser.parse_args(argv)

    s = Settings.smoke() if args.smoke else Settings()
    if args.budget_s is not None:
        s.budget_s = args.budget_s
    if args.methods:
        s.methods = tuple(m.strip() for m in args.methods.split(","))
        for name in s.methods:
            get_method(name)  # unknown names fail here, before anything runs
        s.compile_methods = tuple(m for m in s.compile_methods or s.methods if m in s.methods)
    if args.compile_backend:
        s.compile_backend = args.compile_backend
    if args.no_compile:
        s.modes = ("eager",)
    if args.smoke:
        torch.set_num_threads(1)  # tiny ops: threads only contend on a shared CI machine
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # the evaluation's scores are full fp32, like the CPU path
    peaks = chip_peaks(device, args.peak_tflops, args.peak_fp32_tflops)
    print(f"tpr-ray gpu suite on {peaks['name']} ({s.model}, {'x'.join(map(str, s.image_size))}, "
          f"peak bf16 {fmt(peaks['bf16'], '.0f')} TFLOP/s from {peaks['source']}; budget {s.budget_s:.0f} s)")
    print(f"  {HEADER}", flush=True)
    report = Suite(s, device, peaks, args.out, args.smoke).run()
    print(f"\n{HEADER}")
    for c in report["cells"]:
        print(row(c))
    print(f"\n{len(report['cells'])} cells, {report['skipped']} skipped, {report['elapsed_s']:.0f} s; JSON: {args.out}")
    if any("interrupted" in c.get("reason", "") for c in report["cells"]):
        # A compile cut short can leave inductor's worker pool busy, and waiting for it at
        # exit would spend the time the budget protects; everything is written already.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return report


if __name__ == "__main__":
    main()
