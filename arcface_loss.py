"""Margin-based softmax heads for face recognition: ArcFace, CosFace, the combined margin,
a focal/cross-entropy criterion, and a head sharded across ranks (with Partial FC).

The margin maths is kept apart from the class centres, so the single-device heads and the
sharded head share it: a *margin* maps ``(cos, labels)`` to logits, where ``cos`` (N, C) holds
the cosines between L2-normalised embeddings and centres and ``labels`` (N,) the column of each
row's target, or -1 when the row's target is not among the columns (another rank's shard).

Every head has mutable ``.s`` and ``.m`` attributes read at forward time, so a training loop
can ramp the margin (``head.m = ...``); ``m`` is ArcFace's angle, CosFace's cosine margin or
the combined margin's m2.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import clip_grads_with_norm_, get_total_norm

# cos is clamped this far inside [-1, 1] before acos: d/dx acos(x) is infinite at +-1.
ACOS_EPS = 1e-6
NORM_EPS = 1e-12  # as torch.nn.functional.normalize
# sin^2 = 1 - cos^2 is floored here before sqrt: d/dx sqrt(x) is infinite at 0.
SIN2_MIN = 1e-12
LOG_MIN = 1e-30  # floor of (1 - p) in the focal factor, whose power may be negative
DEFAULT_CENTRE_STD = 0.01  # class centres start small and random (only their direction counts)
HEAD_NAMES = ("arcface", "cosface", "combined")


def _fp32(t: torch.Tensor) -> torch.Tensor:
    """Half and bfloat16 tensors to float32; float32 and float64 kept as they are."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


