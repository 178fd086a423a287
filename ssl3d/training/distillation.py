"""Shared parts of the teacher-student methods (SMIT, MiM's BYOL variant, MedContext, the contrastive family).

- :func:`frozen_copy` / :func:`ema_update` / :func:`ema_momentum`: an EMA teacher that follows the student
  after every optimizer step with a cosine momentum over the *global* step (the public SMIT/MedContext code
  indexed it by the step within the epoch). The student is identical on every rank after DDP's all-reduce,
  so the teacher is too, without communication.
- :class:`ProjectionHead`: DINO/iBOT head (MLP -> L2-normalized bottleneck -> weight-normalized prototypes).
- :class:`Centering`: the teacher's output center, averaged over all ranks before the EMA so every rank
  keeps the same center.
- :func:`distillation_cross_entropy`, :func:`teacher_temperature`: DINO's sharpened/centered targets.
- :func:`embedding_std`, :func:`mean_entropy`, :func:`alignment_uniformity`: collapse diagnostics (all
  embeddings equal -> std 0; a collapsed teacher -> entropy 0 or log K; uniformity -> 0 when collapsed).
- :func:`gather_with_grad` / :func:`gather_no_grad`: batches of every rank, for losses whose negatives must
  span the global batch (the gradient flows back to the rank that produced each row).
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import distributed as dist
from torch import nn


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Rows of every rank, concatenated in rank order, differentiable (all ranks must pass equal shapes)."""
    if _world() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), 0)


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Rows of every rank, concatenated in rank order, without gradient (queues, targets)."""
    if _world() == 1:
        return x.detach()
    out = [torch.empty_like(x) for _ in range(_world())]
    dist.all_gather(out, x.detach().contiguous())
    return torch.cat(out, 0)


def rank_offset(local_rows: int) -> int:
    """Index of this rank's first row in a gathered batch."""
    return dist.get_rank() * local_rows if _world() > 1 else 0


def ema_momentum(step: int, total_steps: int, base: float = 0.996) -> float:
    """Cosine schedule from ``base`` at step 0 to 1 at ``total_steps`` (clamped beyond)."""
    t = min(max(step, 0), total_steps) / max(1, total_steps)
    return 1.0 - (1.0 - base) * (math.cos(math.pi * t) + 1.0) / 2.0


def frozen_copy(module: nn.Module) -> nn.Module:
    """A teacher: a deep copy without gradients (its state is saved with the student's)."""
    teacher = copy.deepcopy(module)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher ← m·teacher + (1 − m)·student for parameters; buffers (norm statistics) are copied."""
    t_params, s_params = list(teacher.parameters()), list(student.parameters())
    if len(t_params) != len(s_params):
        raise ValueError("teacher and student have different parameter lists")
    torch._foreach_mul_(t_params, momentum)
    torch._foreach_add_(t_params, [s.detach() for s in s_params], alpha=1.0 - momentum)
    for t, s in zip(teacher.buffers(), student.buffers()):
        t.copy_(s)


def teacher_temperature(step: int, total_steps: int, start: float = 0.04, end: float = 0.07,
                        warmup_fraction: float = 0.3) -> float:
    """Linear warm-up of the teacher temperature from ``start`` to ``end`` over the first part of training."""
    warm = max(1, int(round(warmup_fraction * total_steps)))
    return end if step >= warm else start + (end - start) * step / warm


def projection_mlp(in_dim: int, hidden_dim: int, out_dim: int, layers: int = 2) -> nn.Sequential:
    """Projection/prediction MLP: Linear-LayerNorm-GELU blocks, then a plain Linear (SimCLR/BYOL/MiM heads).

    LayerNorm instead of BatchNorm: per-sample, so batch composition and DDP rank do not change the output.
    """
    dims = [in_dim] + [hidden_dim] * (layers - 1)
    blocks: list[nn.Module] = []
    for a, b in zip(dims[:-1], dims[1:]):
        blocks += [nn.Linear(a, b), nn.LayerNorm(b), nn.GELU()]
    return nn.Sequential(*blocks, nn.Linear(dims[-1], out_dim))


class ProjectionHead(nn.Module):
    """MLP (``layers`` linear layers, GELU) -> bottleneck, L2-normalized -> prototypes with unit-norm rows.

    The prototype layer's weight is normalized on every forward (DINO's weight norm with the gain fixed at 1),
    which keeps the logits bounded and is what makes the large prototype layer trainable.
    """

    def __init__(self, in_dim: int, out_dim: int = 8192, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 layers: int = 3):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (layers - 1) + [bottleneck_dim]
        mlp: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            mlp.append(nn.Linear(a, b))
            if i < len(dims) - 2:
                mlp.append(nn.GELU())
        self.mlp = nn.Sequential(*mlp)
        self.prototypes = nn.Parameter(torch.empty(out_dim, bottleneck_dim))
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.prototypes, std=0.02)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """L2-normalized bottleneck embedding (what the collapse guard watches)."""
        return F.normalize(self.mlp(x), dim=-1)

    def logits(self, embedding: torch.Tensor) -> torch.Tensor:
        """Prototype logits of an embedding from :meth:`embed` (so a caller that needs both runs the MLP once)."""
        return F.linear(embedding, F.normalize(self.prototypes, dim=-1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(self.embed(x))


class Centering(nn.Module):
    """Running center of the teacher's logits (DINO), identical on every rank."""

    def __init__(self, dim: int, momentum: float = 0.9):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("center", torch.zeros(dim))

    @torch.no_grad()
    def update(self, teacher_logits: torch.Tensor) -> None:
        flat = teacher_logits.detach().float().reshape(-1, teacher_logits.shape[-1])
        total = torch.cat([flat.sum(0), flat.new_tensor([flat.shape[0]])])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(total)  # the mean over the global batch, so every rank keeps the same center
        mean = total[:-1] / total[-1].clamp(min=1)
        self.center.mul_(self.momentum).add_(mean.to(self.center.dtype), alpha=1.0 - self.momentum)


