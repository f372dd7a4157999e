"""Merging teachers into one starting student (the cold start `merge`; docs/method.md#cold-start).

Per tensor, tau_k = theta_k - base, weights w_k:
    linear           theta = sum_k w_k theta_k / sum_k w_k
    task_arithmetic  theta = base + scale * sum_k w_k tau_k                       (Ilharco et al. 2023)
    ties             theta = base + scale * disjoint_mean_k(trim(tau_k))          (TIES, Yadav et al. 2023)
LoRA teachers (adapters A: (r, in), B: (out, r), delta W = (alpha / r) B A): `product` merges the deltas B A by the
rule above (with base 0); `factors` merges the A's and the B's separately (the reference code), and since
mean(B) mean(A) != mean(B A) the two differ. Both return the full-weight delta to fold into the base.
"""

from __future__ import annotations

import torch
from torch import Tensor

from flowopd.spec.choices import LORA_MERGES, MERGE_MODES


# ---------------------------------------------------------------- merging state dicts
def ties_trim(tau: Tensor, density: float) -> Tensor:
    """Keep the top `density` share of entries by magnitude (at least one), zero the rest."""
    n = tau.numel()
    k = max(1, round(density * n))
    if k >= n:
        return tau.clone()
    flat = tau.flatten()
    keep = flat.abs().topk(k).indices
    trimmed = torch.zeros_like(flat)
    trimmed[keep] = flat[keep]
    return trimmed.view_as(tau)


def ties_merge(taus: list[Tensor], weights: Tensor, density: float) -> Tensor:
    """TIES on task vectors: trim each, elect gamma = sign(sum_k w_k trim(tau_k)) per entry, then the disjoint mean
    sum_k w_k tau_k [sign(tau_k) = gamma] / sum_k w_k [sign(tau_k) = gamma] (0 where no task vector agrees)."""
    trimmed = torch.stack([ties_trim(tau, density) for tau in taus])
    w = weights.reshape(-1, *[1] * (trimmed.ndim - 1)).to(trimmed)
    gamma = torch.sign((w * trimmed).sum(0))
    agree = (torch.sign(trimmed) == gamma) & (trimmed != 0)
    numerator = (w * trimmed * agree).sum(0)
    denominator = (w * agree).sum(0)
    return torch.where(denominator > 0, numerator / denominator.clamp_min(1e-30), torch.zeros_like(numerator))


def merge_states(base: dict | None, teachers: list[dict], weights, mode: str = "linear", density: float = 0.2,
                 scale: float = 1.0) -> dict[str, Tensor]:
    """Merge teacher state dicts (all with the same keys and shapes) by `mode`; see the module docstring.

    linear ignores `base` (may be None) and takes no `scale`; weights need not sum to 1 (linear normalises them,
    task arithmetic uses them as given, TIES only through their ratios). Non-float tensors must agree.
    """
    if mode not in MERGE_MODES:
        raise ValueError(f"merge mode must be one of {', '.join(MERGE_MODES)}, got {mode!r}")
    if not teachers or len(teachers) != len(weights):
        raise ValueError(f"{len(teachers)} teachers but {len(weights)} weights")
    w = torch.as_tensor([float(x) for x in weights], dtype=torch.float64)
    if (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"merge weights must be >= 0 with a positive sum, got {w.tolist()}")
    if mode == "linear" and scale != 1.0:
        raise ValueError("scale applies to task_arithmetic and ties; linear averages the weights (scale must be 1)")
    if mode != "linear" and base is None:
        raise ValueError(f"{mode} merges task vectors theta_k - base: pass the base state dict")
    keys = list(teachers[0])
    for i, state in enumerate(teachers[1:], 1):
        if set(state) != set(keys):
            raise ValueError(f"teacher {i} has other keys than teacher 0: {sorted(set(state) ^ set(keys))[:5]}")
    if base is not None and set(base) != set(keys):
        raise ValueError(f"the base has other keys than the teachers: {sorted(set(base) ^ set(keys))[:5]}")
    merged = {}
    for key in keys:
        tensors = [state[key] for state in teachers]
        if any(t.shape != tensors[0].shape for t in tensors) or (base is not None and base[key].shape != tensors[0].shape):
            raise ValueError(f"{key}: shapes differ between the models")
        same = all(torch.equal(t, tensors[0]) for t in tensors[1:])
        if not tensors[0].is_floating_point() and not same:
            raise ValueError(f"{key}: non-float tensors differ between the teachers")
        if not tensors[0].is_floating_point() or same and (mode == "linear" or torch.equal(tensors[0], base[key])):
            merged[key] = tensors[0].clone()  # frozen parts (e.g. the text encoder) stay bit-exact
            continue
        stacked = torch.stack([t.double() for t in tensors])
        if mode == "linear":
            value = torch.einsum("k,k...->...", w / w.sum(), stacked)
        else:
            taus = stacked - base[key].double()
            if mode == "task_arithmetic":
                delta = torch.einsum("k,k...->...", w, taus)
            else:
                delta = ties_merge(list(taus), w, density)
            value = base[key].double() + scale * delta
        merged[key] = value.to(tensors[0].dtype)
    return merged


# ---------------------------------------------------------------- LoRA adapters
def lora_factors(adapter: dict[str, Tensor]) -> dict[str, tuple[Tensor, Tensor]]:
    """peft adapter state dict -> {module: (A, B)}; keys `<module>.lora_A[.<name>].weight` and `..lora_B..`."""
    pairs: dict[str, dict[str, Tensor]] = {}
    for key, value in adapter.items():
        for factor in ("A", "B"):
            marker = f".lora_{factor}."
            if marker in key:
                pairs.setdefault(key.split(marker)[0], {})[factor] = value
                break
        else:
            raise ValueError(f"{key}: not a LoRA factor (lora_A / lora_B); only plain LoRA adapters merge")
    incomplete = [m for m, p in pairs.items() if set(p) != {"A", "B"}]
    if incomplete:
        raise ValueError(f"modules without both lora_A and lora_B: {incomplete[:5]}")
    return {module: (p["A"], p["B"]) for module, p in pairs.items()}


