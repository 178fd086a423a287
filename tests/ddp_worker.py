"""Run under torchrun (gloo, CPU): short pretraining, then compare parameters across ranks (rank 0 writes JSON)."""
import json
import sys

import torch
import torch.distributed as dist

from ssl3d.cli.pretrain import build_parser, make_trainer


def flat_params(trainer) -> torch.Tensor:
    """Every parameter and floating buffer (EMA teachers, DINO centers, mask tokens included)."""
    state = trainer.ssl_method.state_dict()
    return torch.cat([v.detach().float().flatten().clone() for v in state.values() if v.is_floating_point()])


if __name__ == "__main__":
    out_file = sys.argv[1]
    trainer = make_trainer(build_parser().parse_args(sys.argv[2:]))
    assert dist.is_initialized(), "ssl_pretrain must initialise the process group under torchrun"
    trainer.initialize()
    start = flat_params(trainer)
    trainer.run_training()
    end = flat_params(trainer)
    gathered = [torch.zeros_like(end) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, end)
    if dist.get_rank() == 0:
        json.dump({"max_diff": max(float((g - gathered[0]).abs().max()) for g in gathered),
                   "moved": float((end - start).abs().max()), "world": dist.get_world_size(),
                   "batch_per_rank": trainer.batch_size}, open(out_file, "w"))
    dist.barrier()
    dist.destroy_process_group()
