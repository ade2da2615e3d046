"""Process-group helpers that also work in a single process with no launcher.

`init_distributed()` is the only entry point the stage scripts call: under the `deepspeed` launcher it
joins the group the launcher describes; under plain `python` it supplies single-process defaults
(rank 0 of 1 on a free local port) so the same script runs either way.

DeepSpeed JIT-builds its C++ ops (on CPU: the shared-memory all-reduce, at every process group's start) into
torch's extensions directory. By default that is one directory per user, shared by every environment on
the machine, so an environment with other compiler flags rebuilds the op over another's. Inside a virtual
environment we keep the builds in `<venv>/torch_extensions`; `python -m common.dist --prebuild-ops`
(run by scripts/setup.sh) builds the CPU op there once, so no stage pays the 35-60 s compile.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def use_environment_extensions_dir() -> str | None:
    """Point torch's (and so DeepSpeed's) JIT extension builds at `<venv>/torch_extensions` when running in a
    virtual environment and the user has not chosen a directory (TORCH_EXTENSIONS_DIR). Returns the dir."""
    if "TORCH_EXTENSIONS_DIR" not in os.environ and sys.prefix != sys.base_prefix:
        os.environ["TORCH_EXTENSIONS_DIR"] = str(Path(sys.prefix) / "torch_extensions")
    return os.environ.get("TORCH_EXTENSIONS_DIR")


def prebuild_cpu_ops() -> str:
    """Build DeepSpeed's CPU shared-memory all-reduce op (loaded by every CPU process group) into the
    environment's extensions directory, so that runs find it built. Nothing to do with CUDA (NCCL is used)."""
    where = use_environment_extensions_dir() or "torch's default extensions directory"
    if torch.cuda.is_available():
        return "CUDA present: DeepSpeed uses NCCL, no CPU op to build"
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None:
        return f"no shared-memory op on the {get_accelerator().device_name()} accelerator"
    builder.load(verbose=False)
    return f"DeepSpeed {builder.absolute_name()} built in {where}"


def init_distributed() -> None:
    """Initialise torch.distributed through DeepSpeed, with single-process defaults when unlaunched."""
    use_environment_extensions_dir()
    import deepspeed

    if dist.is_available() and dist.is_initialized():
        return
    if "RANK" not in os.environ:  # plain `python script.py`: one process, no launcher
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        os.environ["RANK"] = "0"
        os.environ["LOCAL_RANK"] = "0"
        os.environ["WORLD_SIZE"] = "1"
        os.environ.setdefault("LOCAL_WORLD_SIZE", "1")
    deepspeed.init_distributed()
    _unlink_shm_allreduce_buffer()


def shm_allreduce_buffer_path(rank: int) -> Path:
    """Where DeepSpeed's CPU shared-memory all-reduce keeps `rank`'s buffer for this job (csrc/cpu/comm/shm.cpp)."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def _unlink_shm_allreduce_buffer() -> None:
    """Remove this rank's shared-memory all-reduce buffer name once every rank has mapped every buffer.

    On CPU, when all ranks are on one machine, DeepSpeed creates a 66 MB buffer per rank in /dev/shm and
    never unlinks it, even at a clean exit, so each run leaves ~66 MB x ranks of RAM behind until reboot
    (a test suite filled 22 GB of a 24 GB machine this way and was OOM-killed). Every rank opens every
    other rank's buffer inside init, so after a barrier the names can go: the mappings stay valid and
    the memory is freed when the last process exits, even by SIGKILL."""
    from deepspeed.accelerator import get_accelerator

    path = shm_allreduce_buffer_path(get_rank())
    if get_accelerator().device_name() != "cpu" or not path.exists():  # GPUs, several nodes, one process
        return
    dist.barrier()
    path.unlink(missing_ok=True)


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def get_local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_rank0() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def print_rank0(*args, **kwargs) -> None:
    if is_rank0():
        print(*args, **kwargs, flush=True)


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of `x` over all ranks (returns `x` unchanged in a single process)."""
    if not is_initialized() or get_world_size() == 1:
        return x
    y = x.detach().clone()
    dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return y / get_world_size()


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (picklable objects; collective when there are several ranks)."""
    if get_world_size() == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def destroy() -> None:
    if is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Environment helpers for DeepSpeed.")
    parser.add_argument(
        "--prebuild-ops", action="store_true", help="build DeepSpeed's CPU ops now (setup does)"
    )
    if parser.parse_args().prebuild_ops:
        print(f"[setup] {prebuild_cpu_ops()}")
