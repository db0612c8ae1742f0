"""Measuring a model: its quality on token windows (perplexity, NLL, KL) and its speed (a timing harness).

``perplexity`` cuts documents into sliding windows (``document_windows``), scores them in chunks
(``scored_nll``, ``token_kl``) and gives the eval-set metrics the trainer records (``lm_metrics``); ``timing`` times
A/B candidates in alternation and decode steps (``time_decode``), for the bench and the cost probe. Nothing
here imports the rest of the package, so that data, training, probes and the bench share it;
``mla_analysis.evaluation.perplexity`` re-exports ``perplexity`` from its old place.
"""
