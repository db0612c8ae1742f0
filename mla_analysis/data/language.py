"""Synthetic language: a seeded sparse Zipfian Markov chain over word tokens whose optimal loss is exact.

Alphabet: EOS plus the first ``n_words`` word ids of the :class:`Vocab`. A state is the last ``order``
tokens. Each state has ``k_s`` likely successor words (``k_s`` uniform in 1..2*branching-1, so rows
differ and the stationary distribution matters for the entropy rate), drawn without replacement from
a global Zipf(1) unigram prior so some words are frequent everywhere, with Zipf(``zipf_exponent``)
weights by rank. Every row is mixed with ``smoothing`` mass spread uniformly over all words (so the
chain is irreducible and aperiodic: a unique stationary distribution exists), and after a word the
sentence ends (EOS) with probability ``eos_prob``::

    P(EOS | s)    = q_s                                       (q_s = eos_prob, 0 after EOS)
    P(word j | s) = (1 - q_s) * ((1 - eps) * zipf_s(j) + eps / n_words)

The transition structure is fixed by ``language_seed``; samples come from the caller's generator.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import numpy as np

from mla_analysis.config.data import LanguageConfig
from mla_analysis.data.vocab import EOS, Vocab

# above this many (state x successor) entries an order-2 chain gets too big for CPU memory
_MAX_TABLE_ENTRIES = 50_000_000


class MarkovLanguage:
    """A fixed sparse Zipfian Markov chain over word tokens with an exact entropy rate."""

    def __init__(self, vocab: Vocab, cfg: Optional[LanguageConfig] = None, seed: int = 1234):
        cfg = cfg or LanguageConfig()
        self.vocab = vocab
        self.cfg = cfg
        self.seed = seed
        n = vocab.n_words if cfg.n_words is None else cfg.n_words
        if cfg.order not in (1, 2):
            raise ValueError(f"data.language.order must be 1 or 2, got {cfg.order}")
        if not 2 <= n <= vocab.n_words:
            raise ValueError(f"data.language.n_words={cfg.n_words} must be in 2..{vocab.n_words} (word ids available)")
        if cfg.branching < 1:
            raise ValueError(f"data.language.branching must be >= 1, got {cfg.branching}")
        if not 0.0 < cfg.smoothing <= 1.0:
            raise ValueError(f"data.language.smoothing must be in (0, 1], got {cfg.smoothing}")
        if not 0.0 <= cfg.eos_prob < 1.0:
            raise ValueError(f"data.language.eos_prob must be in [0, 1), got {cfg.eos_prob}")
        if cfg.zipf_exponent < 0:
            raise ValueError(f"data.language.zipf_exponent must be >= 0, got {cfg.zipf_exponent}")
        self.n_words = n
        self.A = n + 1  # alphabet index 0 = EOS, 1..n = words
        self.n_states = self.A**cfg.order
        kmax = min(2 * cfg.branching - 1, n)
        if self.n_states * kmax > _MAX_TABLE_ENTRIES:
            raise ValueError(
                f"data.language: order={cfg.order} over {n} words needs {self.n_states} states; "
                "lower data.language.n_words or use order 1"
            )
        # alphabet index -> vocab id, and back (-1 = not in the alphabet)
        self.alphabet = np.concatenate([[EOS], np.asarray(vocab.word_ids[:n])]).astype(np.int64)
        self._to_alpha = np.full(vocab.vocab_size, -1, dtype=np.int64)
        self._to_alpha[self.alphabet] = np.arange(self.A)
        self._build(np.random.Generator(np.random.PCG64(seed)), kmax)
        self._pi: Optional[np.ndarray] = None

    # ---- structure ---------------------------------------------------------------------------
    def _build(self, rng: np.random.Generator, kmax: int) -> None:
        cfg, n, S = self.cfg, self.n_words, self.n_states
        # global unigram prior: Zipf(1) over a random ranking of the words
        rank = rng.permutation(n) + 1
        log_prior = -np.log(rank.astype(np.float64))
        k = rng.integers(1, kmax + 1, size=S) if kmax > 1 else np.ones(S, dtype=np.int64)
        succ = np.zeros((S, kmax), dtype=np.int64)
        # Gumbel-top-k = sampling kmax successors without replacement proportional to the prior,
        # ordered by draw; chunked so the S x n key matrix never gets large
        chunk = max(1, 2_000_000 // n)
        for lo in range(0, S, chunk):
            hi = min(S, lo + chunk)
            keys = log_prior[None, :] + rng.gumbel(size=(hi - lo, n))  # [rows, n]
            top = np.argpartition(-keys, kmax - 1, axis=1)[:, :kmax] if kmax < n else np.tile(np.arange(n), (hi - lo, 1))
            order = np.argsort(-np.take_along_axis(keys, top, axis=1), axis=1, kind="stable")
            succ[lo:hi] = np.take_along_axis(top, order, axis=1) + 1  # word alphabet index 1..n
        ranks = np.arange(1, kmax + 1, dtype=np.float64)
        w = ranks[None, :] ** (-cfg.zipf_exponent) * (ranks[None, :] <= k[:, None])  # [S, kmax]
        w /= w.sum(axis=1, keepdims=True)
        self.k = k
        self.succ = succ  # [S, kmax] alphabet indices of the likely successors
        self.zipf = w  # [S, kmax] their Zipf weights (0 beyond k_s)
        # cumulative weights for inverse-CDF draws; 1.0 from the k_s-th entry on so round-off can
        # never select a zero-weight slot
        self.cum = np.where(np.arange(kmax)[None, :] >= k[:, None] - 1, 1.0, np.cumsum(w, axis=1))
        cur = np.arange(S) % self.A
        self.q = np.where(cur == 0, 0.0, cfg.eos_prob)  # [S] EOS probability (no empty sentences)

    def _next_state(self, state: np.ndarray, a: np.ndarray) -> np.ndarray:
        if self.cfg.order == 1:
            return a
        return (state % self.A) * self.A + a

    # ---- exact quantities ------------------------------------------------------------------------
    def row_entropy(self) -> np.ndarray:
        """Entropy (nats) of the next-token distribution of every state, [n_states]."""
        eps, n, q = self.cfg.smoothing, self.n_words, self.q
        e = eps / n
        p = (1 - eps) * self.zipf + e  # [S, kmax] mass of the likely successors (before the 1-q factor)
        valid = self.zipf > 0
        h_words = -(np.where(valid, p * np.log(p), 0.0)).sum(axis=1) - (n - self.k) * e * np.log(e)
        h_eos = -(_xlogx(q) + _xlogx(1 - q))
        return h_eos + (1 - q) * h_words

    def stationary(self, tol: float = 1e-13, max_iter: int = 100_000) -> np.ndarray:
        """Stationary distribution over states (power iteration on the sparse chain), [n_states]."""
        if self._pi is not None:
            return self._pi
        S, A, n, eps = self.n_states, self.A, self.n_words, self.cfg.smoothing
        states = np.arange(S)
        nxt = self._next_state(np.repeat(states, self.succ.shape[1]), self.succ.ravel())  # [S*kmax]
        cur = states % A
        pi = np.full(S, 1.0 / S)
        for _ in range(max_iter):
            m = pi * (1 - self.q)  # mass that moves to a word
            new = np.bincount(nxt, weights=(m[:, None] * (1 - eps) * self.zipf).ravel(), minlength=S)
            smooth = np.bincount(cur, weights=m * eps / n, minlength=A)  # per current token
            eos = np.bincount(cur, weights=pi * self.q, minlength=A)
            if self.cfg.order == 1:
                new[1:] += smooth.sum()
                new[0] += eos.sum()
            else:
                grid = new.reshape(A, A)  # [cur, next]
                grid[:, 1:] += smooth[:, None]
                grid[:, 0] += eos
            new /= new.sum()
            done = np.abs(new - pi).sum() < tol
            pi = new
            if done:
                break
        self._pi = pi
        return pi

    def entropy_rate(self) -> float:
        """Exact entropy rate (nats/token) of the stationary chain: the optimal LM loss."""
        return float(self.stationary() @ self.row_entropy())

    def next_token_probs(self, context) -> np.ndarray:
        """Dense next-token distribution over the whole vocab given the last ``order`` tokens, [vocab_size]."""
        ctx = np.asarray(context, dtype=np.int64)[-self.cfg.order :]
        s = self._state_of(ctx[None, :])[0]
        eps, n, q = self.cfg.smoothing, self.n_words, self.q[s]
        p_alpha = np.zeros(self.A)
        p_alpha[1:] = (1 - q) * eps / n
        np.add.at(p_alpha, self.succ[s], (1 - q) * (1 - eps) * self.zipf[s])
        p_alpha[0] = q
        out = np.zeros(self.vocab.vocab_size)
        out[self.alphabet] = p_alpha
        return out

    def log_probs(self, tokens) -> np.ndarray:
        """log p(x_t | previous ``order`` tokens) for t = order..len-1 of a token sequence, [len - order]."""
        x = self._alpha(np.asarray(tokens, dtype=np.int64))
        o = self.cfg.order
        windows = np.stack([x[i : len(x) - o + i] for i in range(o)], axis=1)  # [T-o, o]
        s = self._state_idx(windows)
        a = x[o:]
        w = (self.zipf[s] * (self.succ[s] == a[:, None])).sum(axis=1)
        eps, q = self.cfg.smoothing, self.q[s]
        p = np.where(a == 0, q, (1 - q) * ((1 - eps) * w + eps / self.n_words))
        return np.log(p)

    # ---- sampling ---------------------------------------------------------------------------------
    def sample(self, n_tokens: int, rng: np.random.Generator) -> np.ndarray:
        """One stationary sample of ``n_tokens`` vocab ids, [n_tokens]."""
        return self.sample_batch(1, n_tokens, rng)[0]

    def sample_batch(self, n: int, length: int, rng: np.random.Generator) -> np.ndarray:
        """``n`` independent stationary samples of ``length`` vocab ids, [n, length] int64."""
        o = self.cfg.order
        if length <= 0 or n == 0:
            return np.zeros((n, max(length, 0)), dtype=np.int64)
        state = rng.choice(self.n_states, size=n, p=self.stationary())
        out = np.empty((n, max(length, o)), dtype=np.int64)
        if o == 1:
            out[:, 0] = state
        else:
            out[:, 0], out[:, 1] = state // self.A, state % self.A
        steps = max(length - o, 0)
        u = rng.random((steps, n, 3))  # [step, example, (eos, smoothing, successor) uniforms]
        uniform_word = rng.integers(1, self.A, size=(steps, n))
        eps = self.cfg.smoothing
        rows = np.arange(n)
        for t in range(steps):
            idx = (u[t, :, 2][:, None] > self.cum[state]).sum(axis=1)
            a = self.succ[state, np.minimum(idx, self.succ.shape[1] - 1)]
            a = np.where(u[t, :, 1] < eps, uniform_word[t], a)
            a = np.where(u[t, :, 0] < self.q[state], 0, a)
            out[rows, o + t] = a
            state = self._next_state(state, a)
        return self.alphabet[out[:, :length]]

    # ---- helpers --------------------------------------------------------------------------------------
    def _alpha(self, tokens: np.ndarray) -> np.ndarray:
        a = self._to_alpha[tokens]
        if (a < 0).any():
            raise ValueError("tokens outside the language alphabet (EOS + its word ids)")
        return a

    def _state_idx(self, alpha_ctx: np.ndarray) -> np.ndarray:
        return alpha_ctx[:, 0] if self.cfg.order == 1 else alpha_ctx[:, 0] * self.A + alpha_ctx[:, 1]

    def _state_of(self, ctx: np.ndarray) -> np.ndarray:
        return self._state_idx(self._alpha(ctx))


def _xlogx(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return np.where(x > 0, x * np.log(np.where(x > 0, x, 1.0)), 0.0)


@functools.lru_cache(maxsize=16)
def _cached_language(vocab_size: int, cfg_key: tuple, seed: int) -> MarkovLanguage:
    return MarkovLanguage(Vocab(vocab_size), LanguageConfig(**dict(cfg_key)), seed)


def get_language(vocab: Vocab, cfg: Optional[LanguageConfig] = None, seed: int = 1234) -> MarkovLanguage:
    """Cached :class:`MarkovLanguage` (building an order-2 chain takes a moment; it never changes)."""
    cfg = cfg or LanguageConfig()
    key = tuple((f.name, getattr(cfg, f.name)) for f in dataclasses.fields(LanguageConfig))
    return _cached_language(vocab.vocab_size, key, seed)
