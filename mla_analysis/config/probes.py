"""The ``probe`` group (conf/probe/): one dataclass per probe, its closed choices and its checks.

``probe=spectra`` composes ``{"spectra": SpectraConfig}`` onto the run's ``probe`` node (each
conf/probe/<name>.yaml starts from its ``<name>_schema``, registered by ``mla_analysis.runner.schema``), so
an override of a probe key is type-checked when the config composes; ``probe=[spectra,cost]`` selects
several. ``probe_config(name, params)`` builds and checks the options from a plain dict (the probes'
Python callers). What depends on the model (layer indices, context lengths past ``max_seq_len``) is
checked when the probe runs.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, List, Optional

from .checks import (Choice, ConfigError, as_list, check_bool, coerce_choices, int_list, invalid, is_number,
                     non_negative_int, positive_int)


class CacheDtype(Choice):
    """Cache element types of the bytes-per-token check (``probe.cost.dtypes``)."""

    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class DenseFraction(Choice):
    """Share of a dense baseline's FFN units zeroed against r masked experts (``probe.experts.dense_fraction``)."""

    active = "active"  # r / (k + shared): the active experts' share
    routed = "routed"  # r / E


class GridTask(Choice):
    """Retrieval grid tasks: MQAR, passkey, NIAH as ``data.niah`` configures it, and RULER's NIAH presets."""

    mqar = "mqar"
    passkey = "passkey"
    niah = "niah"
    niah_single_1 = "niah_single_1"
    niah_single_2 = "niah_single_2"
    niah_single_3 = "niah_single_3"
    niah_multikey_1 = "niah_multikey_1"
    niah_multikey_2 = "niah_multikey_2"
    niah_multikey_3 = "niah_multikey_3"
    niah_multivalue = "niah_multivalue"
    niah_multiquery = "niah_multiquery"


class DetailTask(Choice):
    """Retrieval "detail" tasks, scored over the context lengths only."""

    copy = "copy"
    arithmetic = "arithmetic"


def _check_seed(key: str, value: Any) -> None:
    non_negative_int(key, value)


def _unit_interval(key: str, value: Any, closed_high: bool = False) -> None:
    """``value`` in (0, 1) (or (0, 1] with ``closed_high``), else ConfigError."""
    if not is_number(value) or not (0 < value < 1 or (closed_high and value == 1)):
        raise invalid(key, value, f"a number in (0, 1{']' if closed_high else ')'}")


def _run_dir(key: str, value: Any) -> None:
    if value is not None and not isinstance(value, (str, Path)):
        raise invalid(key, value, "a run directory | null")


# ---- spectra -------------------------------------------------------------------------------------------


@dataclass
class SpectraConfig:
    """``probe=spectra``: singular-value spectra of the cached keys/values (mla_analysis.probes.spectra)."""

    max_tokens: int = 8192  # tokens of the "lm" eval set fed through the model (whole sequences)
    batch_size: int = 64
    center: bool = False  # subtract the column mean before the decomposition
    ranks: List[int] = field(default_factory=lambda: [4, 8, 16, 32])  # energy captured by the top r, per r
    taus: List[float] = field(default_factory=lambda: [0.9, 0.95, 0.99])  # energy ranks r_tau
    subspace_rank: int = 4  # r of the dominant subspaces compared across layers
    max_joint_dim: int = 4096  # kv_all is skipped above this width (its Gram is width^2 float64)
    rank_rtol: float = 1e-4  # numerical rank: singular values > rank_rtol * sigma_1
    figures: bool = True


def check_spectra(c: SpectraConfig) -> SpectraConfig:
    """Raise ConfigError naming the first invalid ``probe.spectra`` key; lists normalised in place."""
    k = "probe.spectra."
    for key in ("max_tokens", "batch_size", "subspace_rank", "max_joint_dim"):
        positive_int(k + key, getattr(c, key))
    c.ranks = int_list(k + "ranks", c.ranks)
    taus = as_list(c.taus)
    if not isinstance(taus, list) or not taus or not all(is_number(t) and 0 < t <= 1 for t in taus):
        raise invalid(k + "taus", c.taus, "a list of numbers in (0, 1]")
    c.taus = [float(t) for t in taus]
    check_bool(k + "center", c.center)
    check_bool(k + "figures", c.figures)
    _unit_interval(k + "rank_rtol", c.rank_rtol)
    return c


