"""Synthetic CTR stream drawn from a hidden teacher, so the best achievable logloss is known.

Every example is a pure function of ``(cfg.seed, example_id)``: all randomness comes from a
vectorised counter-based hash (splitmix64 over uint64), so the stream does not depend on how
indices are split over processes, batches or threads, and nothing vocabulary-sized is stored.

Per example (``F = num_sparse`` item features, plus the ``user`` column when ``user_id``):

- item id of feature ``f``: Zipf-like over ``[0, vocab_f)`` with exponent ``s_f``
  (``zipf_exponent``: one for all columns or one per column), drawn by the inverse CDF of a
  continuous power law on ``[1, vocab_f + 1)`` then floored (O(1) memory, fine for
  vocabularies up to 1e9). Id 0 is the most frequent, id 1 the next, and so on.
- user id: the same law over ``[0, num_users)``; the last ``sparse`` column and ``user_id``.
- dense: ``num_dense`` standard normals (Box-Muller), float32.
- teacher: ``logit = bias + scale * sum_t sqrt(w_t) term_t / std(term_t)`` over
  ``teacher_terms``: ``linear``, the sum of first-order weights per (feature, id) (the user
  column's weight is the per-user bias); ``fm``, the factorization-machine sum over column
  pairs of the dot products of rank ``teacher_rank`` latent vectors per (feature, id);
  ``dense_mlp``, a fixed random tanh MLP (``teacher_hidden`` units) over the dense features;
  ``deep``, a fixed random tanh MLP (``teacher_hidden`` units, saturated) over the
  concatenation ``x`` of every column's latent vector and the dense features -- interactions
  of every order, which a pairwise (FM/DLRM-style) model cannot represent; ``capacity``,
  ``sum_k c_k tanh(x u_k + b_k)`` over ``capacity_width`` random units whose output weights
  fall as a power law, ``|c_k| = k^-gamma`` (``capacity_spectrum``), random signs. Weights and
  latent vectors are hashed from ``(seed, feature, id, k)``. Each term is rescaled to unit std
  on a fixed calibration sample; the weights ``w_t`` are equal (``1 / #terms``) or give the
  capacity term ``capacity_share`` of the summed variance and the rest equal shares, so the
  non-bias part has std about ``teacher_logit_scale`` (``sequence_share`` likewise fixes the
  sequence term's share); ``bias`` is then set by bisection so
  the mean CTR on that sample equals ``base_ctr``.
- events (``events = L > 0``): each example has ``n`` events, ``n`` uniform in
  ``[event_min, L]``, oldest first, padded to ``L``. Event ``j`` has a type ``tau_j`` (type
  ``k`` with probability ~ ``0.3^k``: impressions, then clicks, then conversions), an item
  ``i_j`` (the example's target item -- its column-C1 id -- with probability
  ``event_match_prob``, else a draw of C1's law) and an age ``a_j`` in hours (the sum of the
  exponential gaps, mean ``event_gap_hours``, from it to the request). The ``sequence`` teacher
  term is ``sum_j alpha_tau exp(-a_j / T_tau) (1[i_j = target] + <u(i_j), u(target)> / sqrt r)``
  with ``u`` the teacher's latent vectors of C1, ``alpha_k = 4^(k - K + 1)`` (a conversion
  counts 16x an impression when K = 3) and recency horizons ``T_k = 4 event_gap_hours 2^k``:
  only a model that matches the target against recent events of the right types can learn it.
- ``label_prob = sigmoid(logit)``; ``label = uniform < label_prob`` from a separate hash stream.
- tasks (``tasks = T > 0``): ``T`` labels per example. Task ``t``'s logit is
  ``b_t + sqrt(rho) z + sqrt(1 - rho) scale h_t / std(h_t)`` with ``z`` the shared teacher
  above (without its bias), ``rho = task_shared_share``, ``h_t`` a task-specific random tanh
  MLP (``teacher_hidden`` units) over the same input as ``deep``, and ``b_t`` set by bisection
  so task ``t``'s mean rate on the calibration sample is ``task_ctr[t]`` (rates of 1% and
  below give sparse-label tasks). Each task draws its label from its own hash stream; the
  Bayes loss of each is ``mean H(label_prob[:, t])``.

What the knobs do to a scaling law (measured on the teacher alone by
``notebooks/stream_knobs.py``, ``notebooks/results/stream_knobs.md``):

- ``teacher_logit_scale`` sets the learnable signal, the KL of the best constant predictor from
  the teacher: 0.077 / 0.193 / 0.278 at scale 1 / 2 / 3 on the default stream.
- ``capacity_spectrum`` sets the parameter axis: a width-``m`` copy of the capacity term (its
  first ``m`` units) leaves an excess KL that falls about as ``m^(1 - 2 gamma)``; measured
  log-log slopes over m = 4..256 (share 0.7, scale 2): -0.18 / -0.49 / -0.89 / -1.83 at
  gamma 0.5 / 0.75 / 1 / 1.5. ``capacity_share`` sets how much of the signal that axis holds
  (exact on the calibration sample: 0.69 measured for 0.7).
- ``zipf_exponent`` and ``vocab_sizes`` set the data axis: a column's id must be seen to be
  learnt, and the fraction of examples whose id occurs fewer than 100 times in ``n`` training
  examples (:func:`rare_id_fraction`) falls about as ``n^-((s - 1) / s)`` while the vocabulary
  is not exhausted: measured slopes over 0.25M-20M examples -0.36 (s = 1.5, 1e5 ids) and
  -0.50 (s = 2); the default s = 1.05 with 1e4 ids exhausts its vocabulary (0.34 -> 0.07 ->
  0.00), the crossover regime in which no power law holds.

Because ``label ~ Bernoulli(label_prob)`` exactly, no model can beat the expected logloss
``mean H(label_prob)`` (binary entropy, nats): :func:`bayes_logloss` is the Bayes-optimal
logloss of the stream. Training examples use ids ``[0, EVAL_OFFSET)``; evaluation uses ids
``EVAL_OFFSET + i`` (same teacher, disjoint examples).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from recjax.config import SyntheticDataConfig
from recjax.data.spec import broadcast_vocab
from recjax.errors import ConfigError

EVAL_OFFSET = 1 << 60  # eval example ids start here; train ids are below
_CALIB_OFFSET = 2 << 60  # fixed, disjoint sample used to calibrate the teacher
_CALIB_SIZE = 20_000

_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
# example-side hash streams (fixed, so e.g. changing num_dense does not change the ids)
_USER_STREAM = 1 << 20
_DENSE_STREAM = 1 << 21
_LABEL_STREAM = 1 << 22
_EVENT_STREAM = 1 << 23
_MAX_VOCAB = 2**31 - 1  # ids are int32
TEACHER_TERMS = ("linear", "fm", "dense_mlp", "deep", "capacity", "sequence")
_CAPACITY_GAIN = 1.5  # pre-activation std of the capacity term's tanh units


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a bijection of uint64 with good avalanche; returns a new array."""
    x = x ^ (x >> np.uint64(30))
    x *= _M1
    x ^= x >> np.uint64(27)
    x *= _M2
    x ^= x >> np.uint64(31)
    return x


