"""Naive NumPy reference implementations of the losses in ``METHOD.md``.

Written straight from the formulas in METHOD.md (summarised in ``docs/method.md``) (the contract),
independently of ``erpo_jax``, so that the tests can catch bugs in the JAX code.

Rules followed everywhere in this file:

* float64 math, NumPy and the standard library only (no JAX);
* explicit Python loops over rows ``b`` and tokens ``t``, no vectorisation tricks;
* a masked position (``mask[b, t]`` False) is never read: padding may hold NaN or
  inf and must change nothing;
* rows with no valid token (and groups with no valid token) give finite results;
* arrays come back as float64 (or bool) NumPy arrays, scalars as Python floats.

Layout: ``B = P * G`` rows, prompt-major (row ``b = p * G + g``), buffers ``[B, T]``.
``n_b`` is the number of valid tokens of row ``b``; ``pos[b, t]`` is the rank of a
valid token among its row's valid tokens (``cumsum(mask) - 1``).

Degenerate statistics (the same rules as the code, docs/method.md):

* rewards: a group whose rewards are all equal gets advantage exactly 0;
* z-scores of a set of values (a group's entropies, a (prompt, bucket) set of
  progress values): the set is degenerate when it holds one value or when its
  population std is at most ``1e-6 * |mean|`` (a spread below float32
  resolution); every z-score of a degenerate set is exactly 0.

Non-finite inputs on valid tokens (METHOD.md section 2, "Numerical contract"):
the progress log-ratio ``old - ref`` is clipped to ``[-20, 20]`` and counts as 0
when it is NaN; an entropy counts as 0 when NaN and is clamped to ``[-1e6, 1e6]``.
"""

from __future__ import annotations

import math

import numpy as np

AGG_MODES = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm")
KL_ESTIMATORS = ("k1", "k2", "k3")
GATE_MODES = ("redistribute", "amplify", "none")


# --------------------------------------------------------------------------- helpers


def _f64(x):
    return np.array(x, dtype=np.float64, copy=True)


def _bool(mask):
    return np.array(mask, dtype=bool, copy=True)


def _mean_std(values, ddof=0):
    """Mean and std (``ddof`` as in numpy) of a non-empty list of Python floats.

    All-equal values give ``(values[0], 0.0)`` exactly.
    """
    n = len(values)
    if n == 0:
        raise ValueError("empty statistics")
    if all(v == values[0] for v in values):
        return float(values[0]), 0.0
    mean = math.fsum(values) / n
    if n - ddof <= 0:
        raise ValueError(f"ddof={ddof} needs more than {ddof} values, got {n}")
    var = math.fsum((v - mean) ** 2 for v in values) / (n - ddof)
    return mean, math.sqrt(var)


# A set whose population std is at most this times |mean| is degenerate.
DEGENERATE_REL_STD = 1e-6
ENTROPY_BOUND = 1e6
LOG_RATIO_CLIP = 20.0


def _set_zscores(values, eps, floor=0.0):
    """z-scores ``(v - mean) / (max(std, floor) + eps)`` of a non-empty list, population std.

    Degenerate sets (one value, or ``std <= 1e-6 * |mean|``) give all zeros.
    Returns ``(z_list, mean, std)``.
    """
    n = len(values)
    mean = math.fsum(values) / n
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / n)
    if n <= 1 or std <= DEGENERATE_REL_STD * abs(mean):
        return [0.0] * n, mean, std
    return [(v - mean) / (max(std, floor) + eps) for v in values], mean, std


def _clean_entropy(h):
    if math.isnan(h):
        return 0.0
    return _clip(h, -ENTROPY_BOUND, ENTROPY_BOUND)


def _log_sigmoid(x):
    """log(sigmoid(x)) for one Python float, finite for every finite x."""
    if x >= 0.0:
        return -math.log1p(math.exp(-x))
    return x - math.log1p(math.exp(x))