# ---- retrieval -----------------------------------------------------------------------------------------


@dataclass
class RetrievalConfig:
    """``probe=retrieval``: accuracy over a context-length x needle-depth grid (mla_analysis.probes.retrieval)."""

    # grid tasks ([] = none); the default: all but "niah" (which takes data.niah as it is configured)
    tasks: List[GridTask] = field(default_factory=lambda: [t for t in GridTask if t != GridTask.niah])
    detail_tasks: List[DetailTask] = field(default_factory=lambda: list(DetailTask))  # scored over lengths only
    lengths: Optional[List[int]] = None  # explicit context lengths (even, >= 8); null = length_factors x seq_len
    # multiples of data.seq_len (a number each: Any keeps YAML's ints as ints in the records, which
    # OmegaConf 2.3 could not with List[float] and has no Union for)
    length_factors: Any = field(default_factory=lambda: [0.5, 1, 2, 4])
    depths: List[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])  # relative needle depth
    num_kv_pairs: Optional[List[int]] = None  # MQAR pairs; null = data.mqar.num_kv_pairs x {1/2, 1, 2}
    examples: int = 64  # examples per grid cell
    batch_size: int = 16
    seed: int = 0  # the probe's own eval stream (with data.seed)
    # MQAR query slots: null = data.mqar.power_a (Zoology's power law; 0.01 puts most queries right after the
    # pairs, so long contexts test RoPE extrapolation more than distance); 1.0 = uniform over the context
    mqar_power_a: Optional[float] = None
    attention: bool = True  # trace the attention mass on the needle per layer
    figures: bool = True

    def __post_init__(self) -> None:
        coerce_choices(self, "probe.retrieval", strict=False)


def _names(key: str, value: Any, choice: type[Choice]) -> list:
    value = as_list(value)
    if not isinstance(value, list):
        raise invalid(key, value, f"a list of {', '.join(choice.values())}")
    return list(dict.fromkeys(choice.parse(v, key) for v in value))


def _numbers(key: str, value: Any, lo: float, hi: float, lo_open: bool) -> list[float]:
    value = as_list(value)
    ok = isinstance(value, list) and value and all(
        is_number(v) and (v > lo if lo_open else v >= lo) and v <= hi for v in value)
    if not ok:
        rng = f"({lo}, {hi}]" if lo_open else f"[{lo}, {hi}]"
        raise invalid(key, value, f"a non-empty list of numbers in {rng}")
    return sorted({float(v) for v in value})


def check_retrieval(c: RetrievalConfig) -> RetrievalConfig:
    """Raise ConfigError naming the first invalid ``probe.retrieval`` key; lists sorted and deduplicated in place."""
    k = "probe.retrieval."
    c.tasks = _names(k + "tasks", c.tasks, GridTask)
    c.detail_tasks = _names(k + "detail_tasks", c.detail_tasks, DetailTask)
    if not c.tasks and not c.detail_tasks:
        raise invalid(k + "tasks", c.tasks, "at least one task in tasks or detail_tasks")
    if c.lengths is not None:
        lengths = int_list(k + "lengths", c.lengths)
        if any(v < 8 or v % 2 for v in lengths):
            raise invalid(k + "lengths", c.lengths, "even integers >= 8 | null")
        c.lengths = sorted(set(lengths))
    c.length_factors = _numbers(k + "length_factors", c.length_factors, 0.0, math.inf, lo_open=True)
    c.depths = _numbers(k + "depths", c.depths, 0.0, 1.0, lo_open=False)
    if c.num_kv_pairs is not None:
        c.num_kv_pairs = sorted(set(int_list(k + "num_kv_pairs", c.num_kv_pairs)))
    positive_int(k + "examples", c.examples)
    positive_int(k + "batch_size", c.batch_size)
    _check_seed(k + "seed", c.seed)
    a = c.mqar_power_a
    if a is not None and not (is_number(a) and 0 < a < math.inf):
        raise invalid(k + "mqar_power_a", a, "null | a number > 0 (1.0 = query slots uniform over the context)")
    check_bool(k + "attention", c.attention)
    check_bool(k + "figures", c.figures)
    return c


# ---- lm_eval -------------------------------------------------------------------------------------------


