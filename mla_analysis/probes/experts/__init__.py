"""``probe=experts``: routing statistics of every DeepSeekMoE layer on the eval sets (``probe.py`` defines each key).

- ``statistics``: load, MaxVio inputs, routing entropy, domain / vocabulary specialisation, mutual
  information, router saturation (pure functions of the chosen experts and affinities);
- ``coact``: expert co-activation (OLMoE paper definition);
- ``masking``: the expert redundancy test (DeepSeekMoE Fig. 4) and its dense baseline;
- ``energy``: low-rank K/V energy vs routing, with permutation tests (and energy quantile bins vs experts);
- ``domains``: real domains on the held-out plays (genre, play, kind, token class; ``real_domains``);
- ``probe``: the probe entry (``run``, registered as "experts"), the collection of routing and the figures.
"""

from .coact import coactivation, coactivation_counts, mean_offdiag
from .domains import FUNCTION_WORDS, KIND_LABELS, TOKEN_CLASSES, play_windows, stream_labels, token_classes
from .energy import (dropped_energy, energy_bins_mi, energy_routing_data, energy_routing_stats, energy_section,
                     group_expert_mi, kv_content, kv_rank_bound, window_ids)
from .masking import (dense_neuron_fraction, dense_redundancy, eval_losses, ffn_neuron_activity, main_set,
                      masked_top_experts, redundancy, redundancy_section, top_neurons, zeroed_neurons)
from .probe import check_model, run
from .statistics import (assignment_table, calibrated_mi, domain_counts, domain_specialisation, entropy, expert_label_mi, load_cv, load_fraction,
                         membership, mutual_information, rank_by_score, saturation, token_entropy_sum, top_domain_share,
                         permuted_labels, table_mi, vocab_specialisation)

__all__ = [
    "FUNCTION_WORDS", "KIND_LABELS", "TOKEN_CLASSES", "assignment_table", "calibrated_mi", "energy_bins_mi",
    "permuted_labels", "play_windows", "stream_labels", "table_mi", "token_classes", "window_ids",
    "check_model", "coactivation", "coactivation_counts", "dense_neuron_fraction", "dense_redundancy", "domain_counts",
    "domain_specialisation", "dropped_energy", "energy_routing_data", "energy_routing_stats", "energy_section",
    "entropy", "eval_losses", "expert_label_mi", "ffn_neuron_activity", "group_expert_mi", "kv_content",
    "kv_rank_bound", "load_cv", "load_fraction", "main_set", "masked_top_experts", "mean_offdiag", "membership",
    "mutual_information", "rank_by_score", "redundancy", "redundancy_section", "run", "saturation",
    "token_entropy_sum", "top_domain_share", "top_neurons", "vocab_specialisation", "zeroed_neurons",
]
