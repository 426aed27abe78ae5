"""Jobs over N ranks through `accelerate launch` (torchrun underneath), the one way a stage scales out.

`check_processes` refuses a process count the machine cannot hold (one line, before any work). `launch` writes the
jobs to a temporary file, runs `accelerate launch --num_processes N -m <module> <jobs> <results>` (gloo on CPU, NCCL
on GPU; one torch thread per process on CPU, torchrun's default), and reads back what the main process wrote. A rank
that raises writes one line naming the rank and the job (`rank_error`); `launch` raises it as a NifiError.
Several nodes: `nodes()` reads --num_machines, --machine_rank and --main_process_ip from NIFI_* variables (a cluster
script sets them). The launching node runs the stage; every other node runs `python -m nifi_utils.core.launch join
<module>`, which starts that node's ranks with no jobs of its own: torchrun's rendezvous at the main process's address
joins them, and the main process hands every rank the jobs over the process group (`rank_jobs`), so no folder needs
to be shared.
"""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
import tempfile
from pathlib import Path

from nifi_utils.core.common import NifiError

ERROR_FILE = "first_rank.error"  # the first rank to fail writes it; the others' errors follow from that one
NO_FILE = "from-main-process"  # a joining node's ranks: jobs come from the main process, results go to it


class UsageError(NifiError):
    """A request that cannot run here (e.g. more processes than cores or GPUs): one line, exit status 2."""


def available_slots() -> tuple[int, str]:
    """(how many processes this node can give a device each, what they are): GPUs where CUDA is, else cores."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.device_count(), "GPUs"
    return os.cpu_count() or 1, "cores"


def check_processes(processes: int, what: str = "processes") -> int:
    """`processes` as an int, or a UsageError when it is < 1 or larger than the GPUs (or cores) of this node."""
    n = int(processes)
    have, kind = available_slots()
    if n < 1:
        raise UsageError(f"{what} must be >= 1, got {n}")
    if n > have:
        raise UsageError(f"{what} = {n} is more than the {have} {kind} here; use at most {have}")
    return n


def batch_share(batch: int, ranks: int, rank: int = 0, what: str = "batch") -> slice:
    """Rank `rank`'s items of a global batch of `batch` split over `ranks` ranks; a UsageError (one line, exit 2)
    when it does not split evenly (unequal shares would weigh the ranks' averaged gradients unequally)."""
    if int(batch) % int(ranks):
        raise UsageError(f"{what} = {batch} (pairs per step over all ranks) does not split over {ranks} processes; "
                         f"use a multiple of {ranks}")
    b = int(batch) // int(ranks)
    return slice(rank * b, (rank + 1) * b)


def nodes() -> dict:
    """Multi-node settings from the environment (a cluster script sets them on every node; default one node):
    NIFI_NUM_MACHINES, NIFI_MACHINE_RANK, NIFI_MAIN_PROCESS_IP (the machine-rank-0 node), NIFI_MAIN_PROCESS_PORT."""
    n = int(os.environ.get("NIFI_NUM_MACHINES", 1))
    out = {"num_machines": n, "machine_rank": int(os.environ.get("NIFI_MACHINE_RANK", 0)),
           "main_process_ip": os.environ.get("NIFI_MAIN_PROCESS_IP"),
           "main_process_port": os.environ.get("NIFI_MAIN_PROCESS_PORT", "29500")}
    if n > 1 and not out["main_process_ip"]:
        raise UsageError("NIFI_NUM_MACHINES > 1 needs NIFI_MAIN_PROCESS_IP (the machine-rank-0 node's address)")
    return out


def launch_command(processes: int, module: str, args: list[str], node: dict | None = None) -> list[str]:
    """The `accelerate launch` command line for `python -m module *args` on `processes` ranks per node."""
    import torch

    node = node or {"num_machines": 1}
    n = node["num_machines"]
    # --multi_gpu selects accelerate's torchrun launcher; without CUDA each rank's Accelerator(cpu=True) then
    # picks MULTI_CPU with gloo (accelerate's --cpu flag would take its single-process/MPI launcher instead)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes * n),
           "--num_machines", str(n), "--mixed_precision", "no", "--dynamo_backend", "no"]
    if n > 1:
        cmd += ["--machine_rank", str(node["machine_rank"]), "--main_process_ip", node["main_process_ip"],
                "--main_process_port", str(node["main_process_port"])]
    if not torch.cuda.is_available():
        cmd += ["--num_cpu_threads_per_process", "1"]
    return cmd + ["-m", module, *args]


