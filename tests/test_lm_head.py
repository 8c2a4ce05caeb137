"""utils.lm_head: TRL's fused LM head on the CPU, same log-probabilities, metrics and gradients as TRL's own."""

from __future__ import annotations

import pytest
import torch
from trl.kernels.chunked_logprob import ChunkedLogProbFunction

from utils import lm_head

OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


def _run(function, hidden, weight, targets, dtype, scale):
    """Outputs and the gradients of hidden and weight for a loss that uses the log-probabilities and the entropy."""
    hidden, weight = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        out = function.apply(hidden, weight, None, targets, 1.0, 128, None, scale, OUTPUTS)
    (out[0].sum() + 0.3 * out[1].sum()).backward()
    return [o.float() if o.dtype != torch.bool else o for o in out], hidden.grad, weight.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale", [1.0, 0.5])
@pytest.mark.parametrize("n", [100, lm_head.TOKENS_PER_CHUNK + 44])  # one chunk (kept for backward); two, recomputed
def test_cpu_head_matches_trls_chunked_head(dtype, scale, n):
    torch.manual_seed(0)
    hidden, weight = torch.randn(n, 64), torch.randn(1000, 64) * 0.3
    targets = torch.randint(0, 1000, (n,))
    mine, trl = (_run(f, hidden, weight, targets, dtype, scale) for f in (lm_head.CpuLogProbFunction,
                                                                           ChunkedLogProbFunction))
    tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    for name, a, b in zip(OUTPUTS, mine[0], trl[0], strict=True):
        if a.dtype == torch.bool:
            assert (a == b).float().mean() > 0.99, name  # ties in bf16 may break either way
        else:
            torch.testing.assert_close(a, b, **tol, msg=name)
    torch.testing.assert_close(mine[1], trl[1], **tol)  # d loss / d hidden
    torch.testing.assert_close(mine[2], trl[2], **tol)  # d loss / d weight


def test_trl_reaches_the_cpu_head_through_utils_models():
    import trl.trainer.utils as trl_utils

    from utils import models

    assert trl_utils._ChunkedLogProbFunction is lm_head.LogProbHead
    models.cpu_lm_head(False)
    try:
        assert trl_utils._ChunkedLogProbFunction is ChunkedLogProbFunction
    finally:
        models.cpu_lm_head(True)