@dataclass
class LmEvalConfig:
    """``probe=lm_eval``: lm-evaluation-harness on the trained model (mla_analysis.probes.lm_eval)."""

    tasks: Optional[List[str]] = None  # null = data's eval tasks that fit seq_len; else lm-eval task names
    examples: Optional[int] = None  # procedural examples per task (null = data.eval_examples)
    limit: Optional[int] = None  # lm-eval documents (answer spans) per task; null = all
    batch_size: int = 32
    num_fewshot: Optional[int] = None  # null = each task's default (0 for the procedural tasks)
    bootstrap_iters: int = 0  # lm-eval stderr bootstrap iterations


def check_lm_eval(c: LmEvalConfig) -> LmEvalConfig:
    """Raise ConfigError naming the first invalid ``probe.lm_eval`` key."""
    k = "probe.lm_eval."
    if c.tasks is not None:
        tasks = as_list(c.tasks)
        if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) and t for t in tasks):
            raise invalid(k + "tasks", c.tasks, "null or a non-empty list of task names")
        c.tasks = tasks
    for key in ("examples", "limit"):
        if getattr(c, key) is not None:
            positive_int(k + key, getattr(c, key))
    positive_int(k + "batch_size", c.batch_size)
    if c.num_fewshot is not None and not (isinstance(c.num_fewshot, int) and not isinstance(c.num_fewshot, bool)
                                          and c.num_fewshot >= 0):
        raise invalid(k + "num_fewshot", c.num_fewshot, "an integer >= 0 or null")
    non_negative_int(k + "bootstrap_iters", c.bootstrap_iters)
    return c


# ---- experts -------------------------------------------------------------------------------------------


@dataclass
class ExpertsConfig:
    """``probe=experts``: routing statistics of every DeepSeekMoE layer (mla_analysis.probes.experts)."""

    max_examples: int = 256  # sequences of each eval set (domain) fed through the model
    batch_size: int = 32
    compare_to: Optional[str] = None  # run directory of another checkpoint for router saturation; null = skip
    figures: bool = True
    # DeepSeekMoE redundancy test: mask each token's r highest-affinity routed experts; [] / null = skip
    redundancy_r: Optional[List[int]] = field(default_factory=lambda: [1, 2, 4])
    dense_baseline: Optional[str] = None  # run directory of a dense model with equal active parameters; null = skip
    dense_fraction: DenseFraction = DenseFraction.active  # neuron share zeroed in the dense model
    energy_rank: Optional[int] = 4  # low-rank K/V energy vs routing: rank of the truncation; null = skip
    energy_quantile: float = 0.75  # tokens with dropped energy >= this quantile form the "high" group
    permutation_resamples: int = 999
    energy_bins: int = 4  # quantile bins of dropped energy for the chance-corrected energy-expert MI
    # real domains (data.source=shakespeare): the held-out plays in windows, specialisation by genre / play /
    # kind / token class with permutation-calibrated MI (mla_analysis.probes.experts.domains)
    real_domains: bool = False
    window: Optional[int] = None  # tokens per window; null = data.seq_len
    max_windows_per_doc: Optional[int] = 16  # evenly spaced windows per held-out document; null = all
    mi_resamples: int = 199  # label permutations of the MI null
    seed: int = 0

    def __post_init__(self) -> None:
        coerce_choices(self, "probe.experts", strict=False)


def check_experts(c: ExpertsConfig) -> ExpertsConfig:
    """Raise ConfigError naming the first invalid ``probe.experts`` key (those of the model: when it runs)."""
    k = "probe.experts."
    positive_int(k + "max_examples", c.max_examples)
    positive_int(k + "batch_size", c.batch_size)
    _run_dir(k + "compare_to", c.compare_to)
    check_bool(k + "figures", c.figures)
    c.redundancy_r = [] if c.redundancy_r in (None, []) else int_list(k + "redundancy_r", c.redundancy_r)
    _run_dir(k + "dense_baseline", c.dense_baseline)
    if c.energy_rank is not None:
        positive_int(k + "energy_rank", c.energy_rank)
    _unit_interval(k + "energy_quantile", c.energy_quantile)
    positive_int(k + "permutation_resamples", c.permutation_resamples)
    positive_int(k + "energy_bins", c.energy_bins)
    if c.energy_bins < 2:
        raise invalid(k + "energy_bins", c.energy_bins, "an integer >= 2")
    check_bool(k + "real_domains", c.real_domains)
    for key in ("window", "max_windows_per_doc"):
        if getattr(c, key) is not None:
            positive_int(k + key, getattr(c, key))
    positive_int(k + "mi_resamples", c.mi_resamples)
    _check_seed(k + "seed", c.seed)
    return c