def _run(folder: Path, module: str, processes: int, node: dict, what: str, args: list[str]):
    env = {**os.environ, "NIFI_RANK_ERRORS": str(folder)}
    proc = subprocess.run(launch_command(processes, module, args, node), env=env, stdin=subprocess.DEVNULL)
    if (folder / ERROR_FILE).is_file():
        raise NifiError((folder / ERROR_FILE).read_text().strip())
    if proc.returncode != 0:
        raise NifiError(f"accelerate launch of {module} on {processes} processes x {node['num_machines']} machines "
                        f"failed (exit {proc.returncode}) before any rank reported a {what} error: see the log above")


def launch(module: str, jobs, processes: int, what: str = "job"):
    """Run `module`'s rank entry (`python -m module JOBS RESULTS`) on `processes` ranks per node (the other nodes of
    `nodes()` run `python -m nifi_utils.core.launch join module`); the main process's result."""
    processes = check_processes(processes)
    node = nodes()
    if node["machine_rank"] != 0:
        raise UsageError("the stage runs on the node of machine rank 0; the others run "
                         f"`python -m nifi_utils.core.launch join {module}`")
    with tempfile.TemporaryDirectory(prefix="nifi-launch-") as tmp:
        folder = Path(tmp)
        jobs_path, results_path = folder / "jobs.pkl", folder / "results.pkl"
        jobs_path.write_bytes(pickle.dumps(jobs))
        _run(folder, module, processes, node, what, [str(jobs_path), str(results_path)])
        if not results_path.is_file():
            raise NifiError(f"{module} ended without results on {results_path}: see the log above")
        return pickle.loads(results_path.read_bytes())


def join(module: str, processes: int) -> int:
    """On a node of machine rank >= 1: start this node's ranks of `module`; torchrun's rendezvous waits for the main
    node's, and the main process sends the jobs (`rank_jobs`)."""
    node = nodes()
    if node["num_machines"] < 2 or node["machine_rank"] < 1:
        raise UsageError("join runs on the nodes of machine rank >= 1 (NIFI_NUM_MACHINES > 1, NIFI_MACHINE_RANK)")
    with tempfile.TemporaryDirectory(prefix="nifi-join-") as tmp:
        _run(Path(tmp), module, check_processes(processes), node, "job", [NO_FILE, NO_FILE])
    return 0


def rank_jobs(state, jobs_path: str | Path):
    """The jobs every rank runs: the main process reads them (the launching node's file), every other rank, on this
    node or another, receives them over the process group."""
    from accelerate.utils import broadcast_object_list

    box = [pickle.loads(Path(jobs_path).read_bytes()) if state.is_main_process else None]
    if state.num_processes > 1:
        broadcast_object_list(box, from_process=0)
    return box[0]


def rank_error(rank: int, job: str, e: BaseException, what: str = "job") -> str:
    """The one line a failing rank reports (and leaves for `launch` to raise)."""
    msg = " ".join(str(e).split())
    line = f"rank {rank} failed in {what} {job}: {type(e).__name__}: {msg}"
    folder = os.environ.get("NIFI_RANK_ERRORS")
    if folder:
        try:  # O_EXCL: only the first failing rank's line is kept (the others then fail waiting on it)
            fd = os.open(Path(folder) / ERROR_FILE, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "w") as f:
                f.write(line + "\n")
    print(f"error: {line}", file=sys.stderr, flush=True)
    return line


def run_rank_jobs(rank: int, items, fn, name_of, what: str = "job") -> list:
    """`fn(item)` for every item this rank runs, in order. A raising item is `rank_error`'s one line naming the rank
    and the job, then this process ends at once (torchrun stops the others)."""
    out = []
    for item in items:
        try:
            out.append(fn(item))
        except Exception as e:
            rank_error(rank, name_of(item), e, what)
            sys.stdout.flush()
            os._exit(1)  # a clean exit would wait on the other ranks, which wait on this one
    return out


def finish_rank(state, results_path: str | Path, results) -> int:
    """The main process writes the results `launch` reads back; every rank waits for it."""
    if state.is_main_process and str(results_path) != NO_FILE:
        Path(results_path).write_bytes(pickle.dumps(results))
    state.wait_for_everyone()
    return 0


def error_exit(e: NifiError) -> int:
    """A command's one error line; exit status 2 for a request that cannot run here, 1 for a failure."""
    print(f"error: {e}", file=sys.stderr)
    return 2 if isinstance(e, UsageError) else 1


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m nifi_utils.core.launch", description=join.__doc__)
    ap.add_argument("command", choices=["join"])
    ap.add_argument("module", help="the stage's rank entry, e.g. nifi_utils.models.distill or nifi_utils.pipeline.synthesis")
    ap.add_argument("--processes", type=int, default=1, help="ranks on this node (as the stage's `processes`)")
    args = ap.parse_args(argv)
    try:
        return join(args.module, args.processes)
    except NifiError as e:
        return error_exit(e)


if __name__ == "__main__":
    sys.exit(main())