class _ScaledColumnsProduct(torch.autograd.Function):
    """cos = (x_n @ W.T) * inv, inv_j = 1 / max(|W_j|, NORM_EPS), with a hand-written
    backward that builds W's gradient in one buffer:

        grad_W_j = inv_j * sum_i G_ij x_n_i - W_j * inv_j^2 * sum_i G_ij cos_ij

    (the second term is zero where the norm is clamped). Autograd would create the two terms
    as separate (C, E) tensors and add them: for 85k x 512 centres that is two extra passes
    over 175 MB per step."""

    @staticmethod
    def forward(ctx, x_n: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        norm = torch.linalg.vector_norm(w, dim=1)
        inv = norm.clamp_min(NORM_EPS).reciprocal()
        cos = F.linear(x_n, w) * inv
        ctx.save_for_backward(x_n, w, inv, cos, norm > NORM_EPS)
        return cos

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x_n, w, inv, cos, unclamped = ctx.saved_tensors
        grad_scaled = grad * inv
        grad_x = grad_scaled @ w if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            radial = (grad * cos).sum(dim=0) * inv * inv * unclamped
            grad_w = grad_scaled.T @ x_n
            grad_w.addcmul_(w, radial.unsqueeze(1), value=-1.0)
        return grad_x, grad_w


def cosine_similarity_matrix(embeddings: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """cos(theta) (N, C) between rows of ``embeddings`` (N, E) and ``centres`` (C, E).

    Equal to ``linear(normalize(x), normalize(W))``, but the centres' norms scale the
    product's columns instead of building a normalised copy of W, and the backward writes
    W's gradient in one pass: for a large head (85k x 512) W is read and written far fewer
    times (see bench/train_throughput.py)."""
    return _ScaledColumnsProduct.apply(F.normalize(embeddings, eps=NORM_EPS), centres)


def _with_target(cos: torch.Tensor, labels: torch.Tensor, s: float, target_fn) -> torch.Tensor:
    """``s * cos`` everywhere except each valid row's target column, which gets
    ``s * target_fn(cos_target)``. Static shapes only (no boolean indexing), so it compiles
    and never synchronises with the device."""
    labels = labels.long()
    valid = (labels >= 0).unsqueeze(1)
    column = labels.clamp(min=0).unsqueeze(1)
    target_cos = cos.gather(1, column)
    target = torch.where(valid, target_fn(target_cos), target_cos)
    return (cos * s).scatter(1, column, target * s)


# ----------------------------------------------------------------------------- margins

class ArcFaceMargin:
    """ArcFace: the target logit becomes s*cos(theta + m) while theta + m <= pi, and
    s*(cos(theta) - m*sin(m)) beyond, which keeps it decreasing in theta; with
    ``easy_margin`` the margin applies only where cos(theta) > 0."""

    def __init__(self, s: float = 64.0, m: float = 0.5, easy_margin: bool = False) -> None:
        self.s, self.m, self.easy_margin = s, m, easy_margin

    def _target(self, cos: torch.Tensor) -> torch.Tensor:
        m = float(self.m)  # read now: a training loop may be ramping it
        sin = torch.sqrt((1.0 - cos * cos).clamp(min=SIN2_MIN))
        with_margin = cos * math.cos(m) - sin * math.sin(m)  # cos(theta + m)
        if self.easy_margin:
            return torch.where(cos > 0, with_margin, cos)
        # theta + m <= pi  <=>  cos(theta) >= cos(pi - m) = -cos(m)
        return torch.where(cos >= -math.cos(m), with_margin, cos - m * math.sin(m))

    def __call__(self, cos: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return _with_target(cos, labels, float(self.s), self._target)

    def __repr__(self) -> str:
        return f"ArcFaceMargin(s={self.s}, m={self.m}, easy_margin={self.easy_margin})"


class CosFaceMargin:
    """CosFace (large margin cosine loss): the target logit becomes s*(cos(theta) - m)."""

    def __init__(self, s: float = 64.0, m: float = 0.35) -> None:
        self.s, self.m = s, m

    def __call__(self, cos: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        m = float(self.m)
        return _with_target(cos, labels, float(self.s), lambda c: c - m)

    def __repr__(self) -> str:
        return f"CosFaceMargin(s={self.s}, m={self.m})"


class CombinedMargin:
    """InsightFace's combined margin: the target logit becomes s*(cos(m1*theta + m2) - m3)
    (m1=1, m2=0.5, m3=0 is ArcFace without its theta + m > pi fallback; m1=1, m2=0 is
    CosFace with m=m3). ``m`` is an alias of ``m2`` so margin warm-up ramps the angle."""

    def __init__(self, s: float = 64.0, m1: float = 1.0, m2: float = 0.5,
                 m3: float = 0.0) -> None:
        self.s, self.m1, self.m2, self.m3 = s, m1, m2, m3

    @property
    def m(self) -> float:
        return self.m2

    @m.setter
    def m(self, value: float) -> None:
        self.m2 = value

    def _target(self, cos: torch.Tensor) -> torch.Tensor:
        theta = torch.acos(cos.clamp(-1.0 + ACOS_EPS, 1.0 - ACOS_EPS))
        return torch.cos(float(self.m1) * theta + float(self.m2)) - float(self.m3)

    def __call__(self, cos: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return _with_target(cos, labels, float(self.s), self._target)

    def __repr__(self) -> str:
        return f"CombinedMargin(s={self.s}, m1={self.m1}, m2={self.m2}, m3={self.m3})"


def build_margin(name: str, s: float = 64.0, m: float = 0.5, m1: float = 1.0, m3: float = 0.0,
                 easy_margin: bool = False):
    """The margin function called ``name`` (arcface | cosface | combined; combined uses
    ``m`` as m2)."""
    if name == "arcface":
        return ArcFaceMargin(s, m, easy_margin)
    if name == "cosface":
        return CosFaceMargin(s, m)
    if name == "combined":
        return CombinedMargin(s, m1, m, m3)
    raise ValueError(f"unknown head {name!r}; choose from {', '.join(HEAD_NAMES)}")


# ----------------------------------------------------------------------------- single device

class _OnMargin:
    """A head attribute that lives on ``head.margin`` (read and written there)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, head, owner: type | None = None):
        return self if head is None else getattr(head.margin, self.name)

    def __set__(self, head, value: float) -> None:
        setattr(head.margin, self.name, value)


class _MarginParameters:
    """``head.s`` and ``head.m`` forward to ``head.margin``, so a training loop can ramp the
    margin on any head (single-device or sharded) by writing ``head.m = ...``."""

    margin: ArcFaceMargin | CosFaceMargin | CombinedMargin
    s = _OnMargin()
    m = _OnMargin()


class MarginHead(_MarginParameters, nn.Module):
    """Class centres ``weight`` (out_features, in_features) and a margin: ``forward(x,
    label)`` gives (N, out_features) logits, float32 even under autocast."""

    def __init__(self, in_features: int, out_features: int, margin) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.margin = margin
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.normal_(self.weight, std=DEFAULT_CENTRE_STD)

    def cosine(self, x: torch.Tensor) -> torch.Tensor:
        """Cosines (N, out_features) between the embeddings and the centres, in float32."""
        with torch.autocast(x.device.type, enabled=False):
            return cosine_similarity_matrix(_fp32(x), _fp32(self.weight))

    def forward(self, x: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return self.margin(self.cosine(x), label)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, " \
               f"margin={self.margin!r}"


class ArcMarginProduct(MarginHead):
    """ArcFace head: s*cos(theta + m) on the target logit (see ArcFaceMargin)."""

    def __init__(self, in_features: int, out_features: int, s: float = 64.0, m: float = 0.5,
                 easy_margin: bool = False) -> None:
        super().__init__(in_features, out_features, ArcFaceMargin(s, m, easy_margin))


class AddMarginProduct(MarginHead):
    """CosFace head: s*(cos(theta) - m) on the target logit."""

    def __init__(self, in_features: int, out_features: int, s: float = 64.0,
                 m: float = 0.35) -> None:
        super().__init__(in_features, out_features, CosFaceMargin(s, m))


class CombinedMarginProduct(MarginHead):
    """Combined-margin head: s*(cos(m1*theta + m2) - m3) on the target logit."""

    def __init__(self, in_features: int, out_features: int, s: float = 64.0, m1: float = 1.0,
                 m2: float = 0.5, m3: float = 0.0) -> None:
        super().__init__(in_features, out_features, CombinedMargin(s, m1, m2, m3))


def build_head(name: str, in_features: int, num_classes: int, s: float = 64.0,
               m: float = 0.5, m1: float = 1.0, m3: float = 0.0,
               easy_margin: bool = False) -> MarginHead:
    """A single-device head: arcface (s, m, easy_margin), cosface (s, m) or combined
    (s, m1, m2=m, m3)."""
    if name == "arcface":
        return ArcMarginProduct(in_features, num_classes, s, m, easy_margin)
    if name == "cosface":
        return AddMarginProduct(in_features, num_classes, s, m)
    if name == "combined":
        return CombinedMarginProduct(in_features, num_classes, s, m1, m, m3)
    raise ValueError(f"unknown head {name!r}; choose from {', '.join(HEAD_NAMES)}")


# ----------------------------------------------------------------------------- criterion

def _focal_factor(logp: torch.Tensor, gamma: float) -> torch.Tensor:
    """d/d(log p) of the focal loss -(1 - p)^gamma * log p, negated: the factor by which the
    focal loss's gradient w.r.t. the logits differs from cross-entropy's."""
    p = logp.exp()
    one_minus = (1.0 - p).clamp(min=LOG_MIN)
    return one_minus.pow(gamma) - gamma * p * one_minus.pow(gamma - 1.0) * logp


class MarginLoss(nn.Module):
    """Mean cross-entropy of the margin logits, or with ``focal_gamma`` > 0 the focal loss
    mean((1 - p)^gamma * -log p), p the softmax probability of the target."""

    def __init__(self, focal_gamma: float = 0.0) -> None:
        super().__init__()
        if focal_gamma < 0:
            raise ValueError(f"focal_gamma must be >= 0, got {focal_gamma}")
        self.focal_gamma = focal_gamma

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = _fp32(logits)
        if self.focal_gamma == 0:
            return F.cross_entropy(logits, labels)
        logp = -F.cross_entropy(logits, labels, reduction="none")
        return ((1.0 - logp.exp()).pow(self.focal_gamma) * -logp).mean()


def build_criterion(focal_gamma: float = 0.0) -> MarginLoss:
    """Cross-entropy (``focal_gamma`` = 0) or focal loss over margin logits."""
    return MarginLoss(focal_gamma)


# ----------------------------------------------------------------------------- many devices

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
        own = grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]
        return (own * ctx.grad_scale if ctx.grad_scale != 1.0 else own), None, None


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


class ShardedMarginSoftmax(_MarginParameters, nn.Module):
    """Margin softmax loss with the class centres sharded over the ranks of ``group`` (model
    parallel, as InsightFace's Partial FC): rank r holds the contiguous classes
    ``shard_range(num_classes, world, r)`` as ``weight`` (C_r, E), so its state dict is its
    own shard. Works without a process group (world size 1).

    ``forward(embeddings, labels)`` takes this rank's (n, E) embeddings and (n,) global labels
    in [0, num_classes) (n equal on every rank), gathers both from all ranks, applies
    ``margin`` to the cosines against this rank's centres, and returns ``(loss, accuracy)``:
    the mean loss over the whole gathered batch (identical on every rank) and the fraction of
    it whose target centre has the highest cosine (among the sampled centres), both 0-dim
    float32 tensors. Gradients reach this rank's embeddings and its shard of centres
    exactly; ``embedding_grad_scale`` multiplies the former (pass the world size when the
    backbone is wrapped in DistributedDataParallel, which averages its gradients over ranks
    although each rank already holds its full share of the loss's gradient).

    Partial FC: with ``sample_rate`` < 1 and in training mode, each step uses only
    ceil(sample_rate * C_r) centres of this rank, always including every class present in
    the gathered batch; the others get zero gradient. ``last_index`` holds the sampled local
    rows of the latest step (None when all were used). ``focal_gamma`` > 0 gives focal loss.
    """

    def __init__(self, margin, embedding_size: int, num_classes: int, sample_rate: float = 1.0,
                 focal_gamma: float = 0.0, embedding_grad_scale: float = 1.0,
                 group=None) -> None:
        super().__init__()
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        self.world_size, self.rank = _dist_info(group)
        if num_classes < self.world_size:
            raise ValueError(f"{num_classes} classes cannot be split over {self.world_size} "
                             "ranks")
        self.margin, self.group = margin, group
        self.embedding_size, self.num_classes = embedding_size, num_classes
        self.sample_rate, self.focal_gamma = sample_rate, focal_gamma
        self.embedding_grad_scale = embedding_grad_scale
        self.start, self.end = shard_range(num_classes, self.world_size, self.rank)
        self.weight = nn.Parameter(torch.empty(self.end - self.start, embedding_size))
        nn.init.normal_(self.weight, std=DEFAULT_CENTRE_STD)
        self.last_index: torch.Tensor | None = None

    def _gather(self, embeddings: torch.Tensor, labels: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.world_size == 1:
            return embeddings, labels
        parts = [torch.empty_like(labels) for _ in range(self.world_size)]
        dist.all_gather(parts, labels.contiguous(), group=self.group)
        return (_AllGather.apply(embeddings, self.group, float(self.embedding_grad_scale)),
                torch.cat(parts))

    def _sample(self, local: torch.Tensor, here: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Partial FC: (sampled centres, labels as columns of them or -1)."""
        num_local = self.weight.shape[0]
        positives = torch.unique(local[here])  # sorted
        num_sample = max(math.ceil(self.sample_rate * num_local), positives.numel())
        if num_sample >= num_local:
            self.last_index = None
            return self.weight, torch.where(here, local, -1)
        # Random scores, positives above every negative: the top num_sample rows keep all
        # positives and fill up with a uniform sample of negatives.
        scores = torch.rand(num_local, device=self.weight.device)
        scores[positives] = 2.0
        index = scores.topk(num_sample).indices.sort().values
        self.last_index = index
        columns = torch.searchsorted(index, local.clamp(0, num_local - 1))
        return self.weight[index], torch.where(here, columns, -1)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        embeddings, labels = self._gather(embeddings, labels.long())
        local = labels - self.start
        here = (labels >= self.start) & (labels < self.end)
        if self.sample_rate < 1.0 and self.training:
            weight, columns = self._sample(local, here)
        else:
            self.last_index = None
            weight, columns = self.weight, torch.where(here, local, -1)
        with torch.autocast(embeddings.device.type, enabled=False):
            cos = cosine_similarity_matrix(_fp32(embeddings), _fp32(weight))
            logits = self.margin(cos, columns)
            loss = _ShardedSoftmaxLoss.apply(logits, columns, self.group,
                                             float(self.focal_gamma))
            with torch.no_grad():
                accuracy = self._accuracy(cos.detach(), columns)
        return loss, accuracy

    def _accuracy(self, cos: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        best = _all_reduce(cos.max(dim=1).values, dist.ReduceOp.MAX, self.group)
        target = cos.gather(1, columns.clamp(min=0).unsqueeze(1)).squeeze(1)
        correct = ((columns >= 0) & (target >= best)).sum().to(cos.dtype)
        return _all_reduce(correct, dist.ReduceOp.SUM, self.group) / cos.shape[0]

    def extra_repr(self) -> str:
        return (f"classes [{self.start}, {self.end}) of {self.num_classes}, rank {self.rank}"
                f"/{self.world_size}, embedding_size={self.embedding_size}, "
                f"sample_rate={self.sample_rate}, margin={self.margin!r}")


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