def _u53(h: np.ndarray) -> np.ndarray:
    """uint64 hash -> float64 uniform in [0, 1)."""
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def zipf_ids(u: np.ndarray, vocab: np.ndarray | int, s: float) -> np.ndarray:
    """Inverse CDF of a power law ``x^-s`` on ``[1, vocab + 1)``, floored to ids ``[0, vocab)``.

    ``u``: float64 uniforms ``[...]`` broadcast against ``vocab``; returns int64 ids.
    """
    log_v = np.log(np.asarray(vocab, np.float64) + 1.0)
    a = 1.0 - s
    if abs(a) < 1e-9:
        x = np.exp(u * log_v)
    else:  # x = (1 + u ((V+1)^a - 1))^(1/a), written stably for a near 0
        x = np.exp(np.log1p(u * np.expm1(a * log_v)) / a)
    return np.clip(np.floor(x).astype(np.int64) - 1, 0, np.asarray(vocab, np.int64) - 1)


def zipf_top_share(vocab: int, s: float) -> float:
    """Probability of id 0 under :func:`zipf_ids`."""
    a = 1.0 - s
    if abs(a) < 1e-9:
        return math.log(2.0) / math.log(vocab + 1.0)
    return math.expm1(a * math.log(2.0)) / math.expm1(a * math.log(vocab + 1.0))


