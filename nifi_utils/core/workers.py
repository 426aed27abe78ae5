"""Independent jobs over worker processes, the one way every stage does it.

Small-tensor torch work (a 128² render, a 3.5 M-parameter transformer at batch 4) scales poorly over
threads (a cpu distillation step: 2.85 steps/s on 1 thread, 3.46 on 2, 1.2x); independent jobs (scenes,
distillation variants, refined levels) scale with the cores. `process_map` runs a
picklable function over jobs in `workers` spawned processes with cores / workers torch threads each,
returns the results in the jobs' order, and turns a worker's error (or its death) into one NifiError
naming the job. With `workers <= 1` it is a plain loop in this process.
"""
from __future__ import annotations

from nifi_utils.core.common import NifiError, progress


def _init(threads: int):
    import torch

    torch.set_num_threads(threads)


def process_map(fn, jobs: list, workers: int = 1, names: list[str] | None = None, what: str = "job",
                desc: str | None = None) -> list:
    """[fn(j) for j in jobs], over `workers` spawned processes; `names` label the jobs in errors."""
    names = names or [str(i) for i in range(len(jobs))]
    if workers <= 1 or len(jobs) <= 1:
        return [fn(j) for j in progress(jobs, desc=desc or what)]
    import multiprocessing as mp
    import os
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    workers = min(workers, len(jobs))
    threads = max(1, (os.cpu_count() or 2) // workers)
    done: dict[int, object] = {}
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_init,
                             initargs=(threads,)) as ex:
        futs = {ex.submit(fn, j): i for i, j in enumerate(jobs)}
        for fut in progress(as_completed(futs), total=len(futs), desc=f"{desc or what} ({workers} workers)"):
            i = futs[fut]
            try:
                done[i] = fut.result()
            except BrokenProcessPool:
                ex.shutdown(wait=False, cancel_futures=True)
                left = ", ".join(names[k] for k in range(len(jobs)) if k not in done)
                raise NifiError(f"a worker process died (killed, or out of memory) before these {what}s finished: "
                                f"{left}") from None
            except Exception as e:  # a worker's error fails the stage, naming the job
                ex.shutdown(wait=False, cancel_futures=True)
                msg = " ".join(str(e).split())
                raise NifiError(f"{what} {names[i]} failed in a worker process: {type(e).__name__}: {msg}") from e
    return [done[i] for i in range(len(jobs))]
