"""Cross-entropy fused with the output projection, computed in chunks of rows.

A 128k vocabulary makes the logits the largest tensor of a small model's step (16k tokens x
128k x fp32 = 8 GiB, twice: logits and their gradient). Here they never exist whole: each
chunk's logits are made, turned into the loss and the gradient with respect to the logits,
and multiplied back into the gradients of the hidden states and of the head's weight while
still in cache, as Liger's FusedLinearCrossEntropy does. Per-token weights let one call
give the validator's metric (mean over samples of each sample's mean token loss). The KL to the
base model that KL-weighted Instruct tasks add to the score is fused the same way (`linear_kl`).
"""
from __future__ import annotations

import torch

from .dpo_format import dpo_loss

CHUNK_ROWS = 8192  # logits of one chunk: 8192 x 128k bf16 = 2 GiB


def _ce_and_grad(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor):
    """Per-token loss and d(sum(weights * loss))/d(logits), in fp32 math, one pass when compiled."""
    x = logits.float()
    lse = torch.logsumexp(x, dim=-1)
    picked = x.gather(1, targets[:, None]).squeeze(1)
    probs = torch.exp(x - lse[:, None])
    onehot = torch.arange(x.shape[1], device=x.device)[None, :] == targets[:, None]
    grad = ((probs - onehot.float()) * weights[:, None]).to(logits.dtype)
    return lse - picked, grad


_compiled = None


def _elementwise(logits, targets, weights):
    """On CUDA the softmax/gradient step is compiled into a few fused kernels (it is memory-bound:
    eager runs six passes over the chunk's logits); elsewhere it runs eagerly."""
    global _compiled
    if not logits.is_cuda:
        return _ce_and_grad(logits, targets, weights)
    if _compiled is None:
        _compiled = torch.compile(_ce_and_grad, dynamic=True)
    return _compiled(logits, targets, weights)


def _kl_and_grad(logits: torch.Tensor, base_logits: torch.Tensor, weights: torch.Tensor):
    """Per-row KL(softmax(logits) || softmax(base_logits)) over the vocabulary, the validator's
    direction, and d(sum(weights * KL))/d(logits) = p * (log p - log q - KL) * weight."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    logq = torch.log_softmax(base_logits.float(), dim=-1)
    p = logp.exp()
    kl = (p * (logp - logq)).sum(-1)
    grad = (p * (logp - logq - kl[:, None]) * weights[:, None]).to(logits.dtype)
    return kl, grad


class _HeadGrads:
    """The gradients a fused head loss computes in its forward, chunk by chunk: of the hidden rows
    and (in fp32) of the head's weight, each only where it is needed (none in evaluation).
    `save` keeps them on the autograd ctx; `scaled` is every such Function's backward."""

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor):
        self.weight = weight
        self.d_hidden = torch.empty_like(hidden) if hidden.requires_grad or weight.requires_grad else None
        self.d_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if weight.requires_grad else None

    def add(self, s: int, e: int, grad_logits: torch.Tensor, h: torch.Tensor) -> None:
        """Rows [s, e)'s share, from d(loss)/d(logits) of those rows and their hidden states h."""
        if self.d_hidden is not None:
            self.d_hidden[s:e] = grad_logits @ self.weight
        if self.d_weight is not None:
            self.d_weight += (grad_logits.t() @ h).float()

    def save(self, ctx) -> None:
        ctx.save_for_backward(self.d_hidden if self.d_hidden is not None else torch.empty(0),
                              self.d_weight if self.d_weight is not None else torch.empty(0))
        ctx.weight_dtype, ctx.has_grad_weight = self.weight.dtype, self.d_weight is not None

    @staticmethod
    def scaled(ctx, grad_out: torch.Tensor) -> tuple:
        """(d hidden, d weight) times the upstream gradient of the Function's scalar output."""
        d_hidden, d_weight = ctx.saved_tensors
        return (d_hidden * grad_out.to(d_hidden.dtype),
                (d_weight * grad_out).to(ctx.weight_dtype) if ctx.has_grad_weight else None)


class _FusedHeadLoss(torch.autograd.Function):
    """sum(weights * loss(hidden @ weight.T)) chunk by chunk, where `per_chunk(start, end, logits)`
    gives the chunk's per-row loss and its gradient with respect to the logits."""

    @staticmethod
    def forward(ctx, hidden, weight, weights, chunk, per_chunk):
        grads = _HeadGrads(hidden, weight)
        losses = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        for s in range(0, hidden.shape[0], chunk):
            h = hidden[s:s + chunk]
            e = s + h.shape[0]
            loss, grad_logits = per_chunk(s, e, h @ weight.t())
            losses[s:e] = loss
            grads.add(s, e, grad_logits, h)
        grads.save(ctx)
        ctx.mark_non_differentiable(losses)
        return (losses * weights).sum(), losses

    @staticmethod
    def backward(ctx, grad_total, _grad_losses):
        return (*_HeadGrads.scaled(ctx, grad_total), None, None, None)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         weights: torch.Tensor, chunk: int = CHUNK_ROWS) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum over rows of weights * CE(hidden @ weight.T, targets), per-row CE without grad).
    hidden (n, d), weight (V, d), targets (n,) all valid class ids, weights (n,) fp32."""
    if hidden.shape[0] == 0:
        return hidden.sum() * 0.0, hidden.new_zeros(0, dtype=torch.float32)
    weights = weights.float()
    return _FusedHeadLoss.apply(hidden, weight, weights, chunk,
                                lambda s, e, logits: _elementwise(logits, targets[s:e], weights[s:e]))


def linear_kl(hidden: torch.Tensor, weight: torch.Tensor, base_hidden: torch.Tensor, base_weight: torch.Tensor,
              weights: torch.Tensor, chunk: int = CHUNK_ROWS) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum over rows of weights * KL(model || base), per-row KL without grad): the model's logits
    hidden @ weight.T against the base's base_hidden @ base_weight.T (no gradient), made chunk by
    chunk so that neither vocabulary-wide tensor exists whole."""
    if hidden.shape[0] == 0:
        return hidden.sum() * 0.0, hidden.new_zeros(0, dtype=torch.float32)
    weights = weights.float()
    base_weight = base_weight.detach()

    def per_chunk(s, e, logits):
        with torch.no_grad():
            base_logits = base_hidden[s:e].detach().to(base_weight.dtype) @ base_weight.t()
        return _kl_and_grad(logits, base_logits, weights[s:e])

    return _FusedHeadLoss.apply(hidden, weight, weights, chunk, per_chunk)


