"""The LM head's per-token log-probabilities on a CPU: TRL's fused head, computed with fewer passes over the logits.

TRL 1.16 projects the 262k-row output layer in tiles and, without Triton, folds each tile with a dozen element-wise
torch passes and fp32 copies of the tile and the weight; on a CPU that was three quarters of a course training step
(`make bench`, step profile). Here each token chunk's logits are projected once in the compute dtype, reduced with
`logsumexp`, and kept for the backward pass when one chunk holds all positions, else recomputed there (as TRL does, so
memory stays bounded): the same values and gradients.
"""

from __future__ import annotations

import torch
from trl.kernels.chunked_logprob import ChunkedLogProbFunction

TOKENS_PER_CHUNK = 512  # logits of 512 positions x 262k tokens in fp32: 537 MB at a time


def _logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, scale: float) -> torch.Tensor:
    """fp32 logits of a token chunk, projected in the inputs' (compute) dtype."""
    z = (hidden @ weight.t()).float()
    if bias is not None:
        z += bias.float()
    return z.mul_(scale) if scale != 1.0 else z


class CpuLogProbFunction(torch.autograd.Function):
    """`ChunkedLogProbFunction` for CPU tensors without logit soft-capping: same arguments, outputs and gradients."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, chunk_size, softcap, logit_scale, outputs):
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else hidden.dtype
        scale = logit_scale / temperature
        n = hidden.shape[0]
        log_z, logprobs = hidden.new_empty(n, dtype=torch.float32), hidden.new_empty(n, dtype=torch.float32)
        extra = {name: hidden.new_empty(n, dtype=torch.bool if name == "is_top1" else torch.float32)
                 for name in ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1") if name in outputs}
        keep = n <= TOKENS_PER_CHUNK and any(ctx.needs_input_grad[:3])  # one chunk: keep its log-probs for backward
        ctx.kept = None
        with torch.autocast("cpu", enabled=False), torch.no_grad():
            w = weight.to(dtype)
            for s in range(0, n, TOKENS_PER_CHUNK):
                e = min(s + TOKENS_PER_CHUNK, n)
                z = _logits(hidden[s:e].to(dtype), w, bias, scale)
                t = targets[s:e]
                log_z[s:e] = torch.logsumexp(z, dim=-1)
                logprobs[s:e] = z.gather(1, t[:, None])[:, 0] - log_z[s:e]
                if "mean_logits" in extra:
                    extra["mean_logits"][s:e] = z.mean(-1)
                if "is_top1" in extra:  # the first maximum, as TRL counts ties
                    extra["is_top1"][s:e] = z.argmax(-1) == t
                if not (keep or "entropy" in extra or "log_sum_sq_probs" in extra):
                    continue
                log_p = z.sub_(log_z[s:e, None])  # z holds the log-probabilities from here on
                if keep:
                    ctx.kept = log_p
                if "entropy" in extra or "log_sum_sq_probs" in extra:
                    p = log_p.exp()
                    if "entropy" in extra:  # row-wise dot products: no third logits-sized buffer
                        extra["entropy"][s:e] = -torch.bmm(p[:, None, :], log_p[:, :, None]).view(-1)
                    if "log_sum_sq_probs" in extra:
                        extra["log_sum_sq_probs"][s:e] = torch.bmm(p[:, None, :], p[:, :, None]).view(-1).log()
        entropy = extra.get("entropy")
        ctx.save_for_backward(hidden, weight, bias, targets, log_z, log_z if entropy is None else entropy)
        ctx.dtype, ctx.scale = dtype, scale
        ctx.mark_non_differentiable(*(extra[k] for k in ("log_sum_sq_probs", "mean_logits", "is_top1") if k in extra))
        return (logprobs, entropy, extra.get("log_sum_sq_probs"), extra.get("mean_logits"), extra.get("is_top1"))

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy, *_):
        hidden, weight, bias, targets, log_z, entropy = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        dtype, scale, n = ctx.dtype, ctx.scale, hidden.shape[0]
        grad_hidden = torch.empty(hidden.shape, dtype=hidden.dtype) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32) if need_weight and n > TOKENS_PER_CHUNK else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32) if need_bias else None
        with torch.autocast("cpu", enabled=False):
            w = weight.to(dtype)
            for s in range(0, n, TOKENS_PER_CHUNK):  # in place where it can: fresh 268 MB buffers cost page faults
                e = min(s + TOKENS_PER_CHUNK, n)
                h = hidden[s:e].to(dtype)
                log_p = ctx.kept if ctx.kept is not None else _logits(h, w, bias, scale).sub_(log_z[s:e, None])
                ctx.kept = None
                grad = log_p.exp()  # p, turned into the gradient of the logits in place
                if grad_entropy is not None:  # d entropy / dz_j = -p_j (log p_j + entropy)
                    log_p.add_(entropy[s:e, None]).mul_(grad).mul_(grad_entropy[s:e, None].float())
                g = grad_logprobs[s:e].float() if grad_logprobs is not None else torch.zeros(e - s)
                grad.mul_(-g[:, None]).scatter_add_(1, targets[s:e, None], g[:, None])  # 1[j = target] - p_j
                if grad_entropy is not None:
                    grad.sub_(log_p)
                if scale != 1.0:
                    grad.mul_(scale)
                grad_z = grad.to(dtype)
                if need_hidden:
                    grad_hidden[s:e] = grad_z @ w
                if need_weight and grad_weight is None:  # one chunk: no fp32 accumulator needed
                    grad_weight = grad_z.t() @ h
                elif need_weight:
                    grad_weight.addmm_(grad.t(), h.float())
                if need_bias:
                    grad_bias += grad.sum(0)
        return (grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype),
                None if grad_bias is None else grad_bias.to(bias.dtype), None, None, None, None, None, None)


class LogProbHead:
    """What TRL's fused head calls (`.apply`): CpuLogProbFunction for CPU tensors without soft-capping, else TRL's."""

    @staticmethod
    def apply(hidden, weight, bias, targets, temperature, chunk_size, softcap, logit_scale, outputs):
        function = CpuLogProbFunction if hidden.device.type == "cpu" and softcap is None else ChunkedLogProbFunction
        return function.apply(hidden, weight, bias, targets, temperature, chunk_size, softcap, logit_scale, outputs)