def _sigmoid(x):
    """Numerically safe logistic function for one Python float."""
    if x >= 0.0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def _sign(x):
    if x > 0.0:
        return 1.0
    if x < 0.0:
        return -1.0
    return 0.0


def _clip(x, lo, hi):
    return min(max(x, lo), hi)


def _row_counts(mask):
    """n_b for every row, by counting."""
    B, T = mask.shape
    n = [0] * B
    for b in range(B):
        for t in range(T):
            if mask[b, t]:
                n[b] += 1
    return n


def _positions(mask):
    """pos[b, t] (rank among the row's valid tokens) as a dict keyed by (b, t)."""
    B, T = mask.shape
    pos = {}
    for b in range(B):
        k = 0
        for t in range(T):
            if mask[b, t]:
                pos[(b, t)] = k
                k += 1
    return pos


def _check_group_layout(B, group_size):
    if group_size < 2:
        raise ValueError("group size must be >= 2")
    if B % group_size != 0:
        raise ValueError(f"B={B} is not a multiple of group_size={group_size}")
    return B // group_size


# ------------------------------------------------------------------ section 1: GRPO


def ref_group_advantages(rewards, normalize_std=True, ddof=1, eps=1e-6):
    """Outcome advantage per completion, METHOD.md section 1 ("Outcome advantage").

    ``A = (r - mean_g r) / (std_g r + eps)`` with ``std`` using ``ddof``; with
    ``normalize_std=False`` (Dr. GRPO) ``A = r - mean_g r``. A group whose rewards
    are all equal gets exactly 0. ``rewards`` is ``[P, G]``; returns ``[P, G]``.
    """
    r = _f64(rewards)
    if r.ndim != 2:
        raise ValueError("rewards must be [P, G]")
    P, G = r.shape
    if G < 2:
        raise ValueError("group size 1 is an error (METHOD.md section 1)")
    out = np.zeros((P, G), dtype=np.float64)
    for p in range(P):
        vals = [float(r[p, g]) for g in range(G)]
        if all(v == vals[0] for v in vals):
            continue  # exactly 0
        mean, std = _mean_std(vals, ddof=ddof)
        for g in range(G):
            if normalize_std:
                out[p, g] = (vals[g] - mean) / (std + eps)
            else:
                out[p, g] = vals[g] - mean
    return out


def ref_token_pg(
    logp,
    old_logp,
    adv_tok,
    mask,
    clip_eps=0.2,
    clip_eps_high=None,
    clip_c=None,
    ref_logp=None,
    kl_coef=0.0,
    kl_estimator="k3",
):
    """Per-token clipped surrogate plus KL, METHOD.md section 1 ("Token-level clipped
    surrogate").

    ``ratio = exp(clip(logp - old_logp, -20, 20))``;
    ``pg = max(-A*ratio, -A*clip(ratio, 1-clip_eps, 1+eps_high))`` with
    ``eps_high = clip_eps`` unless ``clip_eps_high`` is given; dual clip for
    ``A < 0``: ``pg = min(pg, -clip_c*A)``; KL with ``d = ref_logp - logp``:
    k1 = -d, k2 = d^2/2, k3 = exp(d) - d - 1; ``l = pg + kl_coef*kl``.
    Returns ``[B, T]`` with 0 on masked positions (never read there).
    """
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown kl_estimator {kl_estimator!r}")
    logp = _f64(logp)
    old_logp = _f64(old_logp)
    adv = _f64(adv_tok)
    mask = _bool(mask)
    use_kl = kl_coef != 0.0
    if use_kl:
        if ref_logp is None:
            raise ValueError("kl_coef != 0 needs ref_logp")
        ref = _f64(ref_logp)
    eps_low = float(clip_eps)
    eps_high = float(clip_eps if clip_eps_high is None else clip_eps_high)
    B, T = mask.shape
    out = np.zeros((B, T), dtype=np.float64)
    for b in range(B):
        for t in range(T):
            if not mask[b, t]:
                continue
            a = float(adv[b, t])
            log_ratio = _clip(float(logp[b, t]) - float(old_logp[b, t]), -20.0, 20.0)
            ratio = math.exp(log_ratio)
            clipped = _clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
            pg = max(-a * ratio, -a * clipped)
            if clip_c is not None and a < 0.0:
                pg = min(pg, -float(clip_c) * a)
            loss = pg
            if use_kl:
                d = float(ref[b, t]) - float(logp[b, t])
                if kl_estimator == "k1":
                    kl = -d
                elif kl_estimator == "k2":
                    kl = 0.5 * d * d
                else:
                    kl = math.exp(d) - d - 1.0
                loss = pg + float(kl_coef) * kl
            out[b, t] = loss
    return out


