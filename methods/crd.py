"""CRD, contrastive representation distillation (Tian et al., 2020), as RepDistiller implements it.

Both networks' penultimate vectors are embedded (Linear → L2-normalise, 128-d) and contrasted against
memory banks of every training sample's embedding: the student's embedding of sample i should score high
against the teacher's stored embedding of sample i and low against K samples of other classes, and vice
versa. L = CE + β·(ContrastLoss(out_s) + ContrastLoss(out_t)) + α·T²·KL_T.

Differences from RepDistiller that change no number: negatives are drawn on the training device (exact
mode: K distinct samples of other classes, afresh for every sample and step) instead of by numpy in loader
workers, and a sample's scores against the banks come from one (B, D) × (D, N) product and a gather instead
of gathering B·(K+1) bank rows (the same dot products; 40x cheaper on the CPU at K = 16384).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import distributed
from data import Batch
from data.device import shard_bounds
from engine import StepOutput
from losses import soft_kl
from utils import UserError, available_memory

from .base import FEATURES, Method, Setup, StudentStage, TeacherOutputs

EPS = 1e-7  # RepDistiller's ContrastLoss


class Embed(nn.Module):
    """Linear projection to the contrast space, then L2 normalisation."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.linear(x), dim=1)


class NegativeSampler(nn.Module):
    """K dataset indices per sample, drawn uniformly among the samples of other classes.

    Without replacement where every class has at least K negatives (RepDistiller's "exact" mode), with
    replacement otherwise (as RepDistiller falls back to). The tables are derived from the labels and not
    saved; the randomness comes from torch's global generator, whose state the engine saves for --resume. A process
    of a many-process run draws for the whole global batch and keeps its rows: the draws, and the generators'
    states after them, are one process's.
    """

    def __init__(self, labels: Tensor, num_classes: int, k: int):
        super().__init__()
        counts = torch.bincount(labels, minlength=num_classes)
        self.register_buffer("by_class", torch.argsort(labels, stable=True), persistent=False)
        self.register_buffer("counts", counts, persistent=False)
        self.register_buffer("starts", torch.cumsum(counts, 0) - counts, persistent=False)
        self.n, self.k = len(labels), k
        self.replace = k > self.n - int(counts.max())  # one host read, at construction

    def forward(self, y: Tensor, start: int = 0, whole: int | None = None) -> Tensor:
        """(B,) labels → (B, K) indices of other-class samples; `y` being rows [start, start + B) of a global batch
        of `whole` rows, if given."""
        available = self.n - self.counts[y]  # (B,) how many negatives each sample has
        rows = slice(start, start + len(y))
        drawn = len(y) if whole is None else whole
        if self.replace:
            position = (torch.rand(drawn, self.k, device=y.device)[rows] * available[:, None]).long()
        else:  # the K smallest of uniform keys over the available positions: a uniform K-subset
            keys = torch.rand(drawn, self.n, device=y.device)[rows]
            keys = keys.masked_fill(torch.arange(self.n, device=y.device) >= available[:, None], 2.0)
            position = keys.topk(self.k, dim=1, largest=False, sorted=False).indices
        # Skip the sample's own class block in the class-sorted order.
        start, count = self.starts[y][:, None], self.counts[y][:, None]
        return self.by_class[position + (position >= start) * count]


class ContrastMemory(nn.Module):
    """The two memory banks (N × D) and the normalising constants Z, all part of the resume state."""

    def __init__(self, n: int, dim: int, temperature: float, momentum: float):
        super().__init__()
        sigma = 1.0 / math.sqrt(dim / 3)
        self.register_buffer("memory_s", torch.rand(n, dim) * 2 * sigma - sigma)
        self.register_buffer("memory_t", torch.rand(n, dim) * 2 * sigma - sigma)
        self.register_buffer("z_s", torch.tensor(-1.0))  # negative: not set yet
        self.register_buffer("z_t", torch.tensor(-1.0))
        self.temperature, self.momentum = temperature, momentum

    def forward(self, v_s: Tensor, v_t: Tensor, index: Tensor, contrast: Tensor,
                whole: int | None = None) -> tuple[Tensor, Tensor]:
        """Scores of (B, 1 + K) pairs: column 0 the positive (the sample itself), then its negatives.

        out_s scores the student's embedding against the teacher's bank, out_t the teacher's against the
        student's. Z is set once, from the first batch, and kept; then each bank row of the batch moves
        towards its new embedding (momentum) and is renormalised. With `whole` (this process holds a share of a
        global batch of that many rows) Z and the banks' update read the global batch, so every process keeps the
        banks one process would.
        """
        n = self.memory_s.shape[0]
        # The products keep their bank for the backward pass, and the banks change in place below: score
        # against copies (two N x D copies a step, cheap beside the products themselves).
        out_s = torch.exp((v_s @ self.memory_t.clone().T).gather(1, contrast) / self.temperature)
        out_t = torch.exp((v_t @ self.memory_s.clone().T).gather(1, contrast) / self.temperature)
        with torch.no_grad():  # no host read: torch.where keeps Z on the device
            mean_s, mean_t = out_s.mean(), out_t.mean()
            if whole is not None:  # the global batch's means and rows
                sums = distributed.all_reduce_sum(torch.stack([out_s.sum(), out_t.sum()]))
                mean_s, mean_t = sums / (whole * out_s.shape[1])
                counts = [stop - start for start, stop in
                          (shard_bounds(whole, r, distributed.world_size()) for r in range(distributed.world_size()))]
                v_s, v_t, index = (distributed.gather_rows(t, counts) for t in (v_s, v_t, index))
            self.z_s.copy_(torch.where(self.z_s < 0, mean_s * n, self.z_s))
            self.z_t.copy_(torch.where(self.z_t < 0, mean_t * n, self.z_t))
            for memory, v in ((self.memory_s, v_s), (self.memory_t, v_t)):
                rows = memory[index] * self.momentum + v.detach() * (1 - self.momentum)
                memory.index_copy_(0, index, F.normalize(rows, dim=1))
        return out_s / self.z_s, out_t / self.z_t


