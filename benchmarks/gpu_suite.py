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
import gc
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

STARTED = time.monotonic()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from tpr_ray.methods.backbone import BackboneConfig  # noqa: E402
from tpr_ray.model.encode import autocast  # noqa: E402
from tpr_ray.methods import METHODS, get_method  # noqa: E402
from tpr_ray.evaluation.metrics import metrics_from_positive_ranks  # noqa: E402
from tpr_ray.training.optim import build_optimizer  # noqa: E402  (the optimizer training builds)

# Dense (no sparsity) peaks from the vendors' data sheets, TFLOP/s: (bf16 tensor core, fp32).
# An 8192^3 bf16 matmul reaches about 790 of the H200's 989 here, so 80 % MFU is the practical top.
CHIP_PEAKS = (("H200", 989.0, 67.0), ("H100 PCIe", 756.0, 51.0), ("H100 NVL", 835.0, 60.0),
              ("H100", 989.0, 67.0), ("A100", 312.0, 19.5))
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


# --------------------------------------------------------------------------- exact evaluation


def positive_slots(query_pids: torch.Tensor, gallery_pids: torch.Tensor) -> torch.Tensor:
    """Gallery positions of each query's positives, ``[Q, P]`` ascending, padded with -1."""
    order = torch.argsort(gallery_pids, stable=True)
    sorted_pids = gallery_pids[order]
    start = torch.searchsorted(sorted_pids, query_pids)
    count = torch.searchsorted(sorted_pids, query_pids, right=True) - start
    slots = torch.arange(max(1, int(count.max())), device=query_pids.device)
    valid = slots < count[:, None]
    index = (start[:, None] + slots).clamp(max=len(order) - 1)
    return torch.where(valid, order[index], -1)


def block_scores(queries: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
    """float32 inner products of a block of queries with the whole gallery."""
    return queries.float() @ gallery.float().T


def count_ahead(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Items ranked ahead of each target under tpr_ray.evaluation.metrics' tie rule (score desc, position asc).

    ``targets`` are gallery positions ``[B, P]`` (-1 = none). Ties with another item are rare
    with real features, so the position-aware count runs only on rows that have one.
    """
    positions = torch.arange(scores.shape[1], device=scores.device)
    target_scores = scores.gather(1, targets.clamp(min=0))
    counts = torch.empty_like(targets)
    for slot in range(targets.shape[1]):
        t = target_scores[:, slot, None]
        counts[:, slot] = (scores > t).sum(1)
        tied = ((scores == t).sum(1) > 1).nonzero().squeeze(1)
        if len(tied):
            earlier = (scores[tied] == t[tied]) & (positions < targets[tied, slot, None])
            counts[tied, slot] += earlier.sum(1)
    return counts


def top_k_stable(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best ``k`` per row by (score desc, position asc), the order tpr_ray.evaluation.metrics ranks by."""
    values, columns = torch.topk(scores, min(k, scores.shape[1]), dim=1)
    threshold = values[:, -1:]
    # topk keeps an arbitrary subset of the items tied at the k-th score: redo the rows where
    # some were left out, keeping the earliest positions.
    short = ((scores == threshold).sum(1) > (values == threshold).sum(1)).nonzero().squeeze(1)
    for row in short.tolist():
        above = (scores[row] > threshold[row]).nonzero().squeeze(1)
        tied = (scores[row] == threshold[row]).nonzero().squeeze(1)[: values.shape[1] - len(above)]
        columns[row] = torch.cat([above, tied])
        values[row] = scores[row, columns[row]]
    by_position = columns.argsort(dim=1)
    columns, values = columns.gather(1, by_position), values.gather(1, by_position)
    by_score = torch.sort(values, dim=1, descending=True, stable=True).indices
    return values.gather(1, by_score), columns.gather(1, by_score)


def exact_eval(queries, gallery, query_pids, gallery_pids, *, top_k: int = 10, block: int = 1024,
               skip_queries_without_positives: bool = False) -> dict:
    """R@1/5/10, mAP, mINP and each query's top-k, exact, ``block`` queries at a time on their device.

    Each block's scores are counted against its positives (no full sort of the gallery) and
    the ranks go through tpr_ray.evaluation.metrics, so the numbers are the CPU evaluator's.
    """
    targets = positive_slots(query_pids, gallery_pids)
    ranks = torch.zeros_like(targets)
    top_scores = torch.empty(len(queries), min(top_k, len(gallery)), device=queries.device)
    top_positions = torch.empty(top_scores.shape, dtype=torch.int64, device=queries.device)
    for start in range(0, len(queries), block):
        stop = min(start + block, len(queries))
        scores = block_scores(queries[start:stop], gallery)
        block_targets = targets[start:stop]
        ranks[start:stop] = torch.where(block_targets >= 0, count_ahead(scores, block_targets) + 1, 0)
        top_scores[start:stop], top_positions[start:stop] = top_k_stable(scores, top_k)
        del scores
    metrics = metrics_from_positive_ranks(ranks.cpu().numpy(),
                                          skip_queries_without_positives=skip_queries_without_positives)
    metrics["num_gallery"] = len(gallery)
    return {"metrics": metrics, "top_scores": top_scores, "top_positions": top_positions}


def library_eval(queries, gallery, query_pids, gallery_pids, *, shard_rows: int, top_k: int = 10, block: int = 1024,
                 device: str = "cpu") -> dict:
    """The streaming evaluator's kernels, as the library runs them: the positive pass in numpy,
    the rank pass in torch on ``device`` (tpr_ray.evaluation.kernels_torch), shard by shard."""
    from tpr_ray.evaluation.kernels import merge_top_k, positive_positions, ranks_from_counts, shard_positive_scores
    from tpr_ray.evaluation.kernels_torch import shard_ranks_torch

    targets = positive_positions(query_pids, gallery_pids)
    firsts = range(0, len(gallery), shard_rows)
    target_scores = np.full(targets.shape, np.nan, dtype=np.float32)
    for first in firsts:
        part = shard_positive_scores(queries, gallery[first:first + shard_rows], first, targets, block)
        target_scores = np.where(np.isnan(part), target_scores, part)
    counts, tops = np.zeros(targets.shape, dtype=np.int64), []
    for first in firsts:
        out = shard_ranks_torch(queries, gallery[first:first + shard_rows], first, target_scores, targets,
                                top_k, block, device)
        counts += out["counts"]
        tops.append((out["top_scores"], out["top_positions"]))
    metrics = metrics_from_positive_ranks(ranks_from_counts(counts, targets), skip_queries_without_positives=True)
    metrics["num_gallery"] = len(gallery)
    top_scores, top_positions = merge_top_k(tops, top_k)
    return {"metrics": metrics, "top_scores": top_scores, "top_positions": top_positions}


def synthetic_embeddings(num_queries, num_gallery, dim, per_person, device, seed=0, noise=2.0):
    """Person centres plus noise: realistic score distributions and a few positives per query."""
    gen = torch.Generator(device=device).manual_seed(seed)
    persons = max(1, num_gallery // per_person)
    centres = torch.randn(persons, dim, device=device, generator=gen)
    gallery_pids = torch.randperm(num_gallery, device=device, generator=gen) % persons
    query_pids = torch.randint(0, persons, (num_queries,), device=device, generator=gen)

    def views(pids):
        x = centres[pids] + noise * torch.randn(len(pids), dim, device=device, generator=gen)
        return F.normalize(x, dim=1)

    return views(query_pids), views(gallery_pids), query_pids, gallery_pids


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
