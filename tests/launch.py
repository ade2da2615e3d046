"""Run a stage script as a user would: under the deepspeed launcher with CPU ranks, or plain python."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def process_threads() -> int:
    """CPU threads for one process a test launches (or runs in): the machine's cores shared out among the
    pytest-xdist workers running side by side (scripts/test.sh starts two), so they do not oversubscribe it."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    return max(1, (os.cpu_count() or 1) // workers)


def run_stage(script: str, args: list[str], num_procs: int = 2, timeout: int = 600) -> str:
    """Run `script` (e.g. 'step1_sft/main.py') with `num_procs` CPU ranks (1 = plain python, no launcher).

    Returns combined stdout+stderr; raises AssertionError with the output's tail when it fails."""
    # A test process that initialised torch.distributed itself must not hand its rank/port to the child.
    launcher_vars = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launcher_vars}
    env.update({"DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})
    if num_procs == 1:
        cmd = [sys.executable, script, *args]
        env["OMP_NUM_THREADS"] = str(process_threads())
    else:
        port = _free_port()
        deepspeed = Path(sys.executable).with_name("deepspeed")
        cmd = [str(deepspeed), "--num_gpus", str(num_procs), "--master_port", str(port), script, *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{script} exited {proc.returncode}:\n{out[-6000:]}"
    if num_procs > 1:
        assert_no_shm_left(port)
    return out


def run_e2e(out: Path, *flags: str, timeout: int = 900) -> str:
    """Run the README's main command, `python e2e_rlhf.py --tiny --output-dir OUT FLAGS...`, as a user would,
    its stages on `process_threads()` CPU threads; returns its stdout, or raises AssertionError with the
    output's tail when it fails."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(process_threads())}
    proc = subprocess.run(
        [sys.executable, "e2e_rlhf.py", "--tiny", "--output-dir", str(out), *flags],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc.stdout


def assert_no_shm_left(port: int) -> None:
    """Fail if the run on `port` left DeepSpeed's shared-memory all-reduce buffers in /dev/shm (RAM that
    nothing frees until reboot; see `common.dist._unlink_shm_allreduce_buffer`)."""
    left = sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    for path in left:  # free the memory before failing, so one failure doesn't starve the rest of the suite
        path.unlink(missing_ok=True)
    assert not left, f"the run left shared memory behind: {[p.name for p in left]}"


def run_failing_stage(script: str, args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `script` as one plain python process, as a user would, expecting it to fail: returns the finished
    process (returncode, stdout, stderr as text) for the test to check what the user sees."""
    launcher_vars = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launcher_vars}
    env.update({"DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})
    cmd = [sys.executable, script, *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode != 0, f"{script} succeeded but was expected to fail:\n{proc.stdout[-3000:]}"
    return proc


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
