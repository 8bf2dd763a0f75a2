"""InfoNCE negatives are gathered over data-parallel ranks (two real gloo processes)."""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from jin_orchestrate.model import _gather
from jin_zjepa import info_nce


def _worker(rank: int, world: int, init: str, z_a: torch.Tensor, z_b: torch.Tensor, out) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        half = z_a.shape[0] // world
        local_a = z_a[rank * half : (rank + 1) * half].clone().requires_grad_(True)
        local_b = z_b[rank * half : (rank + 1) * half]
        present = _gather(torch.ones(half, dtype=torch.bool))
        loss, _ = info_nce(_gather(local_a), _gather(local_b), 10.0, present)
        loss.backward()
        out[rank] = (loss.detach(), local_a.grad.clone(), present.all())
    finally:
        dist.destroy_process_group()


def test_gathered_infonce_equals_the_global_batch_loss(tmp_path):
    g = torch.Generator().manual_seed(0)
    z_a = torch.nn.functional.normalize(torch.randn(8, 16, generator=g), dim=-1)
    z_b = torch.nn.functional.normalize(torch.randn(8, 16, generator=g), dim=-1)
    full_a = z_a.clone().requires_grad_(True)
    expected, _ = info_nce(full_a, z_b, 10.0)
    expected.backward()

    out = mp.Manager().dict()
    mp.spawn(_worker, args=(2, f"file://{tmp_path / 'rdzv'}", z_a, z_b, out), nprocs=2)
    for rank in range(2):
        loss, grad, all_present = out[rank]
        torch.testing.assert_close(loss, expected.detach())
        assert all_present
        # Each rank holds the same global loss; the all-gather's backward sums both ranks'
        # contributions, which DDP's gradient averaging then divides back: 2x here.
        torch.testing.assert_close(grad / 2, full_a.grad[rank * 4 : (rank + 1) * 4])


class _Streams:
    def __init__(self, rank: int) -> None:
        self.rank = rank

    def rng_states(self) -> dict[str, torch.Tensor]:
        return {"mask_generator": torch.full((4,), self.rank, dtype=torch.uint8)}


def _peer_worker(rank: int, world: int, init: str, out) -> None:
    from jin_orchestrate.train import _peer_rng_states

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        out[rank] = _peer_rng_states(_Streams(rank), world)
    finally:
        dist.destroy_process_group()


def test_every_rank_gets_every_ranks_random_streams_for_the_checkpoint(tmp_path):
    out = mp.Manager().dict()
    mp.spawn(_peer_worker, args=(2, f"file://{tmp_path / 'rdzv'}", out), nprocs=2)
    for rank in range(2):
        states = out[rank]
        assert sorted(states) == [0, 1]
        for peer in range(2):
            assert states[peer]["mask_generator"].tolist() == [peer] * 4
