"""Margin-based softmax losses for face recognition: ArcFace, CosFace, the combined margin,
AdaFace, CurricularFace, MagFace and ElasticFace.

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

The batch margins (:class:`BatchMargin`) also read the batch: AdaFace (arXiv 2204.00964) and
MagFace (arXiv 2103.06627) the embedding norms, CurricularFace (arXiv 2004.00288) the mean
target cosine and the hard negatives, ElasticFace (arXiv 2109.09416) margins drawn per row.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import clip_grads_with_norm_, get_total_norm

from config import (
    HEAD_NAMES,
    HeadConfigError,
    check_head_options,
)
from training.distributed import shard_range  # beside the process group: checkpoints need no loss

# cos is clamped this far inside [-1, 1] before acos: d/dx acos(x) is infinite at +-1.
ACOS_EPS = 1e-6
NORM_EPS = 1e-12  # as torch.nn.functional.normalize
# sin^2 = 1 - cos^2 is floored here before sqrt: d/dx sqrt(x) is infinite at 0.
SIN2_MIN = 1e-12
LOG_MIN = 1e-30  # floor of (1 - p) in the focal factor, whose power may be negative
DEFAULT_CENTRE_STD = 0.01  # class centres start small and random (only their direction counts)
MIN_SAMPLED = 1  # Partial FC keeps a centre on a rank with no positive and sample_rate * C_r < 1
# The head names, the margin bounds and the newer heads' options live in config.py, which
# checks them without importing torch; the heads below use them from there.


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
                  target: Callable[[torch.Tensor], torch.Tensor],
                  others: torch.Tensor | None = None) -> torch.Tensor:
    """``s * cos`` everywhere (``s * others`` when given: CurricularFace's modulated
    negatives) but each row's target column, which gets ``s * target(cos)`` ((N, 1) in and
    out). ``labels`` hold each row's target column, or -1 when the row's class is not among
    the columns (another GPU's centres). Static shapes only (no boolean indexing), so it
    compiles and never waits for the device."""
    labels = labels.long()
    others = cos if others is None else others
    valid = (labels >= 0).unsqueeze(1)
    column = labels.clamp(min=0).unsqueeze(1)
    target_cos = torch.where(valid, target(cos.gather(1, column)), others.gather(1, column))
    return (others * s).scatter(1, column, target_cos * s)


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


# ----------------------------------------------------------------------------- batch margins

def arc_target_per_row(cos: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """cos(theta + m) with a margin per row (``m`` broadcasts against ``cos``), with ArcFace's
    fallback cos - m sin(m) where theta + m > pi; no acos (infinite slope at +-1)."""
    sin = torch.sqrt((1.0 - cos * cos).clamp(min=SIN2_MIN))
    cos_m = torch.cos(m)
    return torch.where(cos >= -cos_m, cos * cos_m - sin * torch.sin(m), cos - m * torch.sin(m))


def row_target_cosines(cos: torch.Tensor, labels: torch.Tensor, group=None) -> torch.Tensor:
    """Every row's target cosine (N,), detached, on every rank: the target column lives on
    the one rank holding its class (labels -1 elsewhere), so a SUM all-reduce of the rows'
    own values (0 where absent) gives each rank the whole vector."""
    labels = labels.long()
    own = cos.detach().gather(1, labels.clamp(min=0).unsqueeze(1)).squeeze(1)
    return _all_reduce(torch.where(labels >= 0, own, 0.0), dist.ReduceOp.SUM, group)


class BatchMargin(nn.Module):
    """A margin that reads more than the cosines: the norms of the gathered (global) batch's
    unnormalised embeddings, the target cosines of every row, or the RNG. The head calls it
    as ``margin(cos, labels, norms, update, group)``: ``norms`` (N,) with their gradient,
    ``update`` True in a training forward pass (batch statistics updated BEFORE they are
    used, margins drawn) and False in ``logits()`` and eval mode (statistics as they stand).
    With several ranks it is collective: every rank calls it with the same rows, and each
    gets the same statistics. Statistics are buffers: the head's state dict (a checkpoint)
    carries them, so a resumed run continues exactly."""

    s: float
    m: float

    def regulariser(self, norms: torch.Tensor, world_size: int) -> torch.Tensor | None:
        """A term added to the loss (None: nothing)."""
        return None


ADAFACE_EPS = 1e-3  # the official cos clamp inside +-1, theta clip inside [0, pi], std floor
ADAFACE_NORM_MIN, ADAFACE_NORM_MAX = 1e-3, 100.0  # feature norms clipped here
ADAFACE_MU0, ADAFACE_SIGMA0 = 20.0, 100.0  # the running statistics' starting values


class AdaFaceMargin(BatchMargin):
    """AdaFace (arXiv 2204.00964; mk-minchul/AdaFace head.py). n = clip(|x|) detached;
    running mu, sigma <- t_alpha * batch mean / unbiased std + (1 - t_alpha) * old, over the
    GLOBAL batch; g = clip(h (n - mu) / (sigma + eps), -1, 1); cos clamped inside +-1; target
    s (cos(clip(theta - m g, eps, pi - eps)) - (m + m g)), others s cos. A one-sample batch
    has no std: sigma keeps its value (the official code would store NaN forever)."""

    def __init__(self, s: float = 64.0, m: float = 0.4, h: float = 0.333,
                 t_alpha: float = 0.01) -> None:
        super().__init__()
        self.s, self.m, self.h, self.t_alpha = s, m, h, t_alpha
        self.register_buffer("mu", torch.tensor(ADAFACE_MU0))
        self.register_buffer("sigma", torch.tensor(ADAFACE_SIGMA0))

    def forward(self, cos: torch.Tensor, labels: torch.Tensor, norms: torch.Tensor,
                update: bool = False, group=None) -> torch.Tensor:
        n = norms.detach().clamp(ADAFACE_NORM_MIN, ADAFACE_NORM_MAX)
        if update:
            self._update(n)
        g = (self.h * (n - self.mu) / (self.sigma + ADAFACE_EPS)).clamp(-1.0, 1.0).unsqueeze(1)
        m = float(self.m)

        def target(c: torch.Tensor) -> torch.Tensor:
            theta = (torch.acos(c) - m * g).clamp(ADAFACE_EPS, math.pi - ADAFACE_EPS)
            return torch.cos(theta) - (m + m * g)

        # acos has a finite slope on the clamped range
        cos = cos.clamp(-1.0 + ADAFACE_EPS, 1.0 - ADAFACE_EPS)
        return margin_logits(cos, labels, float(self.s), target)

    @torch.no_grad()
    def _update(self, n: torch.Tensor) -> None:
        a = self.t_alpha
        self.mu.copy_(a * n.mean() + (1.0 - a) * self.mu)
        if n.numel() > 1:  # the std of one sample is undefined (NaN): skip, keep sigma
            self.sigma.copy_(a * n.std() + (1.0 - a) * self.sigma)

    def extra_repr(self) -> str:
        return f"s={self.s}, m={self.m}, h={self.h}, t_alpha={self.t_alpha}"


CURRICULAR_MOMENTUM = 0.01  # t <- 0.01 * mean(cos_y) + 0.99 * t, as the official code


class CurricularFaceMargin(BatchMargin):
    """CurricularFace (arXiv 2004.00288; HuangYG123/CurricularFace head/metrics.py). Target
    s cos(theta_y + m) with ArcFace's theta + m > pi fallback; t <- 0.01 mean(cos_y) + 0.99 t
    over the GLOBAL batch (start 0), updated before use; each non-target cos_j above the
    row's cos(theta_y + m) (a hard negative) becomes cos_j (t + cos_j)."""

    def __init__(self, s: float = 64.0, m: float = 0.5) -> None:
        super().__init__()
        self.s, self.m = s, m
        self.register_buffer("t", torch.tensor(0.0))

    def forward(self, cos: torch.Tensor, labels: torch.Tensor, norms: torch.Tensor,
                update: bool = False, group=None) -> torch.Tensor:
        m = float(self.m)
        # no clamp of the whole (N, C) matrix (one pass less): arcface_target floors sin^2
        target = row_target_cosines(cos, labels, group).clamp(-1.0, 1.0)
        if update:
            with torch.no_grad():
                self.t.copy_(CURRICULAR_MOMENTUM * target.mean()
                             + (1.0 - CURRICULAR_MOMENTUM) * self.t)
        sin = torch.sqrt((1.0 - target * target).clamp(min=SIN2_MIN))
        threshold = (target * math.cos(m) - sin * math.sin(m)).unsqueeze(1)
        # cos_j (t + cos_j) for the hard negatives, as cos_j * factor: two passes over (N, C)
        others = cos * torch.where(cos > threshold, self.t + cos, 1.0)
        return margin_logits(cos, labels, float(self.s), lambda c: arcface_target(c, m), others)

    def extra_repr(self) -> str:
        return f"s={self.s}, m={self.m}"


def magface_lambda_bound(s: float, l_a: float, u_a: float, l_m: float, u_m: float) -> float:
    """The smallest lambda_g MagFace's theorem allows. With g(a) = a / u_a^2 + 1 / a and the
    margin's slope K = (u_m - l_m) / (u_a - l_a), the per-sample loss is strictly convex in
    a with its optimum inside [l_a, u_a] (norm = quality) when lambda_g >= s K / (-g'(l_a))
    = s K l_a^2 u_a^2 / (u_a^2 - l_a^2): about 22.6 for s 64, l_a 10, u_a 110, l_m 0.45,
    u_m 0.8."""
    slope = (u_m - l_m) / (u_a - l_a)
    return s * slope * l_a**2 * u_a**2 / (u_a**2 - l_a**2)


class MagFaceMargin(BatchMargin):
    """MagFace (arXiv 2103.06627; IrvingMeng/MagFace models/magface.py). a = clip(|x|, l_a,
    u_a); m(a) = (u_m - l_m) / (u_a - l_a) (a - l_a) + l_m; target s cos(theta_y + m(a)) with
    ArcFace's fallback (as the official code), the gradient flowing through a as there; the
    loss adds lambda_g mean(a / u_a^2 + 1 / a). ``ramp`` in [0, 1] scales m(a): the margin
    warm-up (train.set_ramped_margin). The norm |x| is the face's quality."""

    def __init__(self, s: float = 64.0, l_a: float = 10.0, u_a: float = 110.0,
                 l_m: float = 0.45, u_m: float = 0.8, lambda_g: float = 35.0) -> None:
        super().__init__()
        self.s, self.l_a, self.u_a, self.l_m, self.u_m = s, l_a, u_a, l_m, u_m
        self.lambda_g, self.ramp = lambda_g, 1.0
        bound = magface_lambda_bound(s, l_a, u_a, l_m, u_m)
        if lambda_g < bound:
            warnings.warn(f"MagFace lambda_g={lambda_g:g} is below {bound:.1f}, the bound its "
                          "theorem needs for the norm to measure quality", stacklevel=2)

    @property
    def m(self) -> float:  # the largest margin, at a >= u_a
        return self.u_m * self.ramp

    def margin_of(self, a: torch.Tensor) -> torch.Tensor:
        slope = (self.u_m - self.l_m) / (self.u_a - self.l_a)
        return float(self.ramp) * (slope * (a - self.l_a) + self.l_m)

    def forward(self, cos: torch.Tensor, labels: torch.Tensor, norms: torch.Tensor,
                update: bool = False, group=None) -> torch.Tensor:
        margins = self.margin_of(norms.clamp(self.l_a, self.u_a)).unsqueeze(1)
        return margin_logits(cos, labels, float(self.s),
                             lambda c: arc_target_per_row(c, margins))

    def regulariser(self, norms: torch.Tensor, world_size: int) -> torch.Tensor:
        """lambda_g mean(g(a)) over the gathered batch, the same value on every rank. Every
        rank computes it from all rows and the gather's backward sums the ranks' gradients,
        so each rank passes on 1/world of it."""
        a = norms.clamp(self.l_a, self.u_a)
        reg = self.lambda_g * (a / self.u_a**2 + 1.0 / a).mean()
        share = reg / world_size
        return share + (reg - share).detach()

    def extra_repr(self) -> str:
        return (f"s={self.s}, l_a={self.l_a}, u_a={self.u_a}, l_m={self.l_m}, u_m={self.u_m}, "
                f"lambda_g={self.lambda_g}, ramp={self.ramp}")


class ElasticFaceMargin(BatchMargin):
    """ElasticFace (arXiv 2109.09416; fdbtrs/ElasticFace utils/losses.py): each training
    step draws a margin m_i ~ N(m, sigma) per row of the global batch from the torch RNG
    (rank 0's draw, broadcast: checkpoints save the RNG, so a resume is exact), clamped at 0
    (a negative margin would reward the target). ``kind`` "arc": target s cos(theta_y + m_i)
    with ArcFace's fallback; "cos": s (cos_y - m_i). Eval mode and ``logits()`` use m itself.

    ``plus`` (ElasticFace+): the drawn margins are sorted and the smallest goes to the row
    with the LARGEST target cosine, the largest to the row farthest from its centre, as the
    paper describes (descending cosines paired with ascending margins). The official code
    writes ``margin[idicate_cosie]`` (sorted margins gathered by the cosine order), which
    applies the inverse permutation; here row order[k] receives sorted margin k."""

    def __init__(self, s: float = 64.0, m: float = 0.5, sigma: float = 0.05,
                 plus: bool = False, kind: str = "arc") -> None:
        super().__init__()
        if kind not in ("arc", "cos"):
            raise HeadConfigError(f"ElasticFace kind must be arc or cos, got {kind!r}")
        self.s, self.m, self.sigma, self.plus, self.kind = s, m, sigma, plus, kind
        self.last_margins: torch.Tensor | None = None

    def forward(self, cos: torch.Tensor, labels: torch.Tensor, norms: torch.Tensor,
                update: bool = False, group=None) -> torch.Tensor:
        if update:
            margins = self._draw(cos, labels, group)
        else:
            margins = torch.full((cos.shape[0],), float(self.m), dtype=cos.dtype,
                                 device=cos.device)
        self.last_margins = margins
        column = margins.unsqueeze(1)
        if self.kind == "arc":
            return margin_logits(cos, labels, float(self.s),
                                 lambda c: arc_target_per_row(c.clamp(-1.0, 1.0), column))
        return margin_logits(cos, labels, float(self.s), lambda c: c - column)

    def _draw(self, cos: torch.Tensor, labels: torch.Tensor, group) -> torch.Tensor:
        drawn = torch.normal(float(self.m), float(self.sigma), (cos.shape[0],),
                             device=cos.device)
        if _dist_info(group)[0] > 1:
            src = dist.get_global_rank(group, 0) if group is not None else 0
            dist.broadcast(drawn, src=src, group=group)
        drawn = drawn.to(cos.dtype).clamp(min=0.0)
        if not self.plus:
            return drawn
        order = row_target_cosines(cos, labels, group).argsort(descending=True)
        return torch.empty_like(drawn).scatter_(0, order, drawn.sort().values)

    def extra_repr(self) -> str:
        return f"s={self.s}, m={self.m}, sigma={self.sigma}, plus={self.plus}, kind={self.kind}"


Margin = ArcFaceMargin | CosFaceMargin | CombinedMargin | BatchMargin


# The margin m each head's paper trains with, used when build_head is not given one (ArcFace,
# CosFace and the combined margin keep their historical default 0.5).
PAPER_MARGIN = {"adaface": 0.4, "curricularface": 0.5, "elasticface-arc": 0.5,
                "elasticface-cos": 0.35}


def build_margin(name: str, s: float = 64.0, m: float | None = None, m1: float = 1.0,
                 m3: float = 0.0, easy_margin: bool = False, **options) -> Margin:
    """The margin called ``name``: arcface (s, m, easy_margin), cosface (s, m), combined
    (s, m1, m2=m, m3), adaface (s, m; h, t_alpha), curricularface (s, m), magface (s; l_a,
    u_a, l_m, u_m, lambda_g: its margin is m(a), ``m`` is not used), elasticface-arc and
    elasticface-cos (s, m; sigma, plus). ``m`` None: the paper's (0.5 for the first three)."""
    if name not in HEAD_NAMES:
        raise HeadConfigError(f"unknown head {name!r}; choose from {', '.join(HEAD_NAMES)}")
    check_head_options(name, options)
    m = PAPER_MARGIN.get(name, 0.5) if m is None else m
    if name == "arcface":
        return ArcFaceMargin(s, m, easy_margin)
    if name == "cosface":
        return CosFaceMargin(s, m)
    if name == "combined":
        return CombinedMargin(s, m1, m, m3)
    if name == "adaface":
        return AdaFaceMargin(s, m, **options)
    if name == "curricularface":
        return CurricularFaceMargin(s, m)
    if name == "magface":
        return MagFaceMargin(s, **options)
    return ElasticFaceMargin(s, m, kind=name.removeprefix("elasticface-"), **options)


# ----------------------------------------------------------------------------- the head

def _fp32(t: torch.Tensor) -> torch.Tensor:
    """Half and bfloat16 tensors to float32; float32 and float64 kept as they are."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _dist_info(group=None) -> tuple[int, int]:
    """(world size, rank) of ``group``, or (1, 0) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(group), dist.get_rank(group)
    return 1, 0


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
    int(sample_rate * C_r) centres of this rank (PartialFC_V2's count), always including
    every class present in the gathered batch; the others get zero gradient. ``last_index``
    holds the sampled local rows of the latest step (None when all were used).
    ``focal_gamma`` > 0 gives focal loss.

    A :class:`BatchMargin` (AdaFace, CurricularFace, MagFace, ElasticFace) sees the gathered
    batch, so its statistics are the global batch's, the same on every rank and as on one
    GPU; a training-mode forward updates them (or draws margins) before use, eval mode and
    ``logits()`` do not. MagFace's regulariser is part of the returned loss.
    """

    def __init__(self, margin: Margin, embedding_size: int, num_classes: int,
                 sample_rate: float = 1.0, focal_gamma: float = 0.0,
                 embedding_grad_scale: float = 1.0, group=None) -> None:
        super().__init__()
        if not 0.0 <= sample_rate <= 1.0:
            raise HeadConfigError(f"sample_rate must be in [0, 1], got {sample_rate}")
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
            x = _fp32(embeddings)
            cos = cosine_similarity_matrix(x, _fp32(weight))
            logits = self._apply_margin(cos, columns, x, update=self.training)
            loss = _ShardedSoftmaxLoss.apply(logits, columns, self.group,
                                             float(self.focal_gamma))
            if isinstance(self.margin, BatchMargin):
                extra = self.margin.regulariser(x.norm(dim=1), self.world_size)
                loss = loss if extra is None else loss + extra
            batch_accuracy = None
            if accuracy:
                with torch.no_grad():
                    all_cos = cos if self.last_index is None else \
                        cosine_similarity_matrix(_fp32(embeddings), _fp32(self.weight))
                    batch_accuracy = self._accuracy(all_cos, shard_column)
        return loss, batch_accuracy

    def logits(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """This rank's margin logits (N, C_r) for ungathered embeddings and global labels,
        float32 even under autocast; with one process, the full (N, num_classes) logits.
        Batch statistics (AdaFace, CurricularFace) are used as they stand, not updated;
        ElasticFace uses its mean margin. With a :class:`BatchMargin` and several ranks it is
        collective: call it on every rank with the same rows."""
        local = labels.long() - self.start
        columns = torch.where((local >= 0) & (local < self.weight.shape[0]), local, -1)
        with torch.autocast(embeddings.device.type, enabled=False):
            x = _fp32(embeddings)
            return self._apply_margin(cosine_similarity_matrix(x, _fp32(self.weight)), columns,
                                      x, update=False)

    def _apply_margin(self, cos: torch.Tensor, columns: torch.Tensor, x: torch.Tensor,
                      update: bool) -> torch.Tensor:
        if isinstance(self.margin, BatchMargin):
            return self.margin(cos, columns, x.norm(dim=1), update=update, group=self.group)
        return self.margin(cos, columns)

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
        # PartialFC_V2's int(sample_rate * num_local), at least one centre where it would
        # take none (and fail)
        num_sample = max(int(self.sample_rate * num_local), positives.numel(), MIN_SAMPLED)
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
               m: float | None = None, m1: float = 1.0, m3: float = 0.0,
               easy_margin: bool = False, sample_rate: float = 1.0, focal_gamma: float = 0.0,
               embedding_grad_scale: float = 1.0, group=None,
               **options) -> ShardedMarginSoftmax:
    """The training head: the margin ``name`` (one of HEAD_NAMES, with its options by name;
    see :func:`build_margin`) over sharded class centres with its softmax loss."""
    margin = build_margin(name, s, m, m1, m3, easy_margin, **options)
    return ShardedMarginSoftmax(margin, embedding_size,
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
            x = _fp32(x)
            cos = cosine_similarity_matrix(x, _fp32(self.weight))
            if isinstance(self.margin, BatchMargin):  # statistics updated in training mode
                return self.margin(cos, label, x.norm(dim=1), update=self.training)
            return self.margin(cos, label)

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
                           all_reduce_sum_=None, clip_sharded: bool = True) -> torch.Tensor:
    """Clip all gradients to one global L2 norm ``max_norm`` (inf: only measure it) and return
    that norm before clipping, without a host sync. ``replicated`` gradients are equal on
    every rank (a DDP backbone after its all-reduce); ``sharded`` ones (a head's shard of
    centres) differ, so their squared norm is summed over ranks: with ``all_reduce_sum_``
    when given, else an all-reduce over ``group``. Multi-tensor kernels, not one per tensor.
    ``clip_sharded`` False clips the replicated gradients by their own norm and leaves the
    sharded ones as they are (arcface_torch's recipe); the global norm is still returned."""
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
    rep_sq = squared_norm(rep)
    norm = (rep_sq + shard_sq).sqrt()
    if math.isfinite(max_norm) and clip_sharded:
        clip_grads_with_norm_(rep + shard, max_norm, norm)  # takes the parameters
    elif math.isfinite(max_norm) and rep:
        clip_grads_with_norm_(rep, max_norm, rep_sq.sqrt())
    return norm
