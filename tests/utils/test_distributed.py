"""The collectives the run uses: each rank's values combined as documented in a real 2-process gloo group, and
the same calls as plain identities in one process (callers never branch on being distributed)."""
from __future__ import annotations

import json
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from spinal_transfer.utils import distributed as D


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    assert D.init_distributed("cpu")
    try:
        result = {"world": D.world_size(), "rank": D.rank(), "main": D.is_main(),
                  "gathered": D.gather_objects({"rank": rank, "files": ["a"] * rank}),
                  "broadcast": D.broadcast_object(f"from {rank}"),
                  "sum": D.sum_over_ranks(torch.tensor([1.0, rank])).tolist(),
                  "any_1": D.any_rank(rank == 1), "any_none": D.any_rank(False)}
        D.barrier()
    finally:
        dist.destroy_process_group()
    with open(f"{out}.{rank}", "w") as f:
        json.dump(result, f)


def test_two_ranks_combine_as_documented(tmp_path):
    out = str(tmp_path / "rank")
    mp.start_processes(_rank_main, args=(_free_port(), out), nprocs=2, start_method="fork")
    results = [json.loads(open(f"{out}.{r}").read()) for r in (0, 1)]
    for r, res in enumerate(results):
        assert (res["world"], res["rank"], res["main"]) == (2, r, r == 0)
        assert res["gathered"] == [{"rank": 0, "files": []}, {"rank": 1, "files": ["a"]}]
        assert res["broadcast"] == "from 0" and res["sum"] == [2.0, 1.0]
        assert res["any_1"] is True and res["any_none"] is False


def test_one_process_is_the_identity(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("RANK", "0")
    assert not D.init_distributed("cpu") and D.world_size() == 1 and D.is_main()
    t = torch.tensor([1.0, 2.0])
    assert D.gather_objects({"x": 1}) == [{"x": 1}] and D.broadcast_object("o") == "o"
    assert D.sum_over_ranks(t) is t and D.any_rank(torch.tensor(True)) and not D.any_rank(False)
    monkeypatch.setenv("RANK", "1")                 # a torchrun worker before it joins the group
    assert not D.is_main()
