"""Plain torch rendering of GPTQ (Frantar et al. 2022, Alg. 1) and SparseGPT
(Frantar & Alistarh 2023, Alg. 1), the independent reference for
``pallax.pallas_kernels.second_order``. Runs in the Hugging Face venv (torch CPU).

python obs_reference.py gptq      IN.npz OUT.npz   # IN: w [K, N], x [n, K], settings
python obs_reference.py sparsegpt IN.npz OUT.npz

Written from the papers, on unpadded ``W [rows = outputs, cols = inputs]`` in
float64 (so the reference's own rounding is negligible), with a last block
narrower than ``block_size`` when the width is not a multiple. The
quantization grid is pallax's (``quantization.py`` module doc): symmetric
``s = absmax / (2^(b-1) - 1)``, ``q = clip(round(w / s), -(2^(b-1) - 1), ...)``;
asymmetric ``s = (max(w, 0) - min(w, 0)) / (2^b - 1)``, ``z = round(-min / s)``.
Unstructured SparseGPT prunes exactly ``floor(sparsity * rows * width)`` weights
of the smallest ``w^2 / [H^-1]_jj^2`` per block; N:M keeps n of every m.
"""

import sys

import numpy as np
import torch


def grid(w_group, bits, symmetric):
    """(scale, zero) per row of ``w_group [rows, g]``."""
    tiny = torch.finfo(torch.float32).tiny
    if symmetric:
        scale = w_group.abs().amax(dim=1) / (2 ** (bits - 1) - 1)
        return scale.clamp(min=tiny), torch.zeros_like(scale)
    lo = w_group.amin(dim=1).clamp(max=0)
    hi = w_group.amax(dim=1).clamp(min=0)
    scale = ((hi - lo) / (2**bits - 1)).clamp(min=tiny)
    return scale, torch.round(-lo / scale)


def quantize(w, scale, zero, bits, symmetric):
    if symmetric:
        limit = 2 ** (bits - 1) - 1
        return torch.clamp(torch.round(w / scale), -limit, limit) * scale
    q = torch.clamp(torch.round(w / scale) + zero, 0, 2**bits - 1)
    return (q - zero) * scale


def prepare(W, X, damp, perm=None):
    H = 2.0 / X.shape[0] * X.T @ X
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    if perm is not None:
        W, H = W[:, perm], H[perm][:, perm]
    H += damp * torch.mean(torch.diag(H)) * torch.eye(H.shape[0], dtype=H.dtype)
    Hinv = torch.cholesky_inverse(torch.linalg.cholesky(H))
    return W, torch.linalg.cholesky(Hinv, upper=True)


def gptq(W, X, bits, group_size, symmetric, act_order, block_size, damp):
    rows, cols = W.shape
    perm = None
    if act_order:
        H = X.T @ X
        perm = torch.argsort(torch.diag(H), descending=True, stable=True)
        dead = torch.diag(H) == 0
        W0 = W.clone()
        W0[:, dead] = 0.0
        static = [
            grid(W0[:, j : j + group_size], bits, symmetric) for j in range(0, cols, group_size)
        ]
    W, Hinv = prepare(W.clone(), X, damp, perm)
    Q = torch.zeros_like(W)
    scale = zero = None
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            j = i1 + i
            if act_order:
                scale, zero = static[int(perm[j]) // group_size]
            elif j % group_size == 0:
                # As in the authors' code, a group's scales come from W, which
                # holds the updates of the earlier blocks (not of this one).
                scale, zero = grid(W[:, j : j + group_size], bits, symmetric)
            w = W1[:, i]
            q = quantize(w, scale, zero, bits, symmetric)
            Q[:, j] = q
            err = (w - q) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] @ Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    if act_order:
        Q = Q[:, torch.argsort(perm)]
    return Q


def sparsegpt(W, X, sparsity, pattern, block_size, damp):
    rows, cols = W.shape
    W, Hinv = prepare(W.clone(), X, damp)
    keep_n, group_m = (int(p) for p in pattern.split(":")) if pattern else (0, 0)
    pruned_all = torch.zeros_like(W, dtype=torch.bool)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        d = torch.diag(Hinv1)
        Err1 = torch.zeros_like(W1)
        pruned = torch.zeros(W1.shape, dtype=torch.bool)
        if not pattern:
            score = (W1**2 / d[None, :] ** 2).flatten()
            count = int(np.floor(sparsity * W1.numel()))
            pruned.view(-1)[torch.argsort(score, stable=True)[:count]] = True
        for i in range(i2 - i1):
            if pattern and i % group_m == 0:
                score = W1[:, i : i + group_m] ** 2 / d[i : i + group_m][None, :] ** 2
                drop = torch.topk(score, group_m - keep_n, dim=1, largest=False)[1]
                pruned.scatter_(1, i + drop, True)
            w = W1[:, i]
            q = torch.where(pruned[:, i], torch.zeros_like(w), w)
            err = (w - q) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] @ Hinv1[i, i:][None, :]
            W1[:, i] = q
            Err1[:, i] = err
        W[:, i1:i2] = W1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
        pruned_all[:, i1:i2] = pruned
    return W, pruned_all


def main():
    mode, in_path, out_path = sys.argv[1:4]
    data = np.load(in_path)
    W = torch.as_tensor(data["w"].T.astype(np.float64))  # pallax [in, out] -> [out, in]
    X = torch.as_tensor(data["x"].astype(np.float64))
    settings = {k: data[k].item() for k in data.files if k not in ("w", "x")}
    with torch.no_grad():
        if mode == "gptq":
            Q = gptq(W, X, **settings)
            np.savez(out_path, w=Q.T.numpy())
        else:
            settings["pattern"] = settings["pattern"] or None
            Wp, pruned = sparsegpt(W, X, **settings)
            np.savez(out_path, w=Wp.T.numpy(), pruned=pruned.T.numpy())


if __name__ == "__main__":
    main()