def ref_aggregate(l, mask, agg, max_len=None):  # noqa: E741 (name fixed by the brief)
    """Aggregate per-token losses into a scalar, METHOD.md section 1 (aggregation table).

    * ``token_mean``: ``sum(M*l) / max(sum M, 1)``
    * ``seq_mean_token_mean``: ``(1/B) sum_b [sum_t M*l / max(n_b, 1)]``
    * ``seq_mean_token_sum``: ``(1/B) sum_b sum_t M*l``
    * ``seq_mean_token_sum_norm``: ``sum(M*l) / (B*L)``, ``L = max_len`` (default T)
    """
    if agg not in AGG_MODES:
        raise ValueError(f"unknown agg {agg!r}")
    losses = _f64(l)
    mask = _bool(mask)
    B, T = mask.shape
    row_sums = []
    row_counts = []
    for b in range(B):
        vals = []
        for t in range(T):
            if not mask[b, t]:
                continue
            vals.append(float(losses[b, t]))
        row_sums.append(math.fsum(vals))
        row_counts.append(len(vals))
    if agg == "token_mean":
        return math.fsum(row_sums) / max(sum(row_counts), 1)
    if agg == "seq_mean_token_mean":
        per_row = [row_sums[b] / max(row_counts[b], 1) for b in range(B)]
        return math.fsum(per_row) / B
    if agg == "seq_mean_token_sum":
        return math.fsum(row_sums) / B
    L = T if max_len is None else max_len
    return math.fsum(row_sums) / (B * L)


def ref_policy_loss(
    logp,
    old_logp,
    adv_tok,
    mask,
    clip_eps=0.2,
    clip_eps_high=None,
    clip_c=None,
    agg="token_mean",
    max_len=None,
    ref_logp=None,
    kl_coef=0.0,
    kl_estimator="k3",
):
    """Policy loss for a token advantage, METHOD.md section 1:
    ``ref_aggregate(ref_token_pg(...), mask, agg, max_len)``."""
    per_token = ref_token_pg(
        logp,
        old_logp,
        adv_tok,
        mask,
        clip_eps=clip_eps,
        clip_eps_high=clip_eps_high,
        clip_c=clip_c,
        ref_logp=ref_logp,
        kl_coef=kl_coef,
        kl_estimator=kl_estimator,
    )
    return ref_aggregate(per_token, mask, agg, max_len=max_len)


def _broadcast_row_adv(adv_row, mask):
    """A[b, t] = adv_row[b] on valid tokens, 0 on masked ones."""
    mask = _bool(mask)
    B, T = mask.shape
    out = np.zeros((B, T), dtype=np.float64)
    for b in range(B):
        for t in range(T):
            if mask[b, t]:
                out[b, t] = float(adv_row[b])
    return out


