"""Constructor fixes every ssl3d trainer needs on top of ``nnUNetTrainer.__init__`` (nnU-Net 2.8.1)."""
from __future__ import annotations

import torch


class TrainerInitMixin:
    """Mix in before ``nnUNetTrainer``.

    * nnU-Net's ``run_training`` puts ``continue_training`` into the plans and the trainer pops it; ssl3d's own
      CLIs construct trainers directly, so a missing key means a fresh run.
    * Under DDP nnU-Net moves the trainer to ``cuda:<local_rank>`` (NCCL); with gloo on CPU it stays on the CPU
      and runs without a gradient scaler.
    """

    def __init__(self, plans: dict, configuration: str, fold, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        plans = dict(plans)
        plans.setdefault("continue_training", False)
        super().__init__(plans, configuration, fold, dataset_json, device)  # type: ignore[call-arg]
        if self.is_ddp and device.type == "cpu":
            self.device = device
            self.grad_scaler = None
