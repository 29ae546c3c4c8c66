"""Start and stop a real ``torchrun -m kunserve.serve`` cluster on a loopback port."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalCluster:
    """A torchrun process tree serving ``serve_args`` on 127.0.0.1; ``stop()`` sends SIGTERM as
    Ctrl-C would and returns (exit code, output)."""

    def __init__(self, model_dir, nproc: int, serve_args: list[str], served_model_name: str = "model",
                 startup_timeout_s: float = 300, log_level: str = "INFO"):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.nproc = nproc
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "kunserve.serve", "--model", str(model_dir), "--served-model-name", served_model_name,
            "--port", str(self.port), "--log-level", log_level, *serve_args,
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self._wait_healthy(startup_timeout_s)

    def _wait_healthy(self, timeout_s: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"cluster exited during start-up:\n{self.proc.stdout.read().decode()[-3000:]}")
            try:
                if httpx.get(f"{self.base_url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.kill()
        raise RuntimeError(f"cluster not healthy after {timeout_s} s")

    def child_processes(self) -> list:
        import psutil

        return psutil.Process(self.proc.pid).children(recursive=True)

    @contextlib.contextmanager
    def pinned_to_cores(self):
        """Pin every thread of rank r to core r (mod the cores this process may use) and this
        process (the load client) to rank 0's core, which also runs the HTTP server, until the
        block exits; yields {rank: core}. Where ranks share a few cores with the server and the
        client the OS moves the load between them, so one stage computes slower than another
        and repeated runs differ (on GPUs each rank owns its device)."""
        cores = sorted(os.sched_getaffinity(0))
        pinned = {}
        for proc in self.child_processes():
            local_rank = proc.environ().get("LOCAL_RANK")
            if local_rank is None:
                continue  # the torchrun agent
            core = cores[int(local_rank) % len(cores)]
            for thread in proc.threads():  # threads started later inherit their creator's mask
                os.sched_setaffinity(thread.id, {core})
            pinned[int(local_rank)] = core
        os.sched_setaffinity(0, {cores[0]})
        try:
            yield pinned
        finally:
            os.sched_setaffinity(0, cores)

    def stop(self, timeout_s: float = 60) -> tuple[int, str]:
        self.proc.send_signal(signal.SIGTERM)
        try:
            out, _ = self.proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            out, _ = self.proc.communicate()
        return self.proc.returncode, out.decode()

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