def ref_grpo_loss(logp, old_logp, rewards, mask, normalize_std=True, ddof=1, eps=1e-6, **policy_kw):
    """GRPO loss, METHOD.md section 1: group advantages of ``rewards [P, G]``,
    flattened prompt-major to ``[B]`` (``b = p*G + g``), broadcast over the row's
    tokens, then ``ref_policy_loss``."""
    adv = ref_group_advantages(rewards, normalize_std=normalize_std, ddof=ddof, eps=eps)
    P, G = adv.shape
    mask = _bool(mask)
    if mask.shape[0] != P * G:
        raise ValueError("mask rows must equal P*G")
    adv_row = [float(adv[p, g]) for p in range(P) for g in range(G)]  # prompt-major
    adv_tok = _broadcast_row_adv(adv_row, mask)
    return ref_policy_loss(logp, old_logp, adv_tok, mask, **policy_kw)


# ------------------------------------------------------------------ section 2: ERPO


def ref_entropy_gate(entropy, mask, group_size, gamma=5.0, eps=1e-6, log_space=False):
    """Entropy-aware gate, METHOD.md section 2 (i) (Eq. 8).

    ``z = (H - mean_group(H)) / (std_group(H) + eps)`` with the mean and the
    POPULATION std over all valid tokens of the ``group_size`` rows of one prompt
    (a degenerate group gives z = 0); ``W = sigmoid(gamma * z)``, or
    ``log W = log_sigmoid(gamma * z)`` with ``log_space``; 0 on masked positions.
    Entropies are cleaned first (NaN -> 0, clamped to +-1e6).
    """
    H = _f64(entropy)
    mask = _bool(mask)
    B, T = mask.shape
    P = _check_group_layout(B, group_size)
    G = group_size
    W = np.zeros((B, T), dtype=np.float64)
    for p in range(P):
        members = [(b, t) for b in range(p * G, (p + 1) * G) for t in range(T) if mask[b, t]]
        if not members:
            continue  # nothing to compute
        vals = [_clean_entropy(float(H[b, t])) for (b, t) in members]
        zs, _, _ = _set_zscores(vals, eps)
        for (b, t), z in zip(members, zs, strict=True):
            W[b, t] = _log_sigmoid(gamma * z) if log_space else _sigmoid(gamma * z)
    return W


def ref_progress_signal(old_logp, ref_logp, mask, beta=0.1):
    """Implicit progress, METHOD.md section 2 (ii) (Eq. 7).

    ``s = beta * clip(old_logp - ref_logp, -20, 20)`` on valid tokens (a NaN
    log-ratio counts as 0), 0 on masked positions.
    """
    old = _f64(old_logp)
    ref = _f64(ref_logp)
    mask = _bool(mask)
    B, T = mask.shape
    s = np.zeros((B, T), dtype=np.float64)
    for b in range(B):
        for t in range(T):
            if mask[b, t]:
                d = float(old[b, t]) - float(ref[b, t])
                d = 0.0 if math.isnan(d) else _clip(d, -LOG_RATIO_CLIP, LOG_RATIO_CLIP)
                s[b, t] = beta * d
    return s