# ---- head_ablation -------------------------------------------------------------------------------------


@dataclass
class HeadAblationConfig:
    """``probe=head_ablation``: each head's ablation effect vs its key spectrum (mla_analysis.probes.head_ablation)."""

    max_examples: int = 64  # sequences of each eval set scored per ablation
    batch_size: int = 32
    max_tokens: int = 8192  # tokens of the "lm" eval set whose keys give the spectra
    rank: int = 4  # energy_dropped = energy outside the top ``rank`` singular values
    center: bool = False  # mean-centre the keys before the decomposition
    layers: Optional[List[int]] = None  # attention layers to ablate; null = all
    bootstrap_resamples: int = 999
    confidence_level: float = 0.95
    seed: int = 0
    figures: bool = True


def check_head_ablation(c: HeadAblationConfig) -> HeadAblationConfig:
    """Raise ConfigError naming the first invalid ``probe.head_ablation`` key (layer indices: when it runs)."""
    k = "probe.head_ablation."
    for key in ("max_examples", "batch_size", "max_tokens", "rank", "bootstrap_resamples"):
        positive_int(k + key, getattr(c, key))
    check_bool(k + "center", c.center)
    check_bool(k + "figures", c.figures)
    _unit_interval(k + "confidence_level", c.confidence_level)
    _check_seed(k + "seed", c.seed)
    if c.layers is not None:
        layers = as_list(c.layers)
        if not isinstance(layers, list) or not layers or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers):
            raise invalid(k + "layers", c.layers, "null | a non-empty list of layer indices")
        c.layers = layers
    return c


# ---- cost ----------------------------------------------------------------------------------------------


@dataclass
class CostConfig:
    """``probe=cost``: KV bytes per token, published-model extrapolation, decode timings (mla_analysis.probes.cost)."""

    contexts: List[int] = field(default_factory=lambda: [256, 1024])  # cached tokens before the timed steps
    batch_sizes: List[int] = field(default_factory=lambda: [1, 8])
    decode_steps: int = 16  # timed single-token steps per (path, context, batch); the median is reported
    warmup: bool = True  # one untimed prefill + decode first (allocator, kernel selection)
    dtypes: List[CacheDtype] = field(default_factory=lambda: [CacheDtype.fp32, CacheDtype.bf16])  # bytes check
    # bits per cached element DeepSeek-V2's deployment quantises to (a number: Any keeps YAML's 6 an int
    # in the records, as before; OmegaConf 2.3 has no Union[int, float])
    claim_bits: Any = 6
    extrap_context: int = 131072  # context for the GiB-per-sequence extrapolation of published models
    quick: bool = False  # a tiny decode grid (tests): contexts [32], batch [1], 2 steps, no warm-up
    figures: bool = True

    def __post_init__(self) -> None:
        coerce_choices(self, "probe.cost", strict=False)


def check_cost(c: CostConfig) -> CostConfig:
    """Raise ConfigError naming the first invalid ``probe.cost`` key."""
    k = "probe.cost."
    check_bool(k + "quick", c.quick)
    c.contexts = int_list(k + "contexts", c.contexts)
    c.batch_sizes = int_list(k + "batch_sizes", c.batch_sizes)
    positive_int(k + "decode_steps", c.decode_steps)
    positive_int(k + "extrap_context", c.extrap_context)
    check_bool(k + "warmup", c.warmup)
    check_bool(k + "figures", c.figures)
    dtypes = as_list(c.dtypes)
    if not isinstance(dtypes, list) or not dtypes:
        raise invalid(k + "dtypes", c.dtypes, f"a list of {', '.join(CacheDtype.values())}")
    try:
        c.dtypes = [CacheDtype.parse(d, k + "dtypes") for d in dtypes]
    except ConfigError:
        raise invalid(k + "dtypes", c.dtypes, f"a list of {', '.join(CacheDtype.values())}") from None
    if not is_number(c.claim_bits) or c.claim_bits <= 0:
        raise invalid(k + "claim_bits", c.claim_bits, "a number > 0")
    return c