def lora_delta(adapter: dict[str, Tensor], scaling: float) -> dict[str, Tensor]:
    """{<module>.weight: scaling * B @ A}, the full-weight change the adapter makes (scaling = alpha / rank)."""
    return {f"{module}.weight": (scaling * (b.double() @ a.double())).to(a.dtype)
            for module, (a, b) in lora_factors(adapter).items()}


def merge_lora(adapters: list[dict], weights, mode: str = "linear", density: float = 0.2, scale: float = 1.0,
               lora_merge: str = "product", scaling=1.0) -> dict[str, Tensor]:
    """Merge LoRA teachers into one full-weight delta {<module>.weight: dW} to add to the base weights.

    product: dW = merge_k((alpha_k / r_k) B_k A_k), the rule applied to each teacher's delta (base delta 0);
    factors: dW = (alpha / r) merge_k(B_k) merge_k(A_k) (the reference code; needs one alpha / r for all).
    `scaling`: alpha / rank, one float or one per adapter.
    """
    scalings = [float(s) for s in scaling] if isinstance(scaling, (list, tuple)) else [float(scaling)] * len(adapters)
    if len(scalings) != len(adapters):
        raise ValueError(f"{len(adapters)} adapters but {len(scalings)} scalings")
    if lora_merge == "product":
        deltas = [lora_delta(a, s) for a, s in zip(adapters, scalings)]
        zero = None if mode == "linear" else {k: torch.zeros_like(v) for k, v in deltas[0].items()}
        return merge_states(zero, deltas, weights, mode, density, scale)
    if lora_merge == "factors":
        if len(set(scalings)) != 1:
            raise ValueError(f"merging factors needs one alpha / rank for all adapters, got {scalings}")
        zero = None if mode == "linear" else {k: torch.zeros_like(v) for k, v in adapters[0].items()}
        return lora_delta(merge_states(zero, adapters, weights, mode, density, scale), scalings[0])
    raise ValueError(f"lora_merge must be one of {', '.join(LORA_MERGES)}, got {lora_merge!r}")


def merged_adapter(adapters: list[dict], configs: list[dict], weights, mode: str = "linear", density: float = 0.2,
                   scale: float = 1.0, lora_merge: str = "product") -> tuple[dict[str, Tensor], dict]:
    """The LoRA teachers merged into ONE adapter, for a student on the shared frozen sd3 base. -> (state, config)

    product, linear / task_arithmetic: exact, by concatenation: A = [A_1; ...; A_K], B = [c_1 B_1 | ... | c_K B_K],
    c_k = (w_k / sum w, or scale w_k) alpha_k / r_k, and alpha = rank = sum r_k, so B A = merge_k((alpha_k / r_k)
    B_k A_k) as merge_lora computes it; the student then trains an adapter of rank sum r_k.
    factors: the A's and the B's merged separately by any mode (the reference code), rank r, the teachers' alpha.
    product with ties merges full deltas element-wise, which no low-rank adapter holds: refused.
    """
    w = [float(x) for x in weights]
    targets = {tuple(sorted(c["target_modules"])) for c in configs}
    if len(targets) != 1:
        raise ValueError(f"the teachers' adapters target different modules: {sorted(targets)}")
    if lora_merge == "factors":
        if len({c["alpha"] / c["rank"] for c in configs}) != 1 or len({c["rank"] for c in configs}) != 1:
            raise ValueError("merging factors needs one rank and alpha for all adapters")
        zero = None if mode == "linear" else {k: torch.zeros_like(v) for k, v in adapters[0].items()}
        return merge_states(zero, adapters, w, mode, density, scale), dict(configs[0], dropout=0.0)
    if lora_merge != "product":
        raise ValueError(f"lora_merge must be one of {', '.join(LORA_MERGES)}, got {lora_merge!r}")
    if mode == "ties":
        raise ValueError("a TIES merge of LoRA products is not low-rank, so no adapter holds it; for an sd3 student "
                         "use mode linear or task_arithmetic, or lora_merge: factors")
    if min(w) < 0 or sum(w) <= 0 or (mode == "linear" and scale != 1.0):
        raise ValueError(f"merge weights must be >= 0 with a positive sum (got {w}) and linear takes no scale")
    coefficients = [x / sum(w) for x in w] if mode == "linear" else [scale * x for x in w]
    factors = [lora_factors(a) for a in adapters]
    state = {}
    for module in factors[0]:
        a_k, b_k = zip(*(f[module] for f in factors), strict=True)
        state[f"{module}.lora_A.weight"] = torch.cat(a_k, dim=0)
        state[f"{module}.lora_B.weight"] = torch.cat(
            [c * cfg["alpha"] / cfg["rank"] * b for c, cfg, b in zip(coefficients, configs, b_k, strict=True)], dim=1)
    rank = sum(c["rank"] for c in configs)
    return state, dict(configs[0], rank=rank, alpha=float(rank), dropout=0.0)


def fold_delta(base: dict[str, Tensor], delta: dict[str, Tensor]) -> dict[str, Tensor]:
    """base + delta on the delta's keys (a merged LoRA delta into full weights)."""
    missing = [k for k in delta if k not in base]
    if missing:
        raise ValueError(f"delta keys not in the base: {missing[:5]}")
    return {k: (v + delta[k].to(v)) if k in delta else v.clone() for k, v in base.items()}
