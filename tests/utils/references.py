"""Closed-form references written with plain loops and explicit softmax, independent of the bundle's modules."""

import torch
import torch.nn.functional as F


def rms(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def norm_linear_silu(w, prefix: str, x: torch.Tensor) -> torch.Tensor:
    return F.silu(w(f"{prefix}.1") @ rms(x, w(f"{prefix}.0")))


def pvtc_block(w, prefix: str, query: torch.Tensor, keys_values: torch.Tensor, heads: int) -> torch.Tensor:
    """One released-layout block (`attn.{norm1,norm2,q,k,v,proj}`, `mlp.{norm,w1,w2,w3}`) for one window."""
    q = w(f"{prefix}.attn.q") @ rms(query, w(f"{prefix}.attn.norm1"))
    kv = rms(keys_values, w(f"{prefix}.attn.norm2"))
    k, v = kv @ w(f"{prefix}.attn.k").T, kv @ w(f"{prefix}.attn.v").T
    head_dim = q.shape[0] // heads
    outputs = []
    for h in range(heads):
        part = slice(h * head_dim, (h + 1) * head_dim)
        scores = torch.stack([q[part] @ k[j, part] for j in range(k.shape[0])]) / head_dim**0.5
        weights = scores.exp() / scores.exp().sum()
        outputs.append(sum(weights[j] * v[j, part] for j in range(k.shape[0])))
    x = query + w(f"{prefix}.attn.proj") @ torch.cat(outputs)
    h = rms(x, w(f"{prefix}.mlp.norm"))
    return x + w(f"{prefix}.mlp.w2") @ (F.silu(w(f"{prefix}.mlp.w1") @ h) * (w(f"{prefix}.mlp.w3") @ h))


def pvtc_reference(w, x: torch.Tensor, side: int, factor: int, heads: int, layers: int = 1) -> torch.Tensor:
    """PVTC of one tile `x (1 + S², C)` from released-layout weights `w(name)`, window by window → `(N², D)`.

    Names follow the released checkpoints: `mlp1` local, `mlp2` CLS, `mlp3` key/value, `cls_scale`,
    `attn_local[.i]` / `attn_global[.i]`.
    """
    grid, channels = side // factor, x.shape[-1]
    cls, patches = x[0], x[1:].reshape(side, side, channels)
    block_name = (lambda path, i: f"attn_{path}") if layers == 1 else (lambda path, i: f"attn_{path}.{i}")
    out = []
    for row in range(grid):
        for col in range(grid):
            window = patches[row * factor : (row + 1) * factor, col * factor : (col + 1) * factor]
            keys_values = torch.stack([norm_linear_silu(w, "mlp3", t) for t in window.reshape(-1, channels)])
            local = norm_linear_silu(w, "mlp1", window.reshape(-1))  # pixel shuffle: window patches row-major
            glob = norm_linear_silu(w, "mlp2", cls) * w("cls_scale")[0, row, col]
            for i in range(layers):
                local = pvtc_block(w, block_name("local", i), local, keys_values, heads)
                glob = pvtc_block(w, block_name("global", i), glob, keys_values, heads)
            out.append(local + glob)
    return torch.stack(out)