def zipf_probs(vocab: int, s: float) -> np.ndarray:
    """float64 ``[vocab]``: the exact probability of each id under :func:`zipf_ids` (the power-law
    mass of ``[i + 1, i + 2)``)."""
    edges = np.arange(1, vocab + 2, dtype=np.float64)
    a = 1.0 - s
    cdf = np.log(edges) if abs(a) < 1e-9 else np.expm1(a * np.log(edges))
    return np.diff(cdf) / cdf[-1]


def rare_id_fraction(vocab: int, s: float, n_train: float, below: int = 100) -> float:
    """Expected fraction of examples whose id (one column) occurs fewer than ``below`` times in
    ``n_train`` training examples: ``sum_i p_i P(Poisson(n_train p_i) < below)``."""
    from scipy.stats import poisson

    p = zipf_probs(vocab, s)
    return float(np.sum(p * poisson.cdf(below - 1, n_train * p)))


def _incs(streams) -> np.ndarray:
    """splitmix64 increments ``stream * GAMMA mod 2^64`` as uint64 ``[len(streams)]``."""
    return np.array([s * int(_GAMMA) % (1 << 64) for s in streams], np.uint64)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _bias_for_rate(z: np.ndarray, rate: float) -> float:
    """The bias ``b`` with ``mean sigmoid(z + b) = rate`` (bisection on [-40, 40])."""
    lo, hi = -40.0, 40.0
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if _sigmoid(z + mid).mean() < rate else (lo, mid)
    return 0.5 * (lo + hi)


def bayes_logloss(label_prob: np.ndarray) -> float:
    """Mean binary entropy (nats) of the teacher probabilities: the Bayes-optimal logloss."""
    q = np.clip(np.asarray(label_prob, np.float64), 1e-7, 1.0 - 1e-7)
    return float(-np.mean(q * np.log(q) + (1.0 - q) * np.log1p(-q)))