def distillation_cross_entropy(student_logits: torch.Tensor, teacher_logits: torch.Tensor, center: torch.Tensor,
                               teacher_temp: float, student_temp: float = 0.1,
                               weight: torch.Tensor | None = None) -> torch.Tensor:
    """H(softmax((t − c)/τt), softmax(s/τs)) per row, averaged (optionally weighted, e.g. masked tokens only)."""
    targets = F.softmax((teacher_logits.detach().float() - center) / teacher_temp, dim=-1)
    ce = -(targets * F.log_softmax(student_logits.float() / student_temp, dim=-1)).sum(-1)
    if weight is None:
        return ce.mean()
    weight = weight.to(ce.dtype)
    return (ce * weight).sum() / weight.sum().clamp(min=1.0)


@torch.no_grad()
def embedding_std(embeddings: torch.Tensor) -> float:
    """Mean per-dimension std of L2-normalized embeddings over the batch: ≈ 1/√dim when spread, 0 when collapsed."""
    flat = F.normalize(embeddings.detach().float().reshape(-1, embeddings.shape[-1]), dim=-1)
    return float(flat.std(0).mean()) if flat.shape[0] > 1 else float("nan")


@torch.no_grad()
def mean_entropy(logits: torch.Tensor, temperature: float = 1.0) -> float:
    """Mean entropy (nats) of softmax(logits / T) rows."""
    logp = F.log_softmax(logits.detach().float() / temperature, dim=-1)
    return float(-(logp.exp() * logp).sum(-1).mean())


@torch.no_grad()
def alignment_uniformity(z1: torch.Tensor, z2: torch.Tensor) -> tuple[float, float]:
    """Wang & Isola's diagnostics on L2-normalized pairs: alignment E‖z1 − z2‖² (0 = views agree) and uniformity
    log E exp(−2‖zi − zj‖²) over all pairs (≈ −4 when spread on the sphere, 0 when collapsed)."""
    a, b = F.normalize(z1.detach().float(), dim=-1), F.normalize(z2.detach().float(), dim=-1)
    align = float((a - b).pow(2).sum(-1).mean())
    z = torch.cat([a, b])
    d2 = torch.cdist(z, z).pow(2)
    off = ~torch.eye(z.shape[0], dtype=torch.bool, device=z.device)
    uniform = float(torch.log(torch.exp(-2 * d2[off]).mean())) if z.shape[0] > 1 else float("nan")
    return align, uniform
