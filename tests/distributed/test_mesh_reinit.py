"""A mesh built before the default process group was destroyed and initialised again is not reused.

Group names restart from "0" after ``destroy_process_group``, so a mesh cached by name handed the new
group the old subgroups' names, which no longer resolve. Four real gloo ranks (USP 2x2) build a mesh,
re-initialise, build it again and all-reduce over their Ulysses subgroup.
"""

from __future__ import annotations

import os
import subprocess
import sys

from tests.distributed.harness import ROOT, _free_port

WORLD = 4


def _rank_main() -> None:
    import torch
    import torch.distributed as dist
    import torch.distributed._functional_collectives as fc

    from cachedit.config import CacheditConfig
    from cachedit.runtime import parallel

    rank, config = int(os.environ["RANK"]), CacheditConfig(ulysses=2, ring=2)
    dist.init_process_group("gloo")
    first = parallel.context_parallel_mesh(config)
    dist.destroy_process_group()
    # A second rendezvous on a fresh port: gloo's subgroups would find the first store's stale addresses.
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{os.environ['SECOND_PORT']}", rank=rank,
                            world_size=WORLD)
    second = parallel.context_parallel_mesh(config)
    total = fc.wait_tensor(fc.all_reduce(torch.tensor([rank + 1.0]), "sum", second.ulysses_group))
    print(f"rank {rank}: reused {first is second}, ulysses sum {total.item():g}", flush=True)
    dist.destroy_process_group()


def test_mesh_is_rebuilt_after_the_default_group_is_reinitialised():
    port, second = _free_port(), _free_port()
    procs = []
    for rank in range(WORLD):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   SECOND_PORT=str(second), OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
        procs.append(subprocess.Popen([sys.executable, __file__], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=180)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for rank, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"rank {rank} exited with {p.returncode}:\n{out[-3000:]}"
        # Ulysses groups are ranks {0, 1} and {2, 3}: sums of rank + 1 are 3 and 7.
        assert f"rank {rank}: reused False, ulysses sum {3 if rank < 2 else 7}" in out, out[-3000:]


if __name__ == "__main__":
    _rank_main()