# ---- real-text probes: kl, token_bins, copying, needles, next_line (mla_analysis/probes/_text.py) ------------


class IntervalMethod(Choice):
    """How an interval over units (windows, examples) is formed (``probe.<name>.interval``)."""

    bootstrap = "bootstrap"  # percentile interval over resampled units
    t = "t"  # r +- t_{n-1} x the delta-method standard error


class NeedleTask(Choice):
    """The needle tasks of ``probe=needles``."""

    passkey = "passkey"
    kv = "kv"


@dataclass
class IntervalConfig:
    """The interval keys shared by the real-text probes that resample their units (kl, token_bins, copying, needles)."""

    interval: IntervalMethod = IntervalMethod.bootstrap  # bootstrap | t (over windows or examples)
    confidence_level: float = 0.95
    resamples: int = 1000  # bootstrap resamples
    seed: int = 0  # the bootstrap's PCG64 seed (and copying's / needles' example draws)

    def __post_init__(self) -> None:
        coerce_choices(self, "probe", strict=False)


def _check_interval(k: str, c: IntervalConfig) -> None:
    """Raise ConfigError naming the first invalid interval key under prefix ``k`` (``probe.<name>.``)."""
    c.interval = IntervalMethod.parse(c.interval, k + "interval")
    _unit_interval(k + "confidence_level", c.confidence_level)
    positive_int(k + "resamples", c.resamples)
    _check_seed(k + "seed", c.seed)


@dataclass
class KlConfig(IntervalConfig):
    """``probe=kl``: KL(reference || model) and the NLL change on the held-out plays (mla_analysis.probes.kl)."""

    reference: Optional[str] = None  # run dir / HF dir / .gguf / model name; null = data.tokenizer's model
    seq_len: Optional[int] = None  # window length; null = data.seq_len
    stride: Optional[int] = None  # a new window every stride tokens; null = seq_len (disjoint windows)
    max_windows: Optional[int] = 64  # windows evenly spread over the evaluation plays; null = all
    batch_size: int = 4


def _check_windows(k: str, c: KlConfig) -> None:
    """The window, reference and interval keys of kl and token_bins (stride <= seq_len: when it runs)."""
    for key in ("seq_len", "stride", "max_windows"):
        if getattr(c, key) is not None:
            positive_int(k + key, getattr(c, key))
    positive_int(k + "batch_size", c.batch_size)
    if c.reference is not None and not isinstance(c.reference, (str, Path)):
        raise invalid(k + "reference", c.reference, "a path or model name, or null")
    _check_interval(k, c)


def check_kl(c: KlConfig) -> KlConfig:
    """Raise ConfigError naming the first invalid ``probe.kl`` key."""
    _check_windows("probe.kl.", c)
    return c


@dataclass
class TokenBinsConfig(KlConfig):
    """``probe=token_bins``: the NLL change per frequency bin, on names, numerals (mla_analysis.probes.token_bins)."""

    bins: int = 5  # frequency quantile bins (freq0 = rarest)


def check_token_bins(c: TokenBinsConfig) -> TokenBinsConfig:
    """Raise ConfigError naming the first invalid ``probe.token_bins`` key."""
    _check_windows("probe.token_bins.", c)
    positive_int("probe.token_bins.bins", c.bins)
    return c


@dataclass
class CopyingConfig(IntervalConfig):
    """``probe=copying``: NLL / top-1 on a repeated held-out passage against distance (mla_analysis.probes.copying)."""

    distances: List[int] = field(default_factory=lambda: [256, 512, 1024, 2048, 4096])  # filler tokens between
    passage_len: int = 64  # tokens of the repeated passage
    examples: int = 32  # passages (the same for every distance)
    batch_size: int = 4


def check_copying(c: CopyingConfig) -> CopyingConfig:
    """Raise ConfigError naming the first invalid ``probe.copying`` key; distances sorted and deduplicated in place."""
    k = "probe.copying."
    c.distances = sorted(set(int_list(k + "distances", c.distances)))
    for key in ("passage_len", "examples", "batch_size"):
        positive_int(k + key, getattr(c, key))
    if c.passage_len < 2:
        raise invalid(k + "passage_len", c.passage_len, "an integer >= 2")
    _check_interval(k, c)
    return c


NEEDLE_KEYS = 30  # len(mla_analysis.probes.needles.KEYS): the most kv needles an example can hold


