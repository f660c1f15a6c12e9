"""LayerNorm and exact GELU with hand-written backward passes, for MindSpore on CPU.

They compute the same functions as ``nn.LayerNorm`` and ``nn.GELU(approximate=False)``
(float32 agreement ~1e-6) and only exist for speed: in MindSpore 2.10 on CPU, LayerNormGrad
and the autodiff of the erf-form GELU were among the largest costs of a VOLO-D1 train step
(docs/benchmarks.md, "Op profile"), and the CPU ReduceSum/ReduceMean kernels are slow on
rows of a few hundred values. Here every row or column sum of the backward is a
matrix-vector product (MatMul runs at sgemm speed), the GELU's backward reuses no autodiff
chain, and the rest are few elementwise kernels. model.py uses them on CPU only; other
backends keep MindSpore's fused kernels. Kept apart from model.py so that the model reads
as the architecture.
"""

from __future__ import annotations

from mindspore import nn, ops

_SQRT_HALF = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327


def _row_sum(t):
    """Sum over the last axis, keeping it (length 1), as one GEMV."""
    n = t.shape[-1]
    return ops.matmul(t.reshape(-1, n), ops.ones((n, 1), t.dtype)).reshape(t.shape[:-1] + (1,))


def _column_sum(t):
    """Sum over every axis but the last, as one GEMV."""
    n = t.shape[-1]
    return ops.matmul(ops.ones((1, t.size // n), t.dtype), t.reshape(-1, n)).reshape(n)


class _LayerNormFn(nn.Cell):
    """y, mean, var = LayerNorm(x) over the last axis; backward for x, gamma and beta."""

    def __init__(self, eps: float):
        super().__init__()
        self.eps = eps
        self.layer_norm = ops.LayerNorm(-1, -1, epsilon=eps)

    def construct(self, x, gamma, beta):
        return self.layer_norm(x, gamma, beta)

    def bprop(self, x, gamma, beta, out, dout):
        _, mean, var = out
        rstd = ops.rsqrt(var + self.eps)
        xhat = (x - mean) * rstd
        g = dout[0] * gamma
        inv_n = 1.0 / x.shape[-1]
        dx = rstd * (g - _row_sum(g) * inv_n - xhat * (_row_sum(g * xhat) * inv_n))
        return dx, _column_sum(dout[0] * xhat), _column_sum(dout[0])


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm over the last axis: the same parameters (``gamma``, ``beta``), and still
    an nn.LayerNorm for the mixed-precision lists that keep norms in float32."""

    def __init__(self, dim: int, eps: float):
        super().__init__((dim,), epsilon=eps)
        self.fn = _LayerNormFn(eps)

    def construct(self, x):
        return self.fn(x, self.gamma.astype(x.dtype), self.beta.astype(x.dtype))[0]


class GELU(nn.GELU):
    """x * Phi(x) with the erf, as torch's nn.GELU(); backward dy * (Phi(x) + x * phi(x))."""

    def __init__(self):
        super().__init__(approximate=False)

    def construct(self, x):
        return x * (ops.erf(x * _SQRT_HALF) + 1.0) * 0.5

    def bprop(self, x, out, dout):
        cdf = (ops.erf(x * _SQRT_HALF) + 1.0) * 0.5
        pdf = ops.exp(x * x * -0.5) * _INV_SQRT_2PI
        return (dout * (cdf + x * pdf),)