class SyntheticCTR:
    """The stream of ``cfg``; :meth:`examples` maps global example ids to a batch dict."""

    def __init__(self, cfg: SyntheticDataConfig):
        if cfg.num_sparse < 0 or cfg.num_dense < 0 or cfg.teacher_rank < 1 or cfg.teacher_hidden < 1:
            raise ConfigError(
                "data.synthetic: num_sparse and num_dense must be >= 0, teacher_rank and "
                f"teacher_hidden >= 1; got {cfg}"
            )
        if not 0.0 < cfg.base_ctr < 1.0:
            raise ConfigError(f"data.synthetic.base_ctr must be in (0, 1), got {cfg.base_ctr}")
        vocabs = broadcast_vocab(cfg.vocab_sizes, cfg.num_sparse, "data.synthetic.vocab_sizes")
        if cfg.user_id:
            if cfg.num_users <= 0:
                raise ConfigError(f"data.synthetic.num_users must be positive, got {cfg.num_users}")
            vocabs = [*vocabs, cfg.num_users]
        exps = cfg.zipf_exponent if isinstance(cfg.zipf_exponent, list) else [cfg.zipf_exponent]
        if len(exps) not in (1, len(vocabs)):
            raise ConfigError(f"data.synthetic.zipf_exponent: expected 1 or {len(vocabs)} values (one per column"
                              f"{', the user column last' if cfg.user_id else ''}), got {len(exps)}")
        if any(e < 0 for e in exps):
            raise ConfigError(f"data.synthetic.zipf_exponent must be >= 0, got {cfg.zipf_exponent}")
        self.zipf_exponents = [float(e) for e in exps] * (len(vocabs) if len(exps) == 1 else 1)  # [C]
        if any(v > _MAX_VOCAB for v in vocabs):
            raise ConfigError(f"data.synthetic: vocabulary sizes must fit int32 ids, got {vocabs}")
        self.cfg = cfg = dataclasses.replace(cfg, vocab_sizes=list(cfg.vocab_sizes))  # a private copy
        self.vocabs = np.asarray(vocabs, np.int64)  # [C], C = num_sparse (+1 user)
        seed = cfg.seed % (1 << 64)
        self._ex_key = mix64(np.array([seed ^ 0x5EED], np.uint64))[0]
        self._teacher_key = mix64(np.array([(seed + int(_GAMMA)) % (1 << 64)], np.uint64))[0]
        streams = [*range(cfg.num_sparse), *([_USER_STREAM] if cfg.user_id else [])]
        ndense = 2 * ((cfg.num_dense + 1) // 2)
        self._stream_inc = _incs([s + 1 for s in streams])  # [C]
        self._dense_inc = _incs(range(_DENSE_STREAM + 1, _DENSE_STREAM + 1 + ndense))
        self._label_inc = _incs([_LABEL_STREAM + 1])[0]
        self._latent_inc = _incs(range(1, cfg.teacher_rank // 2 + 2))
        self._feature_salt = mix64(np.arange(1, len(vocabs) + 1, dtype=np.uint64) << np.uint64(48))
        rng = np.random.default_rng([cfg.seed % (1 << 63), 7])
        d, h = cfg.num_dense, cfg.teacher_hidden
        self._w1 = (rng.standard_normal((d, h)) / math.sqrt(max(d, 1))).astype(np.float32)
        self._b1 = (0.5 * rng.standard_normal(h)).astype(np.float32)
        self._w2 = rng.standard_normal(h).astype(np.float32)
        unknown = set(cfg.teacher_terms) - set(TEACHER_TERMS)
        if unknown or not cfg.teacher_terms:
            raise ConfigError(f"data.synthetic.teacher_terms: choose from {TEACHER_TERMS}, got {cfg.teacher_terms}")
        deep_in = len(vocabs) * cfg.teacher_rank + d
        # gain 3: pre-activations of std ~3 saturate tanh, so the term is far from additive
        self._deep_w1 = (3.0 * rng.standard_normal((deep_in, h)) / math.sqrt(deep_in)).astype(np.float32)
        self._deep_b1 = (0.5 * rng.standard_normal(h)).astype(np.float32)
        self._deep_w2 = rng.standard_normal(h).astype(np.float32)
        if "capacity" in cfg.teacher_terms:  # own generator: the other terms stay as they were
            if cfg.capacity_width < 1 or cfg.capacity_spectrum < 0:
                raise ConfigError("data.synthetic: capacity_width must be >= 1 and capacity_spectrum >= 0, got "
                                  f"{cfg.capacity_width}, {cfg.capacity_spectrum}")
            crng = np.random.default_rng([cfg.seed % (1 << 63), 8])
            w = cfg.capacity_width
            self._cap_w1 = (_CAPACITY_GAIN * crng.standard_normal((deep_in, w)) / math.sqrt(deep_in)).astype(np.float32)
            self._cap_b1 = (0.5 * crng.standard_normal(w)).astype(np.float32)
            signs = np.where(crng.random(w) < 0.5, -1.0, 1.0)
            self._cap_w2 = (signs * np.arange(1, w + 1, dtype=np.float64) ** -cfg.capacity_spectrum).astype(np.float32)
        self._check_events(cfg)
        self._event_inc = _incs(range(_EVENT_STREAM + 1, _EVENT_STREAM + 2 + 4 * cfg.events))
        shares = {"capacity": cfg.capacity_share, "sequence": cfg.sequence_share}
        for term, share in shares.items():
            if share is not None and (term not in cfg.teacher_terms or not 0.0 <= share <= 1.0):
                raise ConfigError(f"data.synthetic.{term}_share={share} needs '{term}' in teacher_terms and a "
                                  "value in [0, 1]")
        if sum(v for v in shares.values() if v is not None) > 1.0:
            raise ConfigError(f"data.synthetic: capacity_share + sequence_share must be <= 1, got {shares}")
        # calibration: unit-std terms weighted to their variance shares, then the bias for base_ctr
        self.num_tasks = 0  # set by _init_tasks, after the shared teacher is calibrated
        calib = self._features(np.arange(_CALIB_SIZE, dtype=np.int64) + _CALIB_OFFSET)
        terms = self._terms(calib)
        std = terms.std(axis=0)
        live = std > 1e-9
        self._norm = np.where(live, cfg.teacher_logit_scale / np.where(live, std, 1.0), 0.0)
        fixed = np.array([shares.get(t) is not None for t in cfg.teacher_terms])
        others = int((live & ~fixed).sum())
        rest = (1.0 - sum(v for v in shares.values() if v is not None)) / max(others, 1)
        self._norm *= np.sqrt([shares[t] if f else rest for t, f in zip(cfg.teacher_terms, fixed, strict=True)])
        z = terms @ self._norm
        self._bias = _bias_for_rate(z, cfg.base_ctr)
        self._init_tasks(cfg, z, calib)

    def _init_tasks(self, cfg: SyntheticDataConfig, z: np.ndarray, calib: dict[str, np.ndarray]) -> None:
        """Task-specific teachers and per-task biases from the shared logits ``z [N]`` of the
        calibration sample ``calib``."""
        self.num_tasks = cfg.tasks
        if not cfg.tasks:
            return
        rates = cfg.task_ctr * cfg.tasks if len(cfg.task_ctr) == 1 else list(cfg.task_ctr)
        if cfg.tasks < 0 or len(rates) != cfg.tasks or not all(0.0 < r < 1.0 for r in rates):
            raise ConfigError(f"data.synthetic: tasks must be >= 0 with 1 or {cfg.tasks} task_ctr values in "
                              f"(0, 1); got tasks {cfg.tasks}, task_ctr {cfg.task_ctr}")
        if not 0.0 <= cfg.task_shared_share <= 1.0:
            raise ConfigError(f"data.synthetic.task_shared_share must be in [0, 1], got {cfg.task_shared_share}")
        trng = np.random.default_rng([cfg.seed % (1 << 63), 9])  # own generator: the shared teacher stays
        x = self._deep_input(self._id_params(calib["sparse"])[:, :, :cfg.teacher_rank], calib["dense"])
        t, h = cfg.tasks, cfg.teacher_hidden
        self._task_w1 = (_CAPACITY_GAIN * trng.standard_normal((t, x.shape[1], h)) / math.sqrt(x.shape[1])
                         ).astype(np.float32)
        self._task_b1 = (0.5 * trng.standard_normal((t, 1, h))).astype(np.float32)
        self._task_w2 = trng.standard_normal((t, h)).astype(np.float32)
        own = self._task_terms(x)  # [N, T]
        rho = cfg.task_shared_share
        self._task_norm = math.sqrt(1.0 - rho) * cfg.teacher_logit_scale / np.maximum(own.std(axis=0), 1e-9)
        self._task_shared = math.sqrt(rho)
        zt = self._task_shared * z[:, None] + own * self._task_norm
        self._task_bias = np.array([_bias_for_rate(zt[:, i], r) for i, r in enumerate(rates)])
        self._task_label_inc = _incs(range(_LABEL_STREAM + 1, _LABEL_STREAM + 1 + t))

    def _task_terms(self, x: np.ndarray) -> np.ndarray:
        """``[B, T]``: each task's own teacher ``h_t = tanh(x W1_t + b1_t) w2_t``, unscaled."""
        hid = np.tanh(np.einsum("bi,tih->tbh", x.astype(np.float32), self._task_w1) + self._task_b1)
        return np.einsum("tbh,th->bt", hid, self._task_w2).astype(np.float64)

    @staticmethod
    def _check_events(cfg: SyntheticDataConfig) -> None:
        if cfg.events < 0 or (cfg.events and not 0 <= cfg.event_min <= cfg.events):
            raise ConfigError(f"data.synthetic: events must be >= 0 and event_min in [0, events]; got events "
                              f"{cfg.events}, event_min {cfg.event_min}")
        if cfg.events and (cfg.event_types < 1 or not 0.0 <= cfg.event_match_prob <= 1.0
                           or cfg.event_gap_hours <= 0):
            raise ConfigError("data.synthetic: event_types must be >= 1, event_match_prob in [0, 1] and "
                              f"event_gap_hours > 0; got {cfg.event_types}, {cfg.event_match_prob}, "
                              f"{cfg.event_gap_hours}")
        if "sequence" in cfg.teacher_terms and not cfg.events:
            raise ConfigError("data.synthetic.teacher_terms: 'sequence' needs events > 0")
        if cfg.events and cfg.raw_ids:
            raise ConfigError("data.synthetic: event sequences are not available with raw_ids")

    # ----------------------------------------------------------------- example side

    def _features(self, example_ids: np.ndarray) -> dict[str, np.ndarray]:
        """Hashed per-example draws; ``sparse`` is column-major ``[C, B]`` int64."""
        ids = np.asarray(example_ids, np.int64)
        if ids.ndim != 1:
            raise ValueError(f"example_ids must be 1-D, got shape {ids.shape}")
        base = mix64(ids.astype(np.uint64) * _GAMMA ^ self._ex_key)  # [B]
        cols = mix64(base[None, :] + self._stream_inc[:, None])  # [C, B]
        u = _u53(cols)
        if len(set(self.zipf_exponents)) == 1:
            sparse = zipf_ids(u, self.vocabs[:, None], self.zipf_exponents[0])
        else:
            sparse = np.stack([zipf_ids(u[c], self.vocabs[c], e) for c, e in enumerate(self.zipf_exponents)])
        npair = (self.cfg.num_dense + 1) // 2
        u = _u53(mix64(base[:, None] + self._dense_inc))  # [B, 2 * npair]
        rad = np.sqrt(-2.0 * np.log1p(-u[:, :npair]))  # 1 - u in (0, 1]
        ang = (2.0 * np.pi) * u[:, npair:]
        dense = np.concatenate([rad * np.cos(ang), rad * np.sin(ang)], axis=1)[:, : self.cfg.num_dense]
        label_u = _u53(mix64(base + self._label_inc))  # [B]
        if self.num_tasks:
            label_u = _u53(mix64(base[:, None] + self._task_label_inc))  # [B, T]
        feats = {"ids": ids, "sparse": sparse, "dense": dense.astype(np.float32), "label_u": label_u}
        if self.cfg.events:
            feats.update(self._events(base, sparse[0]))
        return feats

    def _events(self, base: np.ndarray, target: np.ndarray) -> dict[str, np.ndarray]:
        """Event draws for examples with hash ``base [B]`` and target item ids ``target [B]``:
        ``event_item`` int64 / ``event_type`` int64 ``[B, L]`` (-1 past the length), ``event_age``
        float64 hours (0 past it), ``event_match`` bool and ``event_latent`` float32 ``[B, L, r]``."""
        cfg, L = self.cfg, self.cfg.events
        u = _u53(mix64(base[:, None] + self._event_inc))  # [B, 4 L + 1]
        n = np.minimum(cfg.event_min + np.floor(u[:, 0] * (L - cfg.event_min + 1)).astype(np.int64), L)
        valid = np.arange(L)[None, :] < n[:, None]
        p = 0.3 ** np.arange(cfg.event_types)
        types = np.minimum(np.searchsorted(np.cumsum(p / p.sum()), u[:, 1:L + 1]), cfg.event_types - 1)
        match = u[:, L + 1:2 * L + 1] < cfg.event_match_prob
        drawn = zipf_ids(u[:, 2 * L + 1:3 * L + 1], self.vocabs[0], self.zipf_exponents[0])
        items = np.where(match, target[:, None], drawn)
        gaps = np.where(valid, -np.log1p(-u[:, 3 * L + 1:]) * cfg.event_gap_hours, 0.0)
        age = np.cumsum(gaps[:, ::-1], axis=1)[:, ::-1]  # a_j = sum of the gaps from j on
        latent = self._id_params(np.where(valid, items, 0).reshape(1, -1), column=0)[0, :, :cfg.teacher_rank]
        return {"event_item": np.where(valid, items, -1), "event_type": np.where(valid, types, -1),
                "event_age": age, "event_match": valid & (items == target[:, None]),
                "event_latent": latent.reshape(*items.shape, -1) * valid[..., None]}

    # ----------------------------------------------------------------- teacher side

    def _id_params(self, sparse: np.ndarray, column: int | None = None) -> np.ndarray:
        """float32 ``[C, B, r + 1]``: each example's per-id teacher parameters per column (``r``
        latent entries, then the first-order weight), uniform on ``[-sqrt 3, sqrt 3)`` (variance 1);
        with ``column``, ``sparse [1, B]`` holds ids of that column."""
        c, b = sparse.shape
        r = self.cfg.teacher_rank
        nh = (r + 2) // 2  # two 32-bit values per hash: r latent + 1 first-order weight
        salt = self._feature_salt[:, None] if column is None else self._feature_salt[column]
        fid = mix64(sparse.astype(np.uint64) ^ salt) + self._teacher_key
        h = mix64(fid[:, :, None] + self._latent_inc)  # [C, B, nh]
        u32 = h.view(np.uint32).reshape(c, b, 2 * nh)[:, :, : r + 1]
        sqrt3 = math.sqrt(3.0)
        return u32.astype(np.float32) * np.float32(2.0 * sqrt3 / 2**32) - np.float32(sqrt3)

    def _terms(self, feats: dict[str, np.ndarray], capacity_units: int | None = None) -> np.ndarray:
        """Unnormalised teacher terms ``[B, len(teacher_terms)]`` in the configured order; the
        capacity term summed over its first ``capacity_units`` hidden units only, if given."""
        return self._terms_of(self._id_params(feats["sparse"]), feats["dense"], capacity_units, feats)

    def _terms_of(self, vals: np.ndarray, dense: np.ndarray, capacity_units: int | None = None,
                  events: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """:meth:`_terms` from explicit per-id parameters ``vals [C, B, r + 1]`` (float32 for the
        stream; float64 to differentiate the teacher numerically) and the examples' ``events``
        (:meth:`_events`; the event items' latents are taken as given)."""
        r = self.cfg.teacher_rank
        tot = vals.sum(axis=0, dtype=vals.dtype)  # [B, r + 1]; unit-variance entries
        lin = tot[:, r]
        v = vals[:, :, :r]
        fm = 0.5 * ((tot[:, :r] ** 2).sum(axis=1) - np.einsum("cbk,cbk->b", v, v))
        terms = {"linear": lin, "fm": fm, "dense_mlp": np.tanh(dense @ self._w1 + self._b1) @ self._w2}
        if "deep" in self.cfg.teacher_terms or "capacity" in self.cfg.teacher_terms:
            x = self._deep_input(v, dense)
        if "deep" in self.cfg.teacher_terms:
            terms["deep"] = np.tanh(x @ self._deep_w1 + self._deep_b1) @ self._deep_w2
        if "capacity" in self.cfg.teacher_terms:
            m = self.cfg.capacity_width if capacity_units is None else capacity_units
            terms["capacity"] = np.tanh(x @ self._cap_w1[:, :m] + self._cap_b1[:m]) @ self._cap_w2[:m]
        if "sequence" in self.cfg.teacher_terms:
            terms["sequence"] = self._sequence_term(v[0], events)
        return np.stack([terms[t] for t in self.cfg.teacher_terms], axis=1).astype(np.float64)

    @staticmethod
    def _deep_input(v: np.ndarray, dense: np.ndarray) -> np.ndarray:
        """``[B, C r + num_dense]``: every column's latent vector (``v [C, B, r]``) and the dense
        features, the input of the ``deep``, ``capacity`` and task teachers."""
        c, b, r = v.shape
        return np.concatenate([v.transpose(1, 0, 2).reshape(b, c * r), dense.astype(v.dtype)], axis=1)

    def _sequence_term(self, target_latent: np.ndarray, events: dict[str, np.ndarray]) -> np.ndarray:
        """``[B]``: ``sum_j alpha_tau exp(-a_j / T_tau) (1[i_j = target] + <u_j, u_target> / sqrt r)``."""
        k = self.cfg.event_types
        alpha = 4.0 ** (np.arange(k) - (k - 1))
        horizon = 4.0 * self.cfg.event_gap_hours * 2.0 ** np.arange(k)
        types = np.maximum(events["event_type"], 0)
        weight = np.where(events["event_type"] >= 0, alpha[types] * np.exp(-events["event_age"] / horizon[types]), 0.0)
        sim = np.einsum("blr,br->bl", events["event_latent"], target_latent) / math.sqrt(self.cfg.teacher_rank)
        return np.sum(weight * (events["event_match"] + sim), axis=1)

    def logit_terms(self, example_ids: np.ndarray, capacity_units: int | None = None) -> np.ndarray:
        """The teacher's logit parts ``[B, len(teacher_terms)]`` (scaled: their sum plus the bias is
        the logit); ``capacity_units`` truncates the capacity term to its first hidden units."""
        return self._terms(self._features(example_ids), capacity_units) * self._norm

    def label_prob(self, example_ids: np.ndarray, capacity_units: int | None = None) -> np.ndarray:
        """float64 ``[B]`` (``[B, T]`` with tasks) teacher probabilities; with ``capacity_units``
        those of the teacher whose capacity term keeps only its first hidden units (the best a
        width-m copy of it can do)."""
        return self._probs(self._features(example_ids), capacity_units)

    def _probs(self, feats: dict[str, np.ndarray], capacity_units: int | None = None) -> np.ndarray:
        vals = self._id_params(feats["sparse"])
        z = self._terms_of(vals, feats["dense"], capacity_units, feats) @ self._norm  # [B]
        if not self.num_tasks:
            return _sigmoid(self._bias + z)
        own = self._task_terms(self._deep_input(vals[:, :, :self.cfg.teacher_rank], feats["dense"])) * self._task_norm
        return _sigmoid(self._task_bias + self._task_shared * z[:, None] + own)

    def raw_ids(self, sparse: np.ndarray) -> np.ndarray:
        """Vocabulary ids ``[B, C]`` -> raw 63-bit ids as uint32 ``(hi, lo)`` halves ``[B, C, 2]``:
        ``mix64(v ^ salt_c) mod 2^63`` (``mix64`` is a bijection: two ids of a column clash only if
        their hashes agree on 63 bits), so the raw stream carries the same information as the
        vocabulary one, spread over a 2^63 id space (no id collides
        with the ``-1`` marker, whose ``hi`` is ``0xFFFFFFFF``)."""
        raw = mix64(sparse.astype(np.uint64) ^ self._feature_salt) & np.uint64((1 << 63) - 1)
        return np.stack([(raw >> np.uint64(32)).astype(np.uint32), (raw & np.uint64(0xFFFFFFFF)).astype(np.uint32)],
                        axis=-1)

    def examples(self, example_ids: np.ndarray) -> dict[str, np.ndarray]:
        """The batch dict of :mod:`recjax.data.spec` for the given global ids ``[B]`` (int64).

        Returns ``dense`` f32 ``[B, num_dense]``, ``sparse`` i32 ``[B, C]`` (``raw_ids``: uint32
        ``[B, C, 2]``, :meth:`raw_ids`), ``label`` f32 ``[B]`` (``[B, T]`` with ``tasks = T``),
        ``user_id`` i32 ``[B]`` (if ``cfg.user_id``), with ``events = L``: ``event_item`` and
        ``event_type`` i32 ``[B, L]`` (-1 past each example's length) and ``event_age`` f32 hours
        ``[B, L]`` (0 there), ``example_id`` i64 ``[B]``, ``label_prob`` f32 shaped as ``label``.
        """
        feats = self._features(example_ids)
        prob = self._probs(feats)
        sparse = np.ascontiguousarray(feats["sparse"].T, dtype=np.int32)
        out = {
            "dense": feats["dense"],
            "sparse": self.raw_ids(sparse) if self.cfg.raw_ids else sparse,
            "label": (feats["label_u"] < prob).astype(np.float32),
        }
        if self.cfg.user_id:
            out["user_id"] = sparse[:, -1].copy()
        if self.cfg.events:
            out["event_item"] = feats["event_item"].astype(np.int32)
            out["event_type"] = feats["event_type"].astype(np.int32)
            out["event_age"] = feats["event_age"].astype(np.float32)
        out["example_id"] = feats["ids"].copy()
        out["label_prob"] = prob.astype(np.float32)
        return out
