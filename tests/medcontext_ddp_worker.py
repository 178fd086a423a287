"""Run under torchrun (gloo, CPU): a short MedContext training per rank, then compare student, teacher and mask
token across ranks, check the checkpoint and a reload (rank 0 writes the results as JSON).

Usage: medcontext_ddp_worker.py OUT_JSON DATASET_NAME (nnUNet_preprocessed / nnUNet_results from the environment).
"""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().float().flatten().clone() for t in tensors])


def max_diff_across_ranks(t: torch.Tensor) -> float:
    gathered = [torch.zeros_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, t)
    return max(float((g - gathered[0]).abs().max()) for g in gathered)


def all_ranks(ok: bool) -> bool:
    flag = torch.tensor([1 if ok else 0])
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


if __name__ == "__main__":
    out_file, dataset = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    from batchgenerators.utilities.file_and_folder_operations import load_json

    from nnunetv2.paths import nnUNet_preprocessed
    from ssl3d.training.finetuning.medcontext import MedContextTrainer

    pre = Path(nnUNet_preprocessed) / dataset
    plans = load_json(str(pre / "nnUNetPlans.json"))
    plans["continue_training"] = False  # what nnU-Net's run_training adds before constructing a trainer
    trainer = MedContextTrainer(plans, "3d_fullres", 0, load_json(str(pre / "dataset.json")), torch.device("cpu"))
    assert trainer.is_ddp and trainer.device.type == "cpu" and trainer.grad_scaler is None
    trainer.initialize()
    student_start = flat(trainer._network_module().parameters())
    token_start = trainer.mask_token.detach().clone()
    trainer.run_training()  # 1 epoch of 3 iterations (plans), checkpoint_final written by rank 0

    student = flat(trainer._network_module().parameters())
    teacher = flat(trainer.teacher.parameters())
    token = trainer.mask_token.detach().clone()
    res = {"world": dist.get_world_size(), "batch_per_rank": trainer.batch_size,
           "global_step": trainer.global_step, "tube_axis": trainer.opts.tube_axis, "cell": list(trainer.opts.cell),
           "student_diff": max_diff_across_ranks(student), "teacher_diff": max_diff_across_ranks(teacher),
           "token_diff": max_diff_across_ranks(token),
           "student_moved": float((student - student_start).abs().max()),
           "token_moved": float((token - token_start).abs().max()),
           "teacher_lags_student": float((teacher - student).abs().max())}

    dist.barrier()  # rank 0 has written checkpoint_final.pth
    final = Path(trainer.output_folder) / "checkpoint_final.pth"
    ckpt = torch.load(final, map_location="cpu", weights_only=False)
    res["token_in_network_weights"] = any("mask_token" in k for k in ckpt["network_weights"])
    plain = trainer.build_network_architecture(trainer.plans_manager, trainer.configuration_manager,
                                               trainer.num_input_channels,
                                               trainer.label_manager.num_segmentation_heads, False)
    plain.load_state_dict(ckpt["network_weights"])  # strict, like nnU-Net's predictor
    res["checkpoint_weights_equal"] = bool(torch.equal(flat(plain.parameters()), student))
    extras = ckpt["ssl3d"]["medcontext"]
    res["checkpoint_token_equal"] = bool(torch.equal(extras["mask_token"], token))
    res["checkpoint_teacher_equal"] = bool(torch.equal(flat(extras["teacher"].values()),
                                                       flat(trainer.teacher.state_dict().values())))

    # resume path: clobber the token and the teacher, load the checkpoint, get them back
    with torch.no_grad():
        trainer.mask_token.zero_()
        for p in trainer.teacher.parameters():
            p.add_(1.0)
    trainer.load_checkpoint(str(final))
    restored = torch.equal(trainer.mask_token.detach(), token) and torch.equal(flat(trainer.teacher.parameters()),
                                                                                teacher)
    res["reload_restores_token_and_teacher"] = all_ranks(restored)
    if dist.get_rank() == 0:
        Path(out_file).write_text(json.dumps(res))
    dist.barrier()
    dist.destroy_process_group()