def contrast_loss(x: Tensor, n_data: int) -> Tensor:
    """NCE loss of (B, 1 + K) scores: −(1/B)[Σ log(x₀/(x₀ + K/N + ε)) + Σ_{k≥1} log((K/N)/(x_k + K/N + ε))]."""
    k = x.shape[1] - 1
    noise = k / n_data
    positive = torch.log(x[:, 0] / (x[:, 0] + noise + EPS))
    negative = torch.log(noise / (x[:, 1:] + noise + EPS))
    return -(positive.sum() + negative.sum()) / x.shape[0]


def memory_needed(n: int, k: int, dim: int, batch: int, features: tuple[int, int], exact: bool) -> int:
    """Bytes CRD needs at least, beyond the networks: what `ContrastiveDistillation` allocates and what one
    training step of `batch` samples holds at once. A lower bound: autograd's and the allocator's overheads come
    on top.

    n training samples, k negatives, dim the embedding width, features the two pooled widths; exact: negatives
    drawn without replacement (a (B, N) table of keys) rather than with.
    """
    fp32, int64 = 4, 8
    banks = 2 * n * dim * fp32 * 2  # the two banks, and the copies a step scores against
    embeddings = sum(3 * (width + 1) * dim * fp32 for width in features)  # weights, gradients, momentum
    scores = 2 * batch * n * fp32  # each embedding against a whole bank
    contrast = batch * (k + 1) * (int64 + 2 * 2 * fp32)  # indices; both sides' scores, before and after Z
    sampler = batch * n * fp32 * 2 if exact else batch * k * (fp32 + int64)  # keys, or draws and their positions
    return banks + embeddings + scores + contrast + sampler


def check_fits(setup: Setup) -> None:
    """Refuse --nce_k or --feat_dim values whose memory banks and scores cannot fit on the training device,
    before allocating any of them."""
    h, data = setup.hyper, setup.data
    n, device = len(data.y_train), data.y_train.device
    available = available_memory(device)
    if available is None:
        return
    exact = h["nce_k"] <= n - int(torch.bincount(data.y_train.cpu()).max())  # as NegativeSampler decides
    need = memory_needed(n, h["nce_k"], h["feat_dim"], setup.batch_size or 1,
                         (setup.student.feature_dim, setup.teacher.feature_dim), exact)
    if need > available:
        raise UserError(f"--nce_k {h['nce_k']} and --feat_dim {h['feat_dim']}: CRD needs at least {need / 1e9:,.1f} "
                        f"GB for its memory banks ({n:,} samples) and the scores of a batch, but {device} has "
                        f"{available / 1e9:,.1f} GB available; lower --nce_k (RepDistiller's: 16384) or --feat_dim "
                        "(128)")


class ContrastiveDistillation(StudentStage):
    needs = frozenset({FEATURES})

    def __init__(self, setup: Setup):
        check_fits(setup)
        h, data = setup.hyper, setup.data
        n = len(data.y_train)
        extras = {
            "embed_s": Embed(setup.student.feature_dim, h["feat_dim"]),
            "embed_t": Embed(setup.teacher.feature_dim, h["feat_dim"]),
            "memory": ContrastMemory(n, h["feat_dim"], h["nce_t"], h["nce_m"]),
            "sampler": NegativeSampler(data.y_train.cpu(), data.num_classes, h["nce_k"]),
        }
        super().__init__(setup, extras)

    def training_step(self, batch: Batch, teacher: TeacherOutputs) -> StepOutput:
        student = self.model.forward_features(batch.x)
        e, h = self.extras, self.hyper
        contrast = torch.cat([batch.index[:, None], e["sampler"](batch.y, batch.start, batch.whole)], dim=1)
        with torch.autocast(batch.x.device.type, enabled=False):  # exp(score / 0.07) wants fp32
            v_s, v_t = e["embed_s"](student.pooled.float()), e["embed_t"](teacher.pooled.float())
            out_s, out_t = e["memory"](v_s, v_t, batch.index, contrast, batch.whole)
            n = e["memory"].memory_s.shape[0]
            crd = contrast_loss(out_s, n) + contrast_loss(out_t, n)
        loss = F.cross_entropy(student.logits.float(), batch.y) + h["beta"] * crd
        if h["alpha"]:
            loss = loss + h["alpha"] * soft_kl(student.logits, teacher.logits, h["temperature"])
        return loss, [student.logits]


# ⚑ β = 0.8, α = 0: RepDistiller's CRD (its CRD+KD is α = 1, T = 4); K, NCE temperature, momentum and the
# embedding width are RepDistiller's.
METHOD = Method("crd", "penultimate features, contrasted against memory banks of every training sample",
                {"alpha": 0.0, "temperature": 4.0, "beta": 0.8, "nce_k": 16384, "nce_t": 0.07, "nce_m": 0.5,
                 "feat_dim": 128}, ContrastiveDistillation)
