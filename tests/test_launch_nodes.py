"""Two nodes on loopback: the launching node runs `launch`, the other `join`; torchrun's rendezvous at the main
process's address joins them and every rank gets the jobs from the main process (no shared folder)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from nifi_utils.core import launch as L

TESTS = Path(__file__).resolve().parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_join_by_rendezvous(monkeypatch, tmp_path):
    port = str(_free_port())
    env = {"NIFI_NUM_MACHINES": "2", "NIFI_MAIN_PROCESS_IP": "127.0.0.1", "NIFI_MAIN_PROCESS_PORT": port,
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    other = subprocess.Popen([sys.executable, "-m", "nifi_utils.core.launch", "join", "echo_ranks"],
                             env={**os.environ, **env, "NIFI_MACHINE_RANK": "1"}, cwd=tmp_path)
    for k, v in {**env, "NIFI_MACHINE_RANK": "0"}.items():
        monkeypatch.setenv(k, v)
    jobs = [{"name": "a"}, {"name": "b"}]
    try:
        got = L.launch("echo_ranks", jobs, 1)
    finally:
        rc = other.wait(timeout=120)
    assert rc == 0
    assert sorted(r for r, _ in got) == [0, 1] and all(j == jobs for _, j in got)


def test_join_refuses_on_the_main_node(monkeypatch):
    monkeypatch.setenv("NIFI_NUM_MACHINES", "2")
    monkeypatch.setenv("NIFI_MAIN_PROCESS_IP", "127.0.0.1")
    monkeypatch.setenv("NIFI_MACHINE_RANK", "0")
    with pytest.raises(L.UsageError, match="machine rank >= 1"):
        L.join("echo_ranks", 1)
    monkeypatch.setenv("NIFI_MACHINE_RANK", "1")
    with pytest.raises(L.UsageError, match="runs on the node of machine rank 0"):
        L.launch("echo_ranks", [], 1)


def test_several_nodes_need_the_main_address(monkeypatch):
    monkeypatch.setenv("NIFI_NUM_MACHINES", "2")
    monkeypatch.delenv("NIFI_MAIN_PROCESS_IP", raising=False)
    with pytest.raises(L.UsageError, match="NIFI_MAIN_PROCESS_IP"):
        L.nodes()
