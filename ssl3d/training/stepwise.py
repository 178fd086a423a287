"""Per-iteration schedules and a progress bar for nnU-Net trainers (pretraining, classification).

nnU-Net steps its learning rate once per epoch; ssl3d's AdamW schedules (warm-up + cosine) are per iteration and
resumable from the global step. Mix in before ``nnUNetTrainer``; the trainer sets ``show_progress`` and has a
``lr_scheduler`` with ``step(global_step) -> lr``.
"""
from __future__ import annotations

from tqdm import tqdm


class StepwiseScheduleMixin:
    global_step: int = 0
    show_progress: bool = True
    _bar = None

    def on_train_epoch_start(self):
        self.network.train()
        self.global_step = self.current_epoch * self.num_iterations_per_epoch
        lr = self.lr_scheduler.step(self.global_step)
        self.print_to_log_file("")
        self.print_to_log_file(f"Epoch {self.current_epoch}")
        self.print_to_log_file(f"Current learning rate: {lr:.3g}")
        self.logger.log("lrs", lr, self.current_epoch)
        self._bar = tqdm(total=self.num_iterations_per_epoch, desc=f"epoch {self.current_epoch}", unit="it",
                         disable=not self.show_progress or self.local_rank != 0, leave=False)

    def advance_step(self, loss_value: float) -> None:
        """After an optimizer step: the global step, the learning rate for the next step, the bar."""
        self.global_step += 1
        self.lr_scheduler.step(self.global_step)
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{float(loss_value):.4f}")

    def close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
