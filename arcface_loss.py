"""Margin-based softmax losses for face recognition: ArcFace, CosFace and the combined margin.

Read top to bottom: the margin formulas (what each does to the target class's cosine), the
head that holds the class centres and turns embeddings into a loss, then the distributed
softmax that lets the centres be split over many GPUs (InsightFace's Partial FC).

For an embedding x and class centre W_j, cos(theta_j) = <x, W_j> / (|x| |W_j|). Every margin
changes only the logit of the row's own class y; all logits are then scaled by s:

    ArcFace   (arXiv 1801.07698)  s * cos(theta_y + m)
    CosFace   (arXiv 1801.09414)  s * (cos(theta_y) - m)
    combined  (InsightFace)       s * (cos(m1 * theta_y + m2) - m3)

ArcFace's cos(theta + m) stops decreasing in theta once theta + m > pi, so there the logit is
s * (cos(theta) - m * sin(m)) instead; with ``easy_margin`` the margin applies only where
cos(theta) > 0. The loss is the softmax cross-entropy of these logits (or the focal loss).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import clip_grads_with_norm_, get_total_norm

from utils import ToolkitError

# cos is clamped this far inside [-1, 1] before acos: d/dx acos(x) is infinite at +-1.
ACOS_EPS = 1e-6
NORM_EPS = 1e-12  # as torch.nn.functional.normalize
# sin^2 = 1 - cos^2 is floored here before sqrt: d/dx sqrt(x) is infinite at 0.
SIN2_MIN = 1e-12
LOG_MIN = 1e-30  # floor of (1 - p) in the focal factor, whose power may be negative
DEFAULT_CENTRE_STD = 0.01  # class centres start small and random (only their direction counts)
# The margins a head can learn with stop where the target's cosine at theta = 0 reaches 0
# (m = pi/2 for cos(theta + m), m = 1 for cos(theta) - m): config.py holds those bounds and
# checks them, with these names, so that reading a config does not import torch.
HEAD_NAMES = ("arcface", "cosface", "combined")


class HeadConfigError(ToolkitError, ValueError):
    """A margin head that cannot be built as asked (unknown name, impossible split)."""


# ----------------------------------------------------------------------------- the formulas

def arcface_target(cos: torch.Tensor, m: float, easy_margin: bool = False) -> torch.Tensor:
    """ArcFace's target cosine: cos(theta + m), by cos(theta)cos(m) - sin(theta)sin(m)."""
    sin = torch.sqrt((1.0 - cos * cos).clamp(min=SIN2_MIN))
    with_margin = cos * math.cos(m) - sin * math.sin(m)
    if easy_margin:
        return torch.where(cos > 0, with_margin, cos)
    # theta + m <= pi  <=>  cos(theta) >= cos(pi - m) = -cos(m)
    return torch.where(cos >= -math.cos(m), with_margin, cos - m * math.sin(m))


def cosface_target(cos: torch.Tensor, m: float) -> torch.Tensor:
    """CosFace's target cosine: cos(theta) - m."""
    return cos - m


def combined_target(cos: torch.Tensor, m1: float, m2: float, m3: float) -> torch.Tensor:
    """The combined margin's target cosine: cos(m1 * theta + m2) - m3 (m1=1, m3=0 is ArcFace
    without its theta + m > pi fallback; m1=1, m2=0 is CosFace with m=m3)."""
    theta = torch.acos(cos.clamp(-1.0 + ACOS_EPS, 1.0 - ACOS_EPS))
    return torch.cos(m1 * theta + m2) - m3


