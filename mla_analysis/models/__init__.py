"""Models: the decoder-only transformer and its parts, written after the reference implementations.

``transformer.Transformer`` builds any ``config.ModelConfig``: attention (``attention``: MHA / GQA / MQA;
``mla``: DeepSeek's multi-head latent attention, decoupled or coupled RoPE, naive or absorbed decoding),
the FFN (``mlp``: SwiGLU / GELU; ``moe``: DeepSeekMoE), ``rope`` (RoPE and YaRN), ``norm`` and the KV
caches (``cache``). Nothing here imports beyond ``mla_analysis.config``.
"""
