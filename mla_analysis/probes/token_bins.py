"""``probe=token_bins``: NLL(model) - NLL(reference) by token frequency, on names and numerals (the "fine detail" worry).

Same windows, reference and forward passes as ``probe=kl`` (mla_analysis/probes/kl.py; both probes in one run
share one pass). Every scored position of the held-out windows falls into

- ``freq<k>``, k = 0 (rarest) .. ``bins`` - 1: the target token's count in the *training* plays
  (data.shakespeare.train_edition), cut at the quantiles of that count over the scored positions, so the bins
  hold about equal numbers of held-out tokens (tied counts stay in one bin; a bin whose edges coincide is
  empty and left out); ``unseen``: tokens never seen in training (also in freq0);
- ``names``: tokens of spoken text (kind "line", mla_analysis.data.shakespeare.char_kinds) inside a character
  name of the play's persons list ("PERSONS REPRESENTED" / "DRAMATIS PERSONAE": per entry the capitalised
  words before the first comma, titles and roles such as Sir, King, Clown dropped, matched as whole words in
  title case, possessives included), all of the name's tokens; poems have no list;
- ``numerals``: spoken-text tokens inside a digit run or a cardinal/ordinal number word (one .. thousand,
  first .. tenth; the texts hold almost no digits);
- ``kind.<line|stage|speaker|other>``: the token's kind; ``all``: every scored position.

Options: ``mla_analysis.config.probes.TokenBinsConfig`` (conf/probe/token_bins.yaml).

Keys (under ``probe.token_bins.``): ``<bin>.delta_nll.*``, ``<bin>.nll.*``, ``<bin>.nll_ref.*`` (statistics
``.mean/.ci_low/.ci_high/.n/.tokens``, units = windows), ``<bin>.count_min`` / ``.count_max`` (training counts,
freq bins), ``bins`` (the bin names in order), ``train_tokens``, ``names_found`` (distinct names per play are
in token_bins.json), interval fields as ``probe=kl``. token_bins.json (atomic) holds the same plus the names.
Functions: :func:`persons`, :func:`token_flags`, :func:`frequency_bins`, :func:`bin_metrics`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..config import ConfigError
from . import ProbeError, register
from ._common import options
from .kl import IGNORE, compared, window_sums
from ._text import flat, interval_fields, model_tokenizer, ratio_interval, shakespeare_split

NAME, NUMERAL = 1, 2  # bit flags of token_flags
_PERSONS = re.compile(r"^\s*(PERSONS REPRESENTED|DRAMATIS PERSONAE|Dramatis Personae|Persons Represented|"
                      r"The Names of the Actors|The Actors Names)", re.M | re.I)
_END_OF_LIST = re.compile(r"^\s*(ACT|Act|SCENE|Scene|Actus|PROLOGUE|Prologue|INDUCTION|Induction)\b")
# titles, roles and function words of cast-list entries: not names
_NOT_NAMES = frozenset("""sir lord lady lords ladies king queen duke duchess prince princess earl marquess bishop
archbishop cardinal the and of to a an two three four first second third ghost clown clowns players player gentleman
gentlemen gentlewoman priest captain officer officers servant servants attendants attendant messenger messengers
soldiers soldier sailors sailor musicians citizens citizen murderers murderer scene persons represented dramatis
personae mistress master boy page friar doctor son daughter wife mother father brother sister other others
ambassadors ambassador english sheriff keeper lieutenant mayor jew jailer gaoler courtier courtiers officer
nephew uncle niece cousin widow maid woman women men man young old names actors his her their with friend friends
attending on in sea sons daughters brothers sisters marquis another magnificoes fourth fifth sixth seventh
eighth lord's king's""".split())
_NUMBER_WORDS = ("one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
                 "seventeen eighteen nineteen twenty thirty forty fifty sixty seventy eighty ninety hundred thousand "
                 "first second third fourth fifth sixth seventh eighth ninth tenth").split()
_NUMERALS = re.compile(r"\d+|\b(?:" + "|".join(_NUMBER_WORDS) + r")\b", re.I)


def persons(text: str) -> list[str]:
    """Character names (title case) of a play's persons list, in order of appearance; [] when it has none."""
    m = _PERSONS.search(text)
    if m is None:
        return []
    names: list[str] = []
    for line in text[m.end():].splitlines()[1:120]:
        if _END_OF_LIST.match(line):
            break
        entry = line.split(",")[0]
        for word in re.findall(r"[A-Za-z][A-Za-z'\-]+", entry):
            word = re.sub(r"'s$", "", word)  # "Ghost of Hamlet's Father": Hamlet
            if word[0].isupper() and len(word) >= 3 and word.lower() not in _NOT_NAMES:
                name = word.capitalize()
                if name not in names:
                    names.append(name)
    return names


def token_flags(text: str, offsets: np.ndarray, names: Sequence[str]) -> np.ndarray:
    """Per token [N] uint8: NAME if any of its characters is inside a name match, NUMERAL likewise for a numeral."""
    n = len(text)
    char = np.zeros(n + 1, dtype=np.uint8)
    if names:
        pat = re.compile(r"\b(?:" + "|".join(re.escape(x) for x in sorted(names, key=len, reverse=True)) + r")\b")
        for m in pat.finditer(text):
            char[m.start(): m.end()] |= NAME
    for m in _NUMERALS.finditer(text):
        char[m.start(): m.end()] |= NUMERAL
    out = np.zeros(len(offsets), dtype=np.uint8)
    for bit in (NAME, NUMERAL):
        c = np.concatenate([[0], np.cumsum((char[:n] & bit) > 0)])  # prefix counts of flagged characters
        s, e = np.clip(offsets[:, 0], 0, n), np.clip(offsets[:, 1], 0, n)
        out |= np.where(c[e] - c[s] > 0, bit, 0).astype(np.uint8)
    return out