@dataclass
class NeedlesConfig(IntervalConfig):
    """``probe=needles``: passkey / key-value needles over length x depth (mla_analysis.probes.needles)."""

    tasks: List[NeedleTask] = field(default_factory=lambda: list(NeedleTask))
    lengths: List[int] = field(default_factory=lambda: [512, 1024, 2048, 4096])  # tokens (<= model.max_seq_len)
    depths: List[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])  # place of the asked needle
    examples: int = 30  # per cell
    kv_needles: int = 4  # needles per kv example (one asked)
    batch_size: int = 4
    figures: bool = True


def check_needles(c: NeedlesConfig) -> NeedlesConfig:
    """Raise ConfigError naming the first invalid ``probe.needles`` key; lists sorted and deduplicated in place."""
    k = "probe.needles."
    tasks = as_list(c.tasks)
    if not isinstance(tasks, list) or not tasks:
        raise invalid(k + "tasks", c.tasks, f"a list of {', '.join(NeedleTask.values())}")
    c.tasks = _names(k + "tasks", tasks, NeedleTask)
    c.lengths = sorted(set(int_list(k + "lengths", c.lengths)))
    c.depths = _numbers(k + "depths", c.depths, 0.0, 1.0, lo_open=False)
    for key in ("examples", "kv_needles", "batch_size"):
        positive_int(k + key, getattr(c, key))
    if c.kv_needles > NEEDLE_KEYS:
        raise invalid(k + "kv_needles", c.kv_needles, f"1..{NEEDLE_KEYS}")
    check_bool(k + "figures", c.figures)
    _check_interval(k, c)
    return c


@dataclass
class NextLineConfig:
    """``probe=next_line``: the held-out next-line multiple choice through lm-eval (mla_analysis.probes.next_line)."""

    examples: int = 500
    context_lines: int = 4  # lines of the play before the asked line
    min_chars: int = 20  # shortest asked line
    length_tolerance: float = 0.3  # distractors within this fraction of the true line's characters (when enough)
    seed: int = 0
    batch_size: int = 16
    confidence_level: float = 0.95  # Wilson intervals over examples


def check_next_line(c: NextLineConfig) -> NextLineConfig:
    """Raise ConfigError naming the first invalid ``probe.next_line`` key."""
    k = "probe.next_line."
    for key in ("examples", "context_lines", "min_chars", "batch_size"):
        positive_int(k + key, getattr(c, key))
    if not is_number(c.length_tolerance) or not 0 < c.length_tolerance < math.inf:
        raise invalid(k + "length_tolerance", c.length_tolerance, "a number > 0")
    _unit_interval(k + "confidence_level", c.confidence_level)
    _check_seed(k + "seed", c.seed)
    return c


# ---- registry ------------------------------------------------------------------------------------------

PROBE_CONFIGS: dict[str, tuple[type, Callable[[Any], Any]]] = {
    "spectra": (SpectraConfig, check_spectra),
    "retrieval": (RetrievalConfig, check_retrieval),
    "lm_eval": (LmEvalConfig, check_lm_eval),
    "experts": (ExpertsConfig, check_experts),
    "head_ablation": (HeadAblationConfig, check_head_ablation),
    "cost": (CostConfig, check_cost),
    "kl": (KlConfig, check_kl),
    "token_bins": (TokenBinsConfig, check_token_bins),
    "copying": (CopyingConfig, check_copying),
    "needles": (NeedlesConfig, check_needles),
    "next_line": (NextLineConfig, check_next_line),
}


def probe_config(name: str, params: Any = None) -> Any:
    """The checked options of probe ``name`` from a dict (or its dataclass); ConfigError naming ``probe.<name>.<key>``."""
    if name not in PROBE_CONFIGS:
        raise ConfigError(f"probe.{name}: unknown probe (allowed: {', '.join(sorted(PROBE_CONFIGS))})")
    cls, check = PROBE_CONFIGS[name]
    if isinstance(params, cls):
        cfg = dataclasses.replace(params)  # a copy: checks normalise in place
    else:
        params = dict(params or {})
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(params) - set(known))
        if unknown:
            raise ConfigError(f"probe.{name}.{unknown[0]}: unknown key (allowed: {', '.join(sorted(known))})")
        cfg = cls(**params)
    coerce_choices(cfg, f"probe.{name}")
    return check(cfg)
