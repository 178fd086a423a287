"""Constructor fixes every ssl3d trainer needs on top of ``nnUNetTrainer.__init__`` (nnU-Net 2.8.1)."""
from __future__ import annotations

import torch
from torch import nn

from ssl3d.utils import unwrap_network


class TrainerInitMixin:
    """Mix in before ``nnUNetTrainer``.

    * nnU-Net's ``run_training`` puts ``continue_training`` into the plans and the trainer pops it; ssl3d's own
      CLIs construct trainers directly, so a missing key means a fresh run.
    * Under DDP nnU-Net moves the trainer to ``cuda:<local_rank>`` (NCCL); with gloo on CPU it stays on the CPU
      and runs without a gradient scaler.
    * Networks without deep supervision (dna's ``Primus``: one output, no ``deep_supervision`` argument, no
      ``decoder``): nnU-Net's builder would pass the argument and its switch would set ``decoder.deep_supervision``;
      both are skipped for such classes (trainers that build their own networks override these again).
    * ``channels_last`` (set by the subclass): on CPU the network's weights are stored in ``channels_last_3d``, the
      layout oneDNN runs 3-D convolutions fastest in (same values, same function; benchmarks/finetune_profile.py).
    """

    channels_last = False

    def __init__(self, plans: dict, configuration: str, fold, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        plans = dict(plans)
        plans.setdefault("continue_training", False)
        super().__init__(plans, configuration, fold, dataset_json, device)  # type: ignore[call-arg]
        if self.is_ddp and device.type == "cpu":
            self.device = device
            self.grad_scaler = None

    def _set_memory_format(self, module: nn.Module | None = None) -> None:
        """Channels-last weights for ``module`` (default: the plain network) when ``channels_last`` is set and the
        trainer runs on the CPU; in place, so an optimizer that already holds the parameters keeps them."""
        if self.channels_last and self.device.type == "cpu":
            (module or unwrap_network(self.network)).to(memory_format=torch.channels_last_3d)
            self.print_to_log_file("network weights: channels_last_3d")  # type: ignore[attr-defined]

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> nn.Module:
        from ssl3d.architectures.from_plans import build_network_from_plans

        arch = {"network_class_name": configuration_manager.network_arch_class_name,
                "arch_kwargs": configuration_manager.network_arch_init_kwargs,
                "_kw_requires_import": configuration_manager.network_arch_init_kwargs_req_import}
        return build_network_from_plans(arch, num_input_channels, num_output_channels, enable_deep_supervision)

    def set_deep_supervision_enabled(self, enabled: bool):
        if hasattr(getattr(unwrap_network(self.network), "decoder", None), "deep_supervision"):
            super().set_deep_supervision_enabled(enabled)  # type: ignore[misc]
