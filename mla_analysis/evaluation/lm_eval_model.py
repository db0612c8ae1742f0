"""lm-eval adapter: the toolkit's Transformer as ``lm_eval`` model ``"mla_analysis"`` (KV-cached scoring and greedy decoding).

``lm_eval.simple_evaluate(model="mla_analysis", model_args="pretrained=PATH", tasks=[...])`` after
``import mla_analysis``; PATH is a toolkit run directory or a Hugging Face checkpoint directory
(:func:`mla_analysis.interop.hf_io.load_model`).

Tokenization. Models trained on the procedural data have integer vocabularies (``data/vocab.py``) and no
text tokenizer, so :class:`ProceduralTokenizer` maps text to ids: a text is a whitespace-separated list of
token *names* as :meth:`Vocab.name` writes them (``PAD BOS EOS QUERY KV IS PASSKEY COPY PLUS EQUALS ANSWER``,
``RESERVED11``.., digits ``0``..``9``, hex letters ``a``..``f``, words ``w0``, ``w1``, ...). Names, not raw
ids: the digit names ``0``..``9`` would otherwise be ambiguous. Decoding joins names with one space. A
Hugging Face checkpoint directory that holds a tokenizer uses ``transformers.AutoTokenizer`` from it
(``tokenizer=procedural`` forces the procedural one, ``tokenizer=PATH`` loads another).

Requests and the cache. Requests are bucketed by the length of their (truncated) context; a bucket of up
to ``batch_size`` rows is prefilled into one :class:`KVCache` (``Transformer.new_cache``) and then:
``loglikelihood`` runs the right-padded continuations as one more cached chunk (causal attention: padding
after a row's last token never reaches its scored positions); ``generate_until`` decodes greedily token by
token from the cache, as ``Transformer.generate``. ``loglikelihood_rolling`` uses lm-eval's own disjoint
rolling windows of ``max_length`` tokens (default ``model.max_seq_len``), so texts longer than the model's
context are scored window by window. Only greedy decoding is supported (``do_sample`` must be false).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from ..data.vocab import BOS, EOS, MIN_VOCAB_SIZE, PAD, Vocab

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ProceduralTokenizer:
    """Whitespace tokenizer over the procedural vocabulary: a text is space-separated token names."""

    def __init__(self, vocab_size: int):
        # the id layout is fixed for every vocab_size, so the names of a smaller vocab are a prefix
        name = Vocab(max(vocab_size, MIN_VOCAB_SIZE)).name
        self.vocab_size = vocab_size
        self.id_to_name = [name(i) for i in range(vocab_size)]
        self.name_to_id = {n: i for i, n in enumerate(self.id_to_name)}
        self.eos_token_id, self.bos_token_id, self.pad_token_id = EOS, BOS, PAD
        self.eos_token, self.bos_token, self.pad_token = (self.id_to_name[i] for i in (EOS, BOS, PAD))

    def encode(self, text: str) -> list[int]:
        """Ids of the whitespace-separated token names in ``text``; ValueError names an unknown token."""
        try:
            return [self.name_to_id[t] for t in text.split()]
        except KeyError as e:
            raise ValueError(
                f"procedural tokenizer: unknown token {e.args[0]!r} (allowed: names such as EOS, 7, a, w12; "
                f"vocab_size={self.vocab_size})"
            ) from None

    def decode(self, ids: Sequence[int]) -> str:
        """Token names joined by single spaces."""
        return " ".join(self.id_to_name[int(i)] for i in ids)

    def __len__(self) -> int:
        return self.vocab_size


def _as_batch_size(value: Any, max_batch_size: Optional[int]) -> int:
    """lm-eval passes ints, digit strings or "auto[:N]"; "auto" takes ``max_batch_size`` (default 64), no probing."""
    if value is None:
        return 1
    if isinstance(value, str) and value.startswith("auto"):
        return int(max_batch_size or 64)
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = 0
    if n < 1:
        raise ValueError(f"batch_size={value!r} is invalid (allowed: an integer > 0 or auto)")
    return n


def _hub_tokenizer(name: str):
    """A tokenizer by Hub id (needs a network or the Hugging Face cache)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name)


