"""int4 block quantize-dequantize, exactly as onnxruntime's MLAS RTN does it (MatMulNBits' default).

``qdq`` reproduces ``MlasQuantizeBlockwise`` per output row, in blocks of ``block_size`` input
columns (zero-padded):

- symmetric: ``m`` = the block's value of largest magnitude (the minimum on a tie),
  ``scale = m / -8`` (signed: ``m`` lands on -8, the other side gets at most +7), ``r = 1/scale``
  (0 if scale is 0), ``q = clamp(roundf(w * r + 8), 0, 15)``, ``w' = (q - 8) * scale``;
- asymmetric: ``lo = min(min, 0)``, ``hi = max(max, 0)``, ``scale = (hi - lo) / 15``,
  ``zp = clamp(roundf(-lo / scale), 0, 15)`` (0 if scale is 0), ``q = clamp(roundf(w * r + zp), 0, 15)``,
  ``w' = (q - zp) * scale``;

all in float32, ``roundf`` rounding halves away from zero. Checked element for element against
onnxruntime's ``quantize_matmul_4bits`` (tests/test_awq.py).
"""

from __future__ import annotations


def _roundf(t):
    """C ``roundf`` for t >= -0.5, in place (torch.round would round halves to even): floor(t)
    plus 1 where the fraction is >= 0.5; exact, as t - floor(t) is exact in float32."""
    import torch

    f = torch.floor(t)
    return f.add_(t.sub_(f).ge_(0.5))


def qdq(weight, block_size: int = 32, symmetric: bool = True):
    """Quantize-dequantize a Linear weight [out, in] to int4 in blocks along ``in``, as MLAS does."""
    import torch

    w = weight.detach().to(torch.float32)
    rows, cols = w.shape
    pad = -cols % block_size
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))
    blocks = w.reshape(rows, -1, block_size)
    lo, hi = torch.aminmax(blocks, dim=-1, keepdim=True)
    if symmetric:
        scale = torch.where(hi.abs() > lo.abs(), hi, lo) / -8.0
        zp = 8.0
    else:
        lo = lo.clamp(max=0.0)
        hi = hi.clamp(min=0.0)
        scale = (hi - lo) / 15.0
        safe = torch.where(scale != 0, scale, torch.ones_like(scale))
        zp = torch.where(scale != 0, _roundf((0.0 - lo / safe).clamp(0.0, 15.0)), torch.zeros_like(scale))
    recip = torch.where(scale != 0, 1.0 / torch.where(scale != 0, scale, torch.ones_like(scale)), torch.zeros_like(scale))
    q = _roundf((blocks * recip).add_(zp)).clamp_(0.0, 15.0)
    out = q.sub_(zp).mul_(scale).reshape(rows, -1)
    return out[:, :cols] if pad else out
