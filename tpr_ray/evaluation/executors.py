"""Where the streaming evaluator's shard tasks run: in this process (threads) or as Ray tasks.

An executor takes a task function, one argument tuple per shard, the query matrix every
task shares, each task's declared memory and CPUs, and returns the results in shard order.
"""

from __future__ import annotations

import numpy as np

from tpr_ray.evaluation.kernels import CANDIDATE_BUDGET


def task_memory(rows: int, dim: int, block: int, slots: int, top_k: int, num_queries: int, rank_pass: bool) -> int:
    """Bytes a shard task needs at its peak (declared to Ray so tasks do not over-commit RAM)."""
    shard = 2 * rows * dim * 4  # the Arrow read and the float32 matrix
    queries = num_queries * dim * 4 + num_queries * slots * 16
    block_bytes = block * rows * 4 + CANDIDATE_BUDGET * 48 if rank_pass else block * slots * dim * 4
    return int(shard + queries + block_bytes + num_queries * top_k * 12 + (64 << 20))


def run_here(fn, arg_list, queries, memories=None, cpus=None, threads: int = 1):
    """Run the tasks in this process, ``threads`` at a time (the declared resources are not needed here)."""
    if threads <= 1:
        return [fn(queries, *args) for args in arg_list]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(lambda args: fn(queries, *args), arg_list))


def run_with_ray(fn, arg_list, queries, memories, cpus, gpus: float = 0.0):
    """One Ray task per shard, declaring its CPUs and memory; retried twice if a worker dies."""
    import ray

    task = ray.remote(fn)
    queries_ref = ray.put(queries)
    shared = {}  # arrays every task gets (targets, target scores) go to the object store once
    refs = []
    for args, memory in zip(arg_list, memories):
        args = tuple(_shared_ref(a, shared) for a in args)
        refs.append(task.options(num_cpus=cpus, num_gpus=gpus, memory=memory, max_retries=2).remote(queries_ref, *args))
    return ray.get(refs)


def _shared_ref(value, shared: dict):
    import ray

    if isinstance(value, np.ndarray) and value.nbytes > 1 << 16:
        if id(value) not in shared:
            shared[id(value)] = ray.put(value)
        return shared[id(value)]
    return value