def pair_groups(pair_rows: list[int], chunk: int) -> list[tuple[int, int, int, int]]:
    """(first row, end row, first pair, end pair) of runs of consecutive pairs with at most `chunk`
    scored rows together (a larger pair alone): a pair's loss needs all of its rows' log-probs."""
    groups, row, start, first = [], 0, 0, 0
    for i, n in enumerate(pair_rows):
        if i > first and row + n - start > chunk:
            groups.append((start, row, first, i))
            start, first = row, i
        row += n
    if pair_rows:
        groups.append((start, row, first, len(pair_rows)))
    return groups


class _FusedPairLoss(torch.autograd.Function):
    """The mean sigmoid DPO loss over pairs of the log-probs summed per sequence from hidden @
    weight.T (rows ordered pair by pair: chosen's, then rejected's). A group of whole pairs has its
    logits made once: log-probs, the pairs' losses, then d(loss)/d(logits) = -dL/dlogp x (softmax -
    onehot) from the same chunk; a pair larger than a chunk has its logits made twice."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, seq, reference, pair_rows, beta, chunk, smoothing):
        n_pairs = reference.shape[1]
        grads = _HeadGrads(hidden, weight)
        logps = torch.zeros(2 * n_pairs, dtype=torch.float32, device=hidden.device)
        ones = torch.ones(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        for a, b, p, q in pair_groups(pair_rows, chunk):
            parts = [(s, min(s + chunk, b)) for s in range(a, b, chunk)]
            kept = []
            for s, e in parts:
                token_ce, grad = _elementwise(hidden[s:e] @ weight.t(), targets[s:e], ones[s:e])
                logps.index_add_(0, seq[s:e], -token_ce)
                kept.append(grad if len(parts) == 1 else None)
            if grads.d_hidden is None:
                continue
            pol, ref = logps[2 * p:2 * q].view(-1, 2), reference[:, p:q].T
            margin = (pol[:, 0] - ref[:, 0]) - (pol[:, 1] - ref[:, 1])
            # d(mean loss)/d(margin); label smoothing e: the loss (1-e) L(m) + e L(-m), whose gradient turns
            # back to 0 at a finite margin (a confident pair stops being pushed further)
            d_margin = beta * (smoothing * torch.sigmoid(beta * margin)
                               - (1 - smoothing) * torch.sigmoid(-beta * margin)) / n_pairs
            d_logp = torch.stack([d_margin, -d_margin], 1).reshape(-1)  # per sequence of the group
            for (s, e), grad in zip(parts, kept):
                if grad is None:
                    _, grad = _elementwise(hidden[s:e] @ weight.t(), targets[s:e], ones[s:e])
                grad.mul_(-d_logp[seq[s:e] - 2 * p].to(grad.dtype)[:, None])  # d(logp)/d(logits) = -grad(CE)
                grads.add(s, e, grad, hidden[s:e])
        policy = logps.view(n_pairs, 2).T
        losses = dpo_loss(policy, reference, beta)
        grads.save(ctx)
        ctx.mark_non_differentiable(losses, policy)
        return losses.mean(), losses, policy

    @staticmethod
    def backward(ctx, grad_mean, _grad_losses, _grad_policy):
        return (*_HeadGrads.scaled(ctx, grad_mean), None, None, None, None, None, None, None)


def linear_dpo(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, seq: torch.Tensor,
               reference: torch.Tensor, pair_rows: list[int], beta: float,
               chunk: int = CHUNK_ROWS, smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean over pairs of -logsigmoid(beta x margin), per-pair losses and the policy's [2, B]
    summed log-probs, both without grad). hidden (n, d): the scored rows, pair by pair (chosen's,
    then rejected's); targets (n,) the tokens they predict; seq (n,) each row's sequence, 2i for
    pair i's chosen, 2i + 1 for its rejected; reference [2, B] fp32; pair_rows: rows per pair.
    `smoothing` e > 0: the gradient is that of the label-smoothed loss (1-e) L(m) + e L(-m); the
    values returned stay the plain loss (the validator's metric)."""
    return _FusedPairLoss.apply(hidden, weight, targets, seq, reference.float(), list(pair_rows), beta, chunk,
                                smoothing)