def _bucket_of(mask, num_buckets):
    """k(b, t) = min((K * pos[b, t]) // n_b, K - 1) (exact integers), keyed by (b, t)."""
    B, T = mask.shape
    n = _row_counts(mask)
    pos = _positions(mask)
    K = int(num_buckets)
    return {
        (b, t): min((K * pos[(b, t)]) // n[b], K - 1)
        for b in range(B)
        for t in range(T)
        if mask[b, t]
    }


def ref_bucket_stats(signal, mask, group_size, num_buckets=10, eps=1e-6, std_floor=0.0):
    """Bucket-based implicit normalization, METHOD.md section 2 (ii) (Eq. 9).

    Bucket ``k(b, t) = min((K * pos[b, t]) // n_b, K - 1)`` (exact integers);
    ``s_hat = (s - mean_{group,k}(s)) / (max(std_{group,k}(s), std_floor) + eps)``
    with mean and POPULATION std over the valid tokens of the prompt's
    ``group_size`` rows that fall in the same bucket; a degenerate set gives 0.
    Returns ``(s_hat [B, T], stds)`` with ``stds`` the population std of every
    non-empty (prompt, bucket) set.
    """
    s = _f64(signal)
    mask = _bool(mask)
    B, T = mask.shape
    P = _check_group_layout(B, group_size)
    G = group_size
    K = int(num_buckets)
    if K < 1:
        raise ValueError("num_buckets must be >= 1")
    bucket = _bucket_of(mask, K)
    out = np.zeros((B, T), dtype=np.float64)
    stds = []
    for p in range(P):
        rows = range(p * G, (p + 1) * G)
        for k in range(K):
            members = [(b, t) for b in rows for t in range(T) if mask[b, t] and bucket[(b, t)] == k]
            if not members:
                continue
            vals = [float(s[b, t]) for (b, t) in members]
            zs, _, std = _set_zscores(vals, eps, floor=std_floor)
            stds.append(std)
            for (b, t), z in zip(members, zs, strict=True):
                out[b, t] = z
    return out, stds


def ref_bucket_normalize(signal, mask, group_size, num_buckets=10, eps=1e-6, std_floor=0.0):
    """``s_hat`` of :func:`ref_bucket_stats`."""
    return ref_bucket_stats(signal, mask, group_size, num_buckets, eps, std_floor)[0]


def ref_erpo_token_terms(
    rewards,
    entropy,
    mask,
    old_logp=None,
    ref_logp=None,
    logp=None,
    gamma=5.0,
    num_buckets=10,
    beta=0.1,
    eta=0.2,
    gate_mode="redistribute",
    psi_gate=True,
    progress_std_floor=0.0,
    progress_source="old",
    eps=1e-6,
    normalize_std=True,
    ddof=1,
):
    """Every ERPO term, METHOD.md section 2 (i)-(iii) and "Final token advantage".

    ``A_b`` from ``ref_group_advantages``; ``W`` from ``ref_entropy_gate``; the
    progress signal ``s`` (Eq. 7) from ``old_logp`` (``progress_source="old"``)
    or ``logp`` (``"current"``) when ``eta != 0`` or both inputs are given,
    ``s_hat`` from ``ref_bucket_normalize`` and ``Psi = W * sign(A_b) * s_hat``
    (``sign(A_b) * s_hat`` with ``psi_gate=False``; sign(0) = 0), else all 0.
    ``omega``: "redistribute" ``n_b * softmax_t(log_sigmoid(gamma * z))`` over
    the row's valid tokens, "amplify" ``1 + W``, "none" ``1``.
    ``A_tok = A_b*omega + eta*Psi``. Everything is 0 on masked positions.
    Returns a dict with ``gate``, ``progress``, ``progress_hat``, ``psi``,
    ``omega``, ``adv_tok`` (each ``[B, T]``), ``adv_seq`` (``[B]``) and
    ``bucket_stds`` (the population std of every non-empty (prompt, bucket) set).
    """
    if gate_mode not in GATE_MODES:
        raise ValueError(f"unknown gate_mode {gate_mode!r}")
    if progress_source not in ("old", "current"):
        raise ValueError(f"unknown progress_source {progress_source!r}")
    adv = ref_group_advantages(rewards, normalize_std=normalize_std, ddof=ddof, eps=eps)
    P, G = adv.shape
    mask = _bool(mask)
    B, T = mask.shape
    if B != P * G:
        raise ValueError("mask rows must equal P*G")
    A_row = [float(adv[p, g]) for p in range(P) for g in range(G)]  # prompt-major
    W = ref_entropy_gate(entropy, mask, G, gamma=gamma, eps=eps)
    log_W = ref_entropy_gate(entropy, mask, G, gamma=gamma, eps=eps, log_space=True)

    source = old_logp if progress_source == "old" else logp
    s = np.zeros((B, T), dtype=np.float64)
    s_hat = np.zeros((B, T), dtype=np.float64)
    Psi = np.zeros((B, T), dtype=np.float64)
    stds = []
    if eta != 0.0 or (source is not None and ref_logp is not None):
        if source is None or ref_logp is None:
            raise ValueError("eta != 0 needs the progress source and ref_logp")
        s = ref_progress_signal(source, ref_logp, mask, beta=beta)
        s_hat, stds = ref_bucket_stats(
            s, mask, G, num_buckets=num_buckets, eps=eps, std_floor=progress_std_floor
        )
        for b in range(B):
            for t in range(T):
                if mask[b, t]:
                    gate = W[b, t] if psi_gate else 1.0
                    Psi[b, t] = gate * _sign(A_row[b]) * s_hat[b, t]

    n = _row_counts(mask)
    omega = np.zeros((B, T), dtype=np.float64)
    out = np.zeros((B, T), dtype=np.float64)
    for b in range(B):
        if n[b] == 0:
            continue
        valid = [t for t in range(T) if mask[b, t]]
        top = max(float(log_W[b, t]) for t in valid)
        total = math.fsum(math.exp(float(log_W[b, t]) - top) for t in valid)
        for t in valid:
            if gate_mode == "redistribute":
                omega[b, t] = n[b] * math.exp(float(log_W[b, t]) - top) / total
            elif gate_mode == "amplify":
                omega[b, t] = 1.0 + W[b, t]
            else:
                omega[b, t] = 1.0
            out[b, t] = A_row[b] * omega[b, t] + eta * Psi[b, t]
    return {
        "gate": W,
        "progress": s,
        "progress_hat": s_hat,
        "psi": Psi,
        "omega": omega,
        "adv_tok": out,
        "adv_seq": np.array(A_row, dtype=np.float64),
        "bucket_stds": stds,
    }


def ref_erpo_token_advantages(rewards, entropy, mask, eta=0.2, **kw):
    """ERPO token advantage, METHOD.md section 2: ``adv_tok`` of ``ref_erpo_token_terms``
    (which computes the progress signal only when ``eta != 0``)."""
    if eta == 0.0:
        kw = dict(kw, old_logp=None, ref_logp=None, logp=None)
    return ref_erpo_token_terms(rewards, entropy, mask, eta=eta, **kw)["adv_tok"]


_ERPO_KW = (
    "gamma",
    "num_buckets",
    "beta",
    "eta",
    "gate_mode",
    "psi_gate",
    "progress_std_floor",
    "progress_source",
    "eps",
    "normalize_std",
    "ddof",
)


def ref_erpo_loss(logp, old_logp, rewards, entropy, mask, ref_logp=None, **kw):
    """ERPO loss, METHOD.md section 2: section 1's policy loss with ``A = A_tok`` from
    ``ref_erpo_token_advantages``. ``old_logp`` (or ``logp`` with
    ``progress_source="current"``) feeds the progress signal; ``ref_logp`` feeds
    both the progress signal and (if ``kl_coef != 0``) the KL."""
    erpo_kw = {k: v for k, v in kw.items() if k in _ERPO_KW}
    policy_kw = {k: v for k, v in kw.items() if k not in _ERPO_KW}
    adv_tok = ref_erpo_token_advantages(
        rewards, entropy, mask, old_logp=old_logp, ref_logp=ref_logp, logp=logp, **erpo_kw
    )
    return ref_policy_loss(logp, old_logp, adv_tok, mask, ref_logp=ref_logp, **policy_kw)


def ref_erpo_aux(logp, old_logp, rewards, entropy, mask, ref_logp=None, **kw):
    """ERPO's own diagnostics (``ErpoAux`` fields after the policy ones), from the
    definitions in ``erpo_jax.losses.ErpoAux``'s documentation. Progress fields are
    0 when ``eta == 0`` (the progress signal is not computed)."""
    erpo_kw = {k: v for k, v in kw.items() if k in _ERPO_KW}
    eta = erpo_kw.get("eta", 0.2)
    src = {"old_logp": old_logp, "ref_logp": ref_logp, "logp": logp}
    if eta == 0.0:
        src = {}
    terms = ref_erpo_token_terms(rewards, entropy, mask, **src, **erpo_kw)
    mask = _bool(mask)
    H = _f64(entropy)
    B, T = mask.shape
    valid = [(b, t) for b in range(B) for t in range(T) if mask[b, t]]
    nv = max(len(valid), 1)
    A = terms["adv_seq"]
    ents = [_clean_entropy(float(H[b, t])) for (b, t) in valid]
    directed = [(b, t) for (b, t) in valid if A[b] != 0.0]
    flips = [(b, t) for (b, t) in directed if _sign(terms["adv_tok"][b, t]) != _sign(float(A[b]))]
    effs = []
    for b in range(B):
        om = [terms["omega"][b, t] for t in range(T) if mask[b, t]]
        if om:
            effs.append(math.fsum(om) ** 2 / (len(om) * math.fsum(o * o for o in om)))
    progress_on = eta != 0.0
    stds = terms["bucket_stds"]
    return {
        "gate_mean": math.fsum(terms["gate"][b, t] for (b, t) in valid) / nv,
        "cdp_frac": sum(terms["gate"][b, t] > 0.5 for (b, t) in valid) / nv,
        "entropy_mean": math.fsum(ents) / nv,
        "entropy_p90": float(np.quantile(ents, 0.9)) if ents else 0.0,
        "psi_abs_mean": math.fsum(abs(terms["psi"][b, t]) for (b, t) in valid) / nv
        if progress_on
        else 0.0,
        "adv_seq_abs_mean": math.fsum(abs(a) for a in A) / len(A),
        "sign_flip_frac": len(flips) / max(len(directed), 1),
        "omega_max": max((terms["omega"][b, t] for (b, t) in valid), default=0.0),
        "eff_token_frac": math.fsum(effs) / max(len(effs), 1),
        "progress_abs_mean": math.fsum(abs(terms["progress"][b, t]) for (b, t) in valid) / nv
        if progress_on
        else 0.0,
        "progress_std_mean": math.fsum(stds) / max(len(stds), 1) if progress_on else 0.0,
    }


# ------------------------------------------------------- section 3: related methods


def _power_mean(values, p):
    """((1/n) sum v^p)^(1/p) of positive floats; geometric mean (log space) at p == 0."""
    n = len(values)
    if p == 0:
        return math.exp(math.fsum(math.log(v) for v in values) / n)
    return (math.fsum(v**p for v in values) / n) ** (1.0 / p)


def ref_holder_loss(
    logp,
    old_logp,
    adv_seq,
    mask,
    p,
    clip_eps=0.2,
    clip_level="sequence",
    clip_eps_high=None,
    denominator=None,
):
    """HolderPO loss, METHOD.md section 3 (HolderPO).

    ``log_ratio_t = clip(logp - old_logp, -20, 20)``; ``clip(x)`` below is
    ``clip(x, 1-eps_low, 1+eps_high)`` with ``eps_low = clip_eps`` and
    ``eps_high = clip_eps_high`` (default ``clip_eps``).

    * ``clip_level="sequence"``: ``rho_b = ((1/n_b) sum_t exp(p*log_ratio_t))^(1/p)``
      (``exp(mean_t log_ratio_t)`` at p = 0);
      ``l_b = -min(rho_b*A_b, clip(rho_b)*A_b)``.
    * ``clip_level="token"``: ``r_t = exp(log_ratio_t)``, ``e_t = min(r_t, clip(r_t))``
      if ``A_b >= 0`` else ``max(r_t, clip(r_t))``; ``rho_b`` = power mean of ``e_t``
      (same p rule); ``l_b = -rho_b*A_b``.

    Loss ``= (1/D) sum_{b: n_b > 0} l_b`` with ``D = max(denominator, 1)``,
    ``denominator`` defaulting to B (empty rows add 0 but count in B).
    """
    if clip_level not in ("sequence", "token"):
        raise ValueError(f"unknown clip_level {clip_level!r}")
    logp = _f64(logp)
    old_logp = _f64(old_logp)
    A = _f64(adv_seq)
    mask = _bool(mask)
    B, T = mask.shape
    p = float(p)
    lo = 1.0 - clip_eps
    hi = 1.0 + (clip_eps if clip_eps_high is None else clip_eps_high)
    losses = []
    for b in range(B):
        log_ratios = []
        for t in range(T):
            if not mask[b, t]:
                continue
            log_ratios.append(_clip(float(logp[b, t]) - float(old_logp[b, t]), -20.0, 20.0))
        if not log_ratios:
            continue
        a = float(A[b])
        if clip_level == "sequence":
            if p == 0:
                rho = math.exp(math.fsum(log_ratios) / len(log_ratios))
            else:
                rho = (math.fsum(math.exp(p * lr) for lr in log_ratios) / len(log_ratios)) ** (
                    1.0 / p
                )
            losses.append(-min(rho * a, _clip(rho, lo, hi) * a))
        else:
            eff = []
            for lr in log_ratios:
                r = math.exp(lr)
                c = _clip(r, lo, hi)
                eff.append(min(r, c) if a >= 0.0 else max(r, c))
            rho = _power_mean(eff, p)
            losses.append(-rho * a)
    return math.fsum(losses) / (B if denominator is None else max(float(denominator), 1.0))


def ref_high_entropy_mask(entropy, mask, top_fraction=0.2):
    """High-entropy minority tokens ("80/20"), METHOD.md section 3.

    ``tau = numpy.quantile(valid entropies of the whole batch, 1 - top_fraction)``
    (numpy's default 'linear' method); keep valid tokens with ``H >= tau``.
    No valid token: all False.
    """
    H = _f64(entropy)
    mask = _bool(mask)
    B, T = mask.shape
    vals = [float(H[b, t]) for b in range(B) for t in range(T) if mask[b, t]]
    out = np.zeros((B, T), dtype=bool)
    if not vals:
        return out
    tau = float(np.quantile(np.array(vals, dtype=np.float64), 1.0 - top_fraction))
    for b in range(B):
        for t in range(T):
            if mask[b, t] and float(H[b, t]) >= tau:
                out[b, t] = True
    return out


def ref_arca_token_weights(residual_norm, mask, power=2.0, eps=1e-8):
    """ARCA token weights, METHOD.md section 3 (ARCA).

    Per row: ``w_t = (alpha_t + eps)^power / sum_{valid t'} (alpha_t' + eps)^power``;
    0 on masked positions; an all-masked row is all zeros.
    """
    alpha = _f64(residual_norm)
    mask = _bool(mask)
    B, T = mask.shape
    out = np.zeros((B, T), dtype=np.float64)
    for b in range(B):
        num = {}
        for t in range(T):
            if mask[b, t]:
                num[t] = (float(alpha[b, t]) + eps) ** power
        if not num:
            continue
        den = math.fsum(num.values())
        for t, v in num.items():
            out[b, t] = v / den
    return out


def ref_arca_token_advantages(adv_seq, residual_norm, mask, power=2.0, eps=1e-8):
    """ARCA token advantage, METHOD.md section 3 (ARCA): ``A_b * n_b * w_t``
    (so that ``seq_mean_token_mean`` gives ``-mean_b A_b sum_t w_t logp_t``)."""
    A = _f64(adv_seq)
    mask = _bool(mask)
    w = ref_arca_token_weights(residual_norm, mask, power=power, eps=eps)
    n = _row_counts(mask)
    B, T = mask.shape
    out = np.zeros((B, T), dtype=np.float64)
    for b in range(B):
        for t in range(T):
            if mask[b, t]:
                out[b, t] = float(A[b]) * n[b] * w[b, t]
    return out