@register_model("mla_analysis")
class MLAnalysisLM(TemplateLM):
    """lm-eval LM over a toolkit Transformer: loglikelihood, rolling loglikelihood and greedy generation with the KV cache."""

    def __init__(
        self,
        pretrained: Optional[str] = None,
        model: Optional[torch.nn.Module] = None,
        tokenizer: Any = None,
        batch_size: Any = 1,
        max_batch_size: Optional[int] = None,
        device: Optional[str] = None,
        dtype: str = "float32",
        max_length: Optional[int] = None,
        max_gen_toks: int = 256,
    ):
        super().__init__()
        from ..interop.hf_io import load_model

        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if dtype not in _DTYPES:
            raise ValueError(f"dtype={dtype!r} is invalid (allowed: {', '.join(_DTYPES)})")
        if model is None:
            if pretrained is None:
                raise ValueError("model_args: pretrained=PATH is required (a run directory or a Hugging Face checkpoint dir)")
            model = load_model(pretrained, device=device)
        self.model = model.to(device=device, dtype=_DTYPES[dtype]).eval()
        self.cfg = self.model.cfg
        self._device = torch.device(device)
        self._batch_size = _as_batch_size(batch_size, max_batch_size)
        self._max_length = int(max_length or self.cfg.max_seq_len)
        self._max_gen_toks = int(max_gen_toks)
        self.tokenizer = self._make_tokenizer(tokenizer, pretrained)
        self.pretrained = None if pretrained is None else str(pretrained)

    # ---- tokenizer ---------------------------------------------------------------------------
    def _make_tokenizer(self, tokenizer: Any, pretrained: Optional[str]):
        from ..interop.hf_io import has_tokenizer, load_tokenizer, resolve_hf_dir

        if tokenizer is None and pretrained is not None:
            hf_dir = resolve_hf_dir(pretrained)  # a .gguf or a model name -> its cached HF dir
            if has_tokenizer(hf_dir):
                tokenizer = hf_dir
        if tokenizer is None or tokenizer == "procedural":
            return ProceduralTokenizer(self.cfg.vocab_size)
        if isinstance(tokenizer, (str, Path)):
            tokenizer = load_tokenizer(tokenizer) if Path(tokenizer).exists() else _hub_tokenizer(str(tokenizer))
        if len(tokenizer) > self.cfg.vocab_size:
            raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {self.cfg.vocab_size}")
        return tokenizer

    @property
    def is_procedural(self) -> bool:
        """True when texts are procedural token names (no Hugging Face tokenizer)."""
        return isinstance(self.tokenizer, ProceduralTokenizer)

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        # the procedural data marks boundaries with EOS (= SEP); HF checkpoints start with BOS when they have one
        if not self.is_procedural and self.tokenizer.bos_token_id is not None:
            return self.tokenizer.bos_token_id
        return self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return "procedural" if self.is_procedural else getattr(self.tokenizer, "name_or_path", "hf").replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> list[int]:
        """Token ids of ``string`` (no special tokens added: lm-eval supplies the prefix token itself)."""
        if self.is_procedural:
            return self.tokenizer.encode(string)
        return self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens))

    def tok_decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``."""
        return self.tokenizer.decode(list(ids))

    def get_model_info(self) -> dict:
        """Model facts lm-eval stores in results["config"]."""
        return {"model_attention": self.cfg.attention, "model_params": sum(p.numel() for p in self.model.parameters())}

    # ---- scoring -----------------------------------------------------------------------------
    def _buckets(self, lengths: Sequence[int]) -> list[list[int]]:
        """Request indices grouped by context length, in chunks of at most batch_size (one shared cache start)."""
        by_len: dict[int, list[int]] = defaultdict(list)
        for i, n in enumerate(lengths):
            by_len[n].append(i)
        out = []
        for n in sorted(by_len, reverse=True):  # longest first: an out-of-memory error shows up at once
            idx = by_len[n]
            out += [idx[j : j + self.batch_size] for j in range(0, len(idx), self.batch_size)]
        return out

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(sum log p(continuation | context), continuation is the greedy one) per ``(key, ctx_ids, cont_ids)``."""
        prefixes, conts = [], []
        for _, ctx, cont in requests:
            if not cont:
                raise ValueError("loglikelihood: empty continuation")
            if len(cont) > self.max_length:
                raise ValueError(f"loglikelihood: continuation of {len(cont)} tokens > max_length={self.max_length}")
            # the model sees at most max_length tokens: prefix + cont[:-1], the prefix cut from the left
            prefixes.append(list(ctx)[-(self.max_length + 1 - len(cont)) :])
            conts.append(list(cont))
        results: list[Optional[tuple[float, bool]]] = [None] * len(requests)
        for idx in self._buckets([len(p) for p in prefixes]):
            B, T = len(idx), len(prefixes[idx[0]])
            Lc = max(len(conts[i]) for i in idx)
            cache = self.model.new_cache(B, T + Lc - 1)
            ctx = torch.tensor([prefixes[i] for i in idx], device=self.device)  # (B, T)
            first = self.model(ctx, cache=cache)[:, -1:]  # (B, 1, V): predicts cont[0]
            if Lc > 1:
                rest = torch.full((B, Lc - 1), PAD, dtype=torch.long, device=self.device)
                for r, i in enumerate(idx):
                    rest[r, : len(conts[i]) - 1] = torch.tensor(conts[i][:-1])
                logits = torch.cat([first, self.model(rest, cache=cache)], dim=1)  # (B, Lc, V)
            else:
                logits = first
            logp = F.log_softmax(logits.float(), dim=-1)  # (B, Lc, V)
            for r, i in enumerate(idx):
                n = len(conts[i])
                target = torch.tensor(conts[i], device=self.device)  # (n,)
                lp = logp[r, :n].gather(-1, target[:, None]).sum()
                greedy = bool((logp[r, :n].argmax(-1) == target).all())
                results[i] = (float(lp), greedy)
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], results[i])
        return results  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole text, in lm-eval's disjoint windows of ``max_length`` tokens."""
        windows, owner = [], []
        for k, (string,) in enumerate(req.args for req in requests):
            for ctx, cont in map(
                make_disjoint_window,
                get_rolling_token_windows(
                    token_list=self.tok_encode(string),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            ):
                windows.append((None, ctx, cont))
                owner.append(k)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=True)
        totals = [0.0] * len(requests)
        for k, (lp, _) in zip(owner, scores):
            totals[k] += lp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ---- generation --------------------------------------------------------------------------
    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuation of each context, cut at the first ``until`` string (and at the EOS token's text)."""
        prepared = []
        for req in requests:
            context, kwargs = req.args
            kwargs = dict(kwargs or {})
            if kwargs.pop("do_sample", False) or float(kwargs.pop("temperature", 0.0) or 0.0) > 0.0:
                raise ValueError("generate_until: only greedy decoding is supported (do_sample=false, temperature=0)")
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            eos_text = self.tok_decode([self.eot_token_id])
            if eos_text not in until:
                until.append(eos_text)
            max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            if max_new < 1 or max_new >= self.max_length:
                raise ValueError(f"generate_until: max_gen_toks={max_new} is invalid (allowed: 1..{self.max_length - 1})")
            ids = self.tok_encode(context)[-(self.max_length - max_new) :] or [self.prefix_token_id]
            prepared.append((ids, until, max_new))
        out: list[Optional[str]] = [None] * len(requests)
        # a bucket shares context length and token budget, so all rows decode from one cache in lockstep
        keys = [(len(ids), max_new) for ids, _, max_new in prepared]
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, key in enumerate(keys):
            groups[key].append(i)
        for (T, max_new), members in sorted(groups.items(), reverse=True):
            for j in range(0, len(members), self.batch_size):
                idx = members[j : j + self.batch_size]
                tokens = self._greedy([prepared[i][0] for i in idx], max_new, [prepared[i][1] for i in idx])
                for i, toks in zip(idx, tokens):
                    text = self._cut(self.tok_decode(toks), prepared[i][1])
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out  # type: ignore[return-value]

    def _greedy(self, contexts: list[list[int]], max_new: int, until: list[list[str]]) -> list[list[int]]:
        """Greedy tokens [B][<= max_new] from a shared cache, as ``Transformer.generate``; a row stops once an until string appears."""
        B, T = len(contexts), len(contexts[0])
        cache = self.model.new_cache(B, T + max_new)
        logits = self.model(torch.tensor(contexts, device=self.device), cache=cache)[:, -1]  # (B, V)
        new: list[list[int]] = [[] for _ in range(B)]
        done = [False] * B
        for step in range(max_new):
            nxt = logits.argmax(-1)  # (B,)
            for r in range(B):
                if not done[r]:
                    new[r].append(int(nxt[r]))
                    text = self.tok_decode(new[r])
                    done[r] = any(u in text for u in until[r])
            if all(done) or step == max_new - 1:
                break
            logits = self.model(nxt[:, None], cache=cache)[:, -1]  # (B, V)
        return new

    def _cut(self, text: str, until: list[str]) -> str:
        """``text`` up to the earliest occurrence of any stop string (procedural: without the separator before it)."""
        cut = min([text.find(u) for u in until if u and u in text], default=len(text))
        return text[:cut].rstrip(" ") if self.is_procedural else text[:cut]