def document_flags(labelled, tokenizer) -> tuple[dict[str, np.ndarray], dict[str, list[str]]]:
    """name -> per-token code (flags | kind << 2) of each held-out document, and the names found per document."""
    from ..data.shakespeare import read_text

    codes, found = {}, {}
    docs = labelled.document_tokens()
    for d, (s, e) in zip(labelled.docs, labelled.spans):
        text = read_text(d.path)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = np.asarray(enc["input_ids"], dtype=np.int64)
        if not np.array_equal(ids, docs[d.name]):
            raise ProbeError(f"probe.token_bins: {d.path}: re-tokenising does not reproduce the cached tokens")
        names = persons(text) if d.genre != "poem" else []
        flags = token_flags(text, np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2), names)
        kind = np.asarray(labelled.kind[s: s + len(ids)], dtype=np.int64)
        spoken = kind == 0  # KINDS[0] = "line": names and numerals count in spoken text only
        codes[d.name] = (np.where(spoken, flags, 0).astype(np.int64)) | (kind << 2)
        found[d.name] = names
    return codes, found


def frequency_bins(counts: np.ndarray, n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """(bin index per position, rarest = 0; edges) from training counts at the scored positions, quantile cuts."""
    edges = np.quantile(counts, np.arange(1, n_bins) / n_bins) if len(counts) else np.zeros(0)
    return np.searchsorted(edges, counts, side="right"), edges


def bin_metrics(tokens: dict[str, torch.Tensor], targets: torch.Tensor, codes: torch.Tensor, train_counts: np.ndarray,
                p: dict) -> dict[str, Any]:
    """The flat record: per bin the NLL change, NLL and reference NLL with intervals over windows."""
    from ..data.shakespeare import KINDS

    mask = targets != IGNORE
    count = torch.from_numpy(train_counts[np.where(mask.numpy(), targets.numpy(), 0)])  # [n, L] training count of the target
    edges = torch.from_numpy(frequency_bins(count[mask].numpy(), p["bins"])[1])
    bin_of = torch.searchsorted(edges.to(torch.float64), count.double().contiguous(), right=True)  # [n, L] bin index
    groups: list[tuple[str, torch.Tensor]] = [("all", mask)]
    out: dict[str, Any] = {}
    for k in range(p["bins"]):
        sel = mask & (bin_of == k)
        if sel.any():
            groups.append((f"freq{k}", sel))
            out[f"freq{k}.count_min"], out[f"freq{k}.count_max"] = int(count[sel].min()), int(count[sel].max())
    groups += [("unseen", mask & (count == 0)), ("names", mask & ((codes & NAME) > 0)),
               ("numerals", mask & ((codes & NUMERAL) > 0))]
    groups += [(f"kind.{kind}", mask & ((codes >> 2) == j)) for j, kind in enumerate(KINDS)]
    iv = dict(method=p["interval"], level=p["confidence_level"], resamples=p["resamples"], seed=p["seed"])
    delta = tokens["nll"] - tokens["nll_ref"]
    names = []
    for name, sel in groups:
        if not sel.any():
            continue
        names.append(name)
        for key, v in (("delta_nll", delta), ("nll", tokens["nll"]), ("nll_ref", tokens["nll_ref"])):
            out.update(flat(f"{name}.{key}", ratio_interval(*window_sums(v, sel), **iv)))
    out["bins"] = names
    out.update(interval_fields(p, "window"))
    return out


@register("token_bins")
def run(model: torch.nn.Module, params: dict, data_cfg: Any, run_dir: Path, device: torch.device) -> dict:
    """NLL change (model - reference) per training-frequency bin, on names and numerals, with intervals over windows."""
    from ..metrics.perplexity import document_windows
    from ..training.results import atomic_write_json
    from ._common import unwrap

    p = options("token_bins", params)  # TokenBinsConfig: KlConfig's keys and bins
    train = shakespeare_split(data_cfg, "token_bins", "train")
    evaluation = shakespeare_split(data_cfg, "token_bins", "evaluation")
    tok = model_tokenizer(data_cfg, "token_bins")
    if not getattr(tok, "is_fast", False):
        raise ConfigError("probe.token_bins: data.tokenizer must be a fast tokenizer (character offsets)")
    windows, tokens = compared(unwrap(model), p, data_cfg, device, "token_bins")
    codes, found = document_flags(evaluation, tok)
    code_windows = document_windows(codes, windows[1].shape[1], windows.stride, p["max_windows"])[1]  # aligned with targets
    V = unwrap(model).head.out_features
    train_counts = np.bincount(train.tokens, minlength=V).astype(np.int64)
    out = bin_metrics(tokens, windows[1], code_windows.clamp(min=0), train_counts, p)
    out["train_tokens"] = int(len(train.tokens))
    out["names_found"] = int(sum(len(v) for v in found.values()))
    atomic_write_json(Path(run_dir) / "token_bins.json", {**out, "names": found})
    return out