def margin_logits(cos: torch.Tensor, labels: torch.Tensor, s: float,
                  target: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``s * cos`` everywhere but each row's target column, which gets ``s * target(cos)``.
    ``labels`` hold each row's target column, or -1 when the row's class is not among the
    columns (another GPU's centres). Static shapes only (no boolean indexing), so it compiles
    and never waits for the device."""
    labels = labels.long()
    valid = (labels >= 0).unsqueeze(1)
    column = labels.clamp(min=0).unsqueeze(1)
    target_cos = cos.gather(1, column)
    target_cos = torch.where(valid, target(target_cos), target_cos)
    return (cos * s).scatter(1, column, target_cos * s)


def cosine_similarity_matrix(embeddings: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """cos(theta) (N, C) between the rows of ``embeddings`` (N, E) and ``centres`` (C, E)."""
    return F.linear(F.normalize(embeddings, eps=NORM_EPS), F.normalize(centres, eps=NORM_EPS))


# ----------------------------------------------------------------------------- margins

class ArcFaceMargin:
    """``(cos, labels) -> logits`` with ArcFace's margin. ``s`` and ``m`` are read at each
    call, so a training loop can ramp the margin (``margin.m = ...``)."""

    def __init__(self, s: float = 64.0, m: float = 0.5, easy_margin: bool = False) -> None:
        self.s, self.m, self.easy_margin = s, m, easy_margin

    def __call__(self, cos: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        m = float(self.m)
        return margin_logits(cos, labels, float(self.s),
                             lambda c: arcface_target(c, m, self.easy_margin))

    def __repr__(self) -> str:
        return f"ArcFaceMargin(s={self.s}, m={self.m}, easy_margin={self.easy_margin})"


class CosFaceMargin:
    """``(cos, labels) -> logits`` with CosFace's margin."""

    def __init__(self, s: float = 64.0, m: float = 0.35) -> None:
        self.s, self.m = s, m

    def __call__(self, cos: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        m = float(self.m)
        return margin_logits(cos, labels, float(self.s), lambda c: cosface_target(c, m))

    def __repr__(self) -> str:
        return f"CosFaceMargin(s={self.s}, m={self.m})"


class CombinedMargin:
    """``(cos, labels) -> logits`` with the combined margin (InsightFace's m1, m2, m3); the
    training loop's margin ramp drives the angular ``m2`` (train.set_ramped_margin)."""

    def __init__(self, s: float = 64.0, m1: float = 1.0, m2: float = 0.5,
                 m3: float = 0.0) -> None:
        self.s, self.m1, self.m2, self.m3 = s, m1, m2, m3

    def __call__(self, cos: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        m1, m2, m3 = float(self.m1), float(self.m2), float(self.m3)
        return margin_logits(cos, labels, float(self.s), lambda c: combined_target(c, m1, m2, m3))

    def __repr__(self) -> str:
        return f"CombinedMargin(s={self.s}, m1={self.m1}, m2={self.m2}, m3={self.m3})"


Margin = ArcFaceMargin | CosFaceMargin | CombinedMargin


def build_margin(name: str, s: float = 64.0, m: float = 0.5, m1: float = 1.0, m3: float = 0.0,
                 easy_margin: bool = False) -> Margin:
    """The margin called ``name``: arcface (s, m, easy_margin), cosface (s, m) or combined
    (s, m1, m2=m, m3)."""
    if name == "arcface":
        return ArcFaceMargin(s, m, easy_margin)
    if name == "cosface":
        return CosFaceMargin(s, m)
    if name == "combined":
        return CombinedMargin(s, m1, m, m3)
    raise HeadConfigError(f"unknown head {name!r}; choose from {', '.join(HEAD_NAMES)}")


# ----------------------------------------------------------------------------- the head

def _fp32(t: torch.Tensor) -> torch.Tensor:
    """Half and bfloat16 tensors to float32; float32 and float64 kept as they are."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _dist_info(group=None) -> tuple[int, int]:
    """(world size, rank) of ``group``, or (1, 0) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(group), dist.get_rank(group)
    return 1, 0


def shard_range(num_classes: int, world_size: int, rank: int) -> tuple[int, int]:
    """The contiguous class range [start, end) held by ``rank``: C // world classes each, the
    first C % world ranks one more."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside a world of {world_size}")
    base, extra = divmod(num_classes, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


class ShardedMarginSoftmax(nn.Module):
    """The margin softmax loss with its class centres: the head training uses, on one GPU or
    many. With one process it holds every centre; with several (model parallel, as
    InsightFace's Partial FC) rank r holds the contiguous classes ``shard_range(num_classes,
    world, r)`` as ``weight`` (C_r, E), so its state dict is its own shard.

    ``forward(embeddings, labels)`` takes this rank's (n, E) embeddings and (n,) global labels
    in [0, num_classes) (n equal on every rank), gathers both from all ranks, applies
    ``margin`` to the cosines against this rank's centres, and returns ``(loss, accuracy)``:
    the mean loss over the whole gathered batch (identical on every rank) and the fraction of
    it whose own centre is the nearest of ALL centres (the same meaning on one GPU, many, and
    with Partial FC), both 0-dim float32 tensors; ``accuracy=False`` skips the latter (None).
    Gradients reach this rank's embeddings and its centres exactly; ``embedding_grad_scale``
    multiplies the former (pass the world size when the backbone is wrapped in
    DistributedDataParallel, which averages its gradients over ranks although each rank
    already holds its full share of the loss's gradient).

    Partial FC: with ``sample_rate`` < 1 and in training mode, each step uses only
    ceil(sample_rate * C_r) centres of this rank, always including every class present in
    the gathered batch; the others get zero gradient. ``last_index`` holds the sampled local
    rows of the latest step (None when all were used). ``focal_gamma`` > 0 gives focal loss.
    """

    def __init__(self, margin: Margin, embedding_size: int, num_classes: int,
                 sample_rate: float = 1.0, focal_gamma: float = 0.0,
                 embedding_grad_scale: float = 1.0, group=None) -> None:
        super().__init__()
        if not 0.0 < sample_rate <= 1.0:
            raise HeadConfigError(f"sample_rate must be in (0, 1], got {sample_rate}")
        if focal_gamma < 0:
            raise HeadConfigError(f"focal_gamma must be >= 0, got {focal_gamma}")
        self.world_size, self.rank = _dist_info(group)
        if num_classes < self.world_size:
            raise HeadConfigError(f"{num_classes} classes cannot be split over "
                                  f"{self.world_size} ranks")
        self.margin, self.group = margin, group
        self.embedding_size, self.num_classes = embedding_size, num_classes
        self.sample_rate, self.focal_gamma = sample_rate, focal_gamma
        self.embedding_grad_scale = embedding_grad_scale
        self.start, self.end = shard_range(num_classes, self.world_size, self.rank)
        self.weight = nn.Parameter(torch.empty(self.end - self.start, embedding_size))
        nn.init.normal_(self.weight, std=DEFAULT_CENTRE_STD)
        self.last_index: torch.Tensor | None = None

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, accuracy: bool = True
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        embeddings, labels = self._gather(embeddings, labels.long())
        local = labels - self.start
        in_shard = (labels >= self.start) & (labels < self.end)
        # each row's column among this rank's centres (-1: its class is on another rank)
        shard_column = torch.where(in_shard, local, -1)
        if self.sample_rate < 1.0 and self.training:
            weight, columns = self._sample(local, in_shard, shard_column)
        else:
            self.last_index = None
            weight, columns = self.weight, shard_column
        with torch.autocast(embeddings.device.type, enabled=False):
            cos = cosine_similarity_matrix(_fp32(embeddings), _fp32(weight))
            logits = self.margin(cos, columns)
            loss = _ShardedSoftmaxLoss.apply(logits, columns, self.group,
                                             float(self.focal_gamma))
            batch_accuracy = None
            if accuracy:
                with torch.no_grad():
                    all_cos = cos if self.last_index is None else \
                        cosine_similarity_matrix(_fp32(embeddings), _fp32(self.weight))
                    batch_accuracy = self._accuracy(all_cos, shard_column)
        return loss, batch_accuracy

    def logits(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """This rank's margin logits (N, C_r) for ungathered embeddings and global labels,
        float32 even under autocast; with one process, the full (N, num_classes) logits."""
        local = labels.long() - self.start
        columns = torch.where((local >= 0) & (local < self.weight.shape[0]), local, -1)
        with torch.autocast(embeddings.device.type, enabled=False):
            return self.margin(cosine_similarity_matrix(_fp32(embeddings), _fp32(self.weight)),
                               columns)

    def _gather(self, embeddings: torch.Tensor, labels: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.world_size == 1:
            return embeddings, labels
        parts = [torch.empty_like(labels) for _ in range(self.world_size)]
        dist.all_gather(parts, labels.contiguous(), group=self.group)
        return (_AllGather.apply(embeddings, self.group, float(self.embedding_grad_scale)),
                torch.cat(parts))

    def _sample(self, local: torch.Tensor, in_shard: torch.Tensor, shard_column: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Partial FC: (sampled centres, labels as columns of them or -1); ``shard_column``: the
        columns among all centres, returned when every centre is kept."""
        num_local = self.weight.shape[0]
        positives = torch.unique(local[in_shard])  # sorted
        num_sample = max(math.ceil(self.sample_rate * num_local), positives.numel())
        if num_sample >= num_local:
            self.last_index = None
            return self.weight, shard_column
        # Random scores, positives above every negative: the top num_sample rows keep all
        # positives and fill up with a uniform sample of negatives.
        scores = torch.rand(num_local, device=self.weight.device)
        scores[positives] = 2.0
        index = scores.topk(num_sample).indices.sort().values
        self.last_index = index
        columns = torch.searchsorted(index, local.clamp(0, num_local - 1))
        return self.weight[index], torch.where(in_shard, columns, -1)

    def _accuracy(self, cos: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        best = _all_reduce(cos.max(dim=1).values, dist.ReduceOp.MAX, self.group)
        target = cos.gather(1, columns.clamp(min=0).unsqueeze(1)).squeeze(1)
        correct = ((columns >= 0) & (target >= best)).sum().to(cos.dtype)
        return _all_reduce(correct, dist.ReduceOp.SUM, self.group) / cos.shape[0]

    def extra_repr(self) -> str:
        return (f"classes [{self.start}, {self.end}) of {self.num_classes}, rank {self.rank}"
                f"/{self.world_size}, embedding_size={self.embedding_size}, "
                f"sample_rate={self.sample_rate}, margin={self.margin!r}")


def build_head(name: str, embedding_size: int, num_classes: int, s: float = 64.0,
               m: float = 0.5, m1: float = 1.0, m3: float = 0.0, easy_margin: bool = False,
               sample_rate: float = 1.0, focal_gamma: float = 0.0,
               embedding_grad_scale: float = 1.0, group=None) -> ShardedMarginSoftmax:
    """The training head: the margin ``name`` (arcface | cosface | combined; see
    :func:`build_margin`) over sharded class centres with its softmax loss."""
    return ShardedMarginSoftmax(build_margin(name, s, m, m1, m3, easy_margin), embedding_size,
                                num_classes, sample_rate=sample_rate, focal_gamma=focal_gamma,
                                embedding_grad_scale=embedding_grad_scale, group=group)


class MarginProduct(nn.Module):
    """The seed's single-GPU head API: class centres ``weight`` (out_features, in_features)
    and a margin; ``forward(x, label)`` gives (N, out_features) float32 margin logits for
    ``F.cross_entropy``. Training uses :class:`ShardedMarginSoftmax` (the same formulas)."""

    def __init__(self, in_features: int, out_features: int, margin: Margin) -> None:
        super().__init__()
        self.in_features, self.out_features, self.margin = in_features, out_features, margin
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.normal_(self.weight, std=DEFAULT_CENTRE_STD)

    def forward(self, x: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return self.margin(cosine_similarity_matrix(_fp32(x), _fp32(self.weight)), label)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, " \
               f"margin={self.margin!r}"


class ArcMarginProduct(MarginProduct):
    """ArcFace head: s*cos(theta + m) on the target logit."""

    def __init__(self, in_features: int, out_features: int, s: float = 64.0, m: float = 0.5,
                 easy_margin: bool = False) -> None:
        super().__init__(in_features, out_features, ArcFaceMargin(s, m, easy_margin))


class AddMarginProduct(MarginProduct):
    """CosFace head: s*(cos(theta) - m) on the target logit."""

    def __init__(self, in_features: int, out_features: int, s: float = 64.0,
                 m: float = 0.35) -> None:
        super().__init__(in_features, out_features, CosFaceMargin(s, m))


class CombinedMarginProduct(MarginProduct):
    """Combined-margin head: s*(cos(m1*theta + m2) - m3) on the target logit."""

    def __init__(self, in_features: int, out_features: int, s: float = 64.0, m1: float = 1.0,
                 m2: float = 0.5, m3: float = 0.0) -> None:
        super().__init__(in_features, out_features, CombinedMargin(s, m1, m2, m3))


# ------------------------------------------------------------------ the distributed softmax

def _focal_factor(logp: torch.Tensor, gamma: float) -> torch.Tensor:
    """d/d(log p) of the focal loss -(1 - p)^gamma * log p, negated: the factor by which the
    focal loss's gradient w.r.t. the logits differs from cross-entropy's."""
    p = logp.exp()
    one_minus = (1.0 - p).clamp(min=LOG_MIN)
    return one_minus.pow(gamma) - gamma * p * one_minus.pow(gamma - 1.0) * logp


class _AllGather(torch.autograd.Function):
    """Concatenate every rank's (n, ...) tensor (equal n on all ranks). Backward: each
    rank's loss reaches every rank's rows through its own shard of centres, so the gradients
    are summed over ranks and each rank keeps the rows of its own input."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group, grad_scale: float) -> torch.Tensor:
        world, rank = _dist_info(group)
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous(), group=group)
        ctx.group, ctx.rank, ctx.n, ctx.grad_scale = group, rank, x.shape[0], grad_scale
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        rows = grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]  # this rank's input rows
        return (rows * ctx.grad_scale if ctx.grad_scale != 1.0 else rows), None, None


def _all_reduce(t: torch.Tensor, op, group) -> torch.Tensor:
    if _dist_info(group)[0] > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


class _ShardedSoftmaxLoss(torch.autograd.Function):
    """Mean (focal) softmax cross-entropy over logits split by columns across ranks.

    ``labels`` hold each row's target column on this rank, or -1 when another rank holds it.
    Forward all-reduces the row maxima (MAX) and the sums of exponentials together with the
    target logits (SUM); the result is the same on every rank. Backward gives this rank's
    columns their exact gradient c * (softmax - onehot) / N (c = 1 for cross-entropy)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, group,
                gamma: float) -> torch.Tensor:
        valid = labels >= 0
        column = labels.clamp(min=0).unsqueeze(1)
        row_max = _all_reduce(logits.max(dim=1).values, dist.ReduceOp.MAX, group)
        exp = (logits - row_max.unsqueeze(1)).exp_()
        target = torch.where(valid, logits.gather(1, column).squeeze(1) - row_max, 0.0)
        stats = _all_reduce(torch.stack([exp.sum(dim=1), target], dim=1), dist.ReduceOp.SUM,
                            group)
        total, target = stats.unbind(1)
        logp = target - total.log()  # log softmax probability of each row's target
        softmax = exp.div_(total.unsqueeze(1))  # reuses exp's memory: C/world columns is big
        if gamma > 0:
            loss = (1.0 - logp.exp()).pow(gamma) * -logp
            factor = _focal_factor(logp, gamma)
        else:
            loss, factor = -logp, None
        ctx.save_for_backward(softmax, labels, factor)
        ctx.used = False
        return loss.mean()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        if ctx.used:  # the saved softmax is turned into the gradient in place
            raise RuntimeError("the sharded softmax loss supports one backward pass only")
        ctx.used = True
        softmax, labels, factor = ctx.saved_tensors
        grad = softmax
        valid = (labels >= 0).unsqueeze(1).to(grad.dtype)
        grad.scatter_add_(1, labels.clamp(min=0).unsqueeze(1), -valid)
        if factor is not None:
            grad.mul_(factor.unsqueeze(1))
        grad.mul_(grad_out / grad.shape[0])
        return grad, None, None, None


def clip_grad_norm_sharded(replicated, sharded, max_norm: float, group=None,
                           all_reduce_sum_=None) -> torch.Tensor:
    """Clip all gradients to one global L2 norm ``max_norm`` (inf: only measure it) and return
    that norm before clipping, without a host sync. ``replicated`` gradients are equal on
    every rank (a DDP backbone after its all-reduce); ``sharded`` ones (a head's shard of
    centres) differ, so their squared norm is summed over ranks: with ``all_reduce_sum_``
    when given, else an all-reduce over ``group``. Multi-tensor kernels, not one per tensor."""
    rep = [p for p in replicated if p.grad is not None]
    shard = [p for p in sharded if p.grad is not None]
    if not rep and not shard:
        return torch.tensor(0.0)
    zero = torch.zeros((), device=(rep or shard)[0].grad.device)

    def squared_norm(params: list[nn.Parameter]) -> torch.Tensor:
        return get_total_norm([p.grad for p in params]).float() ** 2 if params else zero

    shard_sq = squared_norm(shard).clone()  # reduced in place
    shard_sq = all_reduce_sum_(shard_sq) if all_reduce_sum_ is not None \
        else _all_reduce(shard_sq, dist.ReduceOp.SUM, group)
    norm = (squared_norm(rep) + shard_sq).sqrt()
    if math.isfinite(max_norm):
        clip_grads_with_norm_(rep + shard, max_norm, norm)  # takes the parameters
    return norm
