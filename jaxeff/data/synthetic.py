"""The embedded default corpus: five synthetic text domains, generated on the fly (no download).

Every domain is a pure function of ``(domain, seed, document index, doc_len)``:

* each document ``i`` is drawn from its own ``numpy.random.default_rng([seed % 2**64, crc32(domain), i])``, so the
  output is identical across runs and processes, and ``generate_documents(d, n, s)[:k] ==
  generate_documents(d, k, s)`` (a prefix property: asking for more documents never changes earlier ones);
* the *language* of a domain (the prose Markov transition table, the name/city/job vocabularies) is fixed:
  it is built once from a constant seed, not from ``seed``. A train split and an eval split made with
  two different seeds therefore hold different documents drawn from the same distribution.

``doc_len`` is the maximum length of a document in characters (default ``DEFAULT_DOC_LEN``); documents
are built from whole units (lines, sentences, snippets) and stop before the next unit would overflow, so
their length is between roughly ``doc_len`` minus one unit and ``doc_len``. Everything is ASCII, so with
the byte tokenizer one character is one token.

For ``recall`` to test memory, a whole document must fit in one packed row: with the byte tokenizer,
``seq_len >= doc_len + 2`` (bos and eos); a longer document is split across rows, and a row that holds
only queries cannot be predicted.
"""

from __future__ import annotations

import bisect
import zlib
from typing import Callable, Iterator

import numpy as np

from jaxeff.errors import DataError

__all__ = ["DOMAINS", "DOMAIN_DESCRIPTIONS", "DEFAULT_DOC_LEN", "MIN_DOC_LEN", "generate_documents", "carry_steps", "arithmetic_additions"]

DOMAINS = ("arithmetic", "records", "prose", "code", "recall")

DOMAIN_DESCRIPTIONS: dict[str, str] = {
    "arithmetic": "one exact expression per line: 'a+b=c', 'a-b=c', 'a*b=c' and two-step ones like "
    "'(a+b)*c=d' or 'a*b+c=d'; the answer is fully determined by the line (exact, learnable)",
    "records": "structured person records (id, name, age, city, country, job, email) as JSON lines, CSV with "
    "a header, or 'key: value | ...' lines; country follows from city, email from name, ids count up",
    "prose": "English-like sentences and paragraphs from a fixed order-1 word-level Markov chain over ~350 "
    "words with a part-of-speech grammar (fixed transition table)",
    "code": "Python-like functions and classes from templates (def/for/if/while/return/class), with "
    "consistent variable names and 'assert f(x) == y' lines whose value is computed exactly",
    "recall": "long-range copy: a list of random 'key=value' pairs, a long prose filler, then queries "
    "'key?value' for every key in shuffled order; predicting a value needs the start of the document",
}

DEFAULT_DOC_LEN = 1000
MIN_DOC_LEN = 64

_LANGUAGE_SEED = 0x6A617865  # fixed: the languages of the domains never depend on the user's seed


def _domain_key(domain: str) -> int:
    return zlib.crc32(domain.encode("utf-8"))


def _fill(units: Iterator[tuple[str, str]], doc_len: int) -> str:
    """Join ``(separator, text)`` units until the next one would overflow doc_len (the first unit is
    truncated if it alone is longer). The separator of the first unit is dropped."""
    parts: list[str] = []
    n = 0
    for sep, text in units:
        if not parts:
            if len(text) >= doc_len:
                return text[:doc_len]
            parts.append(text)
            n = len(text)
            continue
        add = len(sep) + len(text)
        if n + add > doc_len:
            break
        parts.append(sep)
        parts.append(text)
        n += add
    return "".join(parts)


# ----------------------------------------------------------------------------------------------- arithmetic


def _arithmetic_units(rng: np.random.Generator) -> Iterator[tuple[str, str]]:
    while True:
        m = 256
        kind = rng.integers(0, 6, size=m)
        digits = rng.integers(1, 4, size=(m, 2))  # 1..3 digits per operand
        hi = 10**digits
        a = rng.integers(0, hi[:, 0])
        b = rng.integers(0, hi[:, 1])
        c = rng.integers(1, 10, size=m)
        small_a = rng.integers(0, 100, size=m)
        small_b = rng.integers(0, 10, size=m)
        for i in range(m):
            k = int(kind[i])
            x, y, z = int(a[i]), int(b[i]), int(c[i])
            if k == 0 or k == 1:
                line = f"{x}+{y}={x + y}"
            elif k == 2:
                line = f"{x}-{y}={x - y}"
            elif k == 3:
                sa, sb = int(small_a[i]), int(small_b[i])
                line = f"{sa}*{sb}={sa * sb}"
            elif k == 4:
                sa, sb = int(small_a[i]), int(small_b[i])
                line = f"({sa}+{sb})*{z}={(sa + sb) * z}"
            else:
                sa, sb = int(small_a[i]), int(small_b[i])
                line = f"{sa}*{sb}+{y}={sa * sb + y}"
            yield "\n", line


def carry_steps(a: int, b: int) -> str:
    """The rationale of ``a + b`` (non-negative): its column additions from the ones digit up, each
    ``x+y+c=s`` with ``c`` the carry in, joined by commas. The answer's digits are the last digit of
    each ``s`` read backwards, the last ``s`` giving the leading ones: ``carry_steps(27, 58) ==
    '7+8+0=15,2+5+1=8'`` (85), ``carry_steps(95, 17) == '5+7+0=12,9+1+1=11'`` (112). The shorter
    operand is padded with zeros."""
    if a < 0 or b < 0:
        raise DataError(f"carry_steps: expected non-negative operands (got {a}, {b})")
    xs, ys = str(a)[::-1], str(b)[::-1]
    steps, carry = [], 0
    for k in range(max(len(xs), len(ys))):
        x = int(xs[k]) if k < len(xs) else 0
        y = int(ys[k]) if k < len(ys) else 0
        s = x + y + carry
        steps.append(f"{x}+{y}+{carry}={s}")
        carry = s // 10
    return ",".join(steps)


def arithmetic_additions(n: int, seed: int, *, digits: int = 3) -> list[dict[str, str]]:
    """``n`` addition problems with their rationale, for multi-task training on rationales (distilling
    step-by-step, jaxeff.distill.step_by_step): ``{"question": "27+58", "answer": "85", "rationale":
    carry_steps(27, 58)}``. Operands as the arithmetic domain's ``a+b`` lines draw them (1 to ``digits``
    digits each, uniform below ``10**digits``); problem ``i`` depends only on ``(seed, i, digits)`` (the
    prefix property of :func:`generate_documents`). The arithmetic domain's own documents do not change."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise DataError(f"arithmetic_additions: n must be a non-negative integer, got {n!r}")
    if isinstance(digits, bool) or not isinstance(digits, (int, np.integer)) or not 1 <= digits <= 18:
        raise DataError(f"arithmetic_additions: digits must be an integer from 1 to 18, got {digits!r}")
    key = _domain_key("arithmetic_additions")
    out = []
    for i in range(int(n)):
        rng = np.random.default_rng([int(seed) % 2**64, key, int(digits), i])
        da, db = rng.integers(1, digits + 1, size=2)
        a, b = int(rng.integers(0, 10 ** int(da))), int(rng.integers(0, 10 ** int(db)))
        out.append({"question": f"{a}+{b}", "answer": str(a + b), "rationale": carry_steps(a, b)})
    return out


# -------------------------------------------------------------------------------------------------- records

_FIRST = (
    "Alice Bruno Carla David Elena Felix Grace Hugo Irene Jonas Karin Liam Maria Nina Oscar Paula Quinn Rosa "
    "Simon Tara Umar Vera Walter Xenia Yusuf Zoe Anton Bea Caleb Dora Emil Fiona Gustav Hanna Ivan Julia Kofi "
    "Lena Marco Noor"
).split()
_LAST = (
    "Smith Garcia Muller Rossi Novak Silva Kowalski Jensen Dubois Tanaka Okafor Larsen Costa Weber Moreau "
    "Fischer Horvat Ivanova Lindqvist Mendes Nagy Olsen Petrov Quist Romero Schmidt Torres Vogel Walsh Young "
    "Becker Castro Dahl Eriksen Ferreira Gomez Hahn Ito Jovanovic Klein"
).split()
_CITIES = (
    ("Lisbon", "Portugal"),
    ("Porto", "Portugal"),
    ("Madrid", "Spain"),
    ("Seville", "Spain"),
    ("Paris", "France"),
    ("Lyon", "France"),
    ("Berlin", "Germany"),
    ("Munich", "Germany"),
    ("Rome", "Italy"),
    ("Milan", "Italy"),
    ("Vienna", "Austria"),
    ("Prague", "Czechia"),
    ("Warsaw", "Poland"),
    ("Krakow", "Poland"),
    ("Oslo", "Norway"),
    ("Bergen", "Norway"),
    ("Stockholm", "Sweden"),
    ("Helsinki", "Finland"),
    ("Dublin", "Ireland"),
    ("Cork", "Ireland"),
    ("Tokyo", "Japan"),
    ("Osaka", "Japan"),
    ("Lagos", "Nigeria"),
    ("Nairobi", "Kenya"),
    ("Lima", "Peru"),
    ("Quito", "Ecuador"),
    ("Toronto", "Canada"),
    ("Denver", "USA"),
    ("Boston", "USA"),
    ("Budapest", "Hungary"),
)
_JOBS = (
    "baker teacher nurse engineer farmer pilot chemist plumber writer painter lawyer dentist carpenter "
    "librarian mechanic gardener tailor chef architect electrician pharmacist designer courier translator "
    "surveyor"
).split()
_MAIL = ("mail.com", "post.net", "inbox.org")
_FIELDS = ("id", "name", "age", "city", "country", "job", "email")


def _records_units(rng: np.random.Generator) -> Iterator[tuple[str, str]]:
    fmt = int(rng.integers(0, 3))
    next_id = int(rng.integers(1000, 9000))
    if fmt == 1:
        yield "\n", ",".join(_FIELDS)
    while True:
        m = 128
        fi = rng.integers(0, len(_FIRST), size=m)
        li = rng.integers(0, len(_LAST), size=m)
        ci = rng.integers(0, len(_CITIES), size=m)
        ji = rng.integers(0, len(_JOBS), size=m)
        ages = rng.integers(18, 91, size=m)
        mi = rng.integers(0, len(_MAIL), size=m)
        for i in range(m):
            first, last = _FIRST[fi[i]], _LAST[li[i]]
            city, country = _CITIES[ci[i]]
            job, age = _JOBS[ji[i]], int(ages[i])
            email = f"{first.lower()}.{last.lower()}@{_MAIL[mi[i]]}"
            rid = next_id
            next_id += 1
            if fmt == 0:
                line = (
                    f'{{"id": {rid}, "name": "{first} {last}", "age": {age}, "city": "{city}", '
                    f'"country": "{country}", "job": "{job}", "email": "{email}"}}'
                )
            elif fmt == 1:
                line = f"{rid},{first} {last},{age},{city},{country},{job},{email}"
            else:
                line = f"id: {rid} | name: {first} {last} | age: {age} | city: {city} | country: {country} | job: {job} | email: {email}"
            yield "\n", line


# ---------------------------------------------------------------------------------------------------- prose

_WORDS: dict[str, str] = {
    "DET": "the a every this that each some no one another her his their our my its",
    "PRON": "she he they we it someone everyone nobody",
    "ADJ": (
        "old young small large quiet loud bright dark warm cold green red blue golden silver wooden broken "
        "gentle brave tired happy strange distant narrow wide heavy light ancient early late empty full "
        "hidden open simple careful curious patient restless silent sudden steady tall short round sharp "
        "soft hard wild calm bitter sweet rough smooth clever proud humble lonely busy "
        "faint frozen hollow noble plain rusty sleepy crooked dusty eager fierce grey pale bold thin"
    ),
    "NOUN": (
        "house river mountain garden window door road city village forest field boat bridge tower market "
        "station library school kitchen table chair lamp book letter map key coin box bottle basket stone "
        "tree flower leaf bird horse dog cat fox wolf fish child teacher farmer doctor sailor soldier king "
        "queen merchant stranger friend brother sister mother father neighbor captain painter baker "
        "morning evening night winter summer storm rain wind snow sun moon star sky cloud sea shore island "
        "valley hill path wall roof fire candle song story dream question answer promise secret journey "
        "voice shadow mirror clock bell ship wagon "
        "harbor lantern meadow orchard cottage castle chapel cellar ladder rope blanket coat hat ring "
        "sword shield thread needle barrel kettle owl goat sheep bear mouse crow"
    ),
    "VERB": (
        "saw found carried opened closed watched followed crossed built painted wrote read heard remembered "
        "forgot visited left reached touched lifted dropped pushed pulled held kept sold bought made broke "
        "fixed cleaned climbed passed answered asked called thanked helped warned met chased caught "
        "noticed studied counted measured gathered planted burned covered loved feared trusted guarded "
        "carved shared borrowed returned "
        "hid showed washed folded mended dug filled emptied named tied untied rang sang described "
        "lit stirred wrapped polished"
    ),
    "ADV": (
        "quietly slowly quickly carefully suddenly finally gently often rarely always never soon later again together alone almost nearly still already"
    ),
    "PREP": "in on under near beside behind across through over with from into toward after before around along",
    "CONJ": "and but while because so yet although when",
}

# category -> {next category: probability}; "END" ends the sentence.
_GRAMMAR: dict[str, dict[str, float]] = {
    "START": {"DET": 0.6, "PRON": 0.3, "ADV": 0.1},
    "DET": {"ADJ": 0.4, "NOUN": 0.6},
    "ADJ": {"NOUN": 0.85, "ADJ": 0.15},
    "NOUN": {"VERB": 0.45, "PREP": 0.2, "CONJ": 0.1, "END": 0.25},
    "PRON": {"VERB": 0.8, "ADV": 0.2},
    "VERB": {"DET": 0.5, "PREP": 0.25, "ADV": 0.15, "END": 0.1},
    "ADV": {"VERB": 0.5, "DET": 0.2, "PREP": 0.2, "END": 0.1},
    "PREP": {"DET": 1.0},
    "CONJ": {"DET": 0.6, "PRON": 0.4},
}
_MAX_SENTENCE_WORDS = 30


class _ProseChain:
    """Order-1 word-level Markov chain. Word ``i``'s successors: for each next category of the grammar,
    up to 6 words of that category (chosen with a Zipf-like bias) with Dirichlet weights. Built once from
    ``_LANGUAGE_SEED``."""

    def __init__(self) -> None:
        rng = np.random.default_rng([_LANGUAGE_SEED, _domain_key("prose")])
        self.words: list[str] = []
        self.cat: list[str] = []
        by_cat: dict[str, list[int]] = {}
        for c, ws in _WORDS.items():
            for w in ws.split():
                by_cat.setdefault(c, []).append(len(self.words))
                self.words.append(w)
                self.cat.append(c)
        self.capitalized = [w[:1].upper() + w[1:] for w in self.words]
        self.end = len(self.words)  # pseudo word: end of sentence
        self.start = len(self.words) + 1  # pseudo word: start of sentence
        self.succ: list[list[int]] = [[] for _ in range(len(self.words) + 2)]
        self.cum: list[list[float]] = [[] for _ in range(len(self.words) + 2)]
        states = list(range(len(self.words))) + [self.start]
        for s in states:
            cat = "START" if s == self.start else self.cat[s]
            succ: list[int] = []
            probs: list[float] = []
            for nc, p in _GRAMMAR[cat].items():
                if nc == "END":
                    succ.append(self.end)
                    probs.append(p)
                    continue
                pool = by_cat[nc]
                k = min(6, len(pool))
                z = 1.0 / np.arange(1, len(pool) + 1) ** 0.7
                order = rng.permutation(len(pool))  # which words are "frequent" differs per predecessor
                chosen = rng.choice(len(pool), size=k, replace=False, p=z / z.sum())
                w = rng.dirichlet(np.full(k, 0.8))
                for j, wj in zip(chosen, w):
                    succ.append(pool[order[j]])
                    probs.append(p * float(wj))
            total = sum(probs)
            acc, cum = 0.0, []
            for p in probs:
                acc += p / total
                cum.append(acc)
            cum[-1] = 1.0
            self.succ[s] = succ
            self.cum[s] = cum

    def sentences(self, rng: np.random.Generator) -> Iterator[str]:
        words, cap, succ, cum, end, cat = self.words, self.capitalized, self.succ, self.cum, self.end, self.cat
        u = rng.random(4096).tolist()
        ui = 0
        while True:
            state = self.start
            out: list[str] = []
            while True:
                if ui == len(u):
                    u = rng.random(4096).tolist()
                    ui = 0
                c = cum[state]
                nxt = succ[state][bisect.bisect_right(c, u[ui])] if len(c) > 1 else succ[state][0]
                ui += 1
                if nxt == end or len(out) >= _MAX_SENTENCE_WORDS:
                    break
                if out and (out[-1] == "a" or out[-1] == "A") and words[nxt][0] in "aeiou":
                    out[-1] += "n"
                if not out:
                    out.append(cap[nxt])
                elif cat[nxt] == "CONJ":
                    out[-1] += ","
                    out.append(words[nxt])
                else:
                    out.append(words[nxt])
                state = nxt
            if out:
                yield " ".join(out) + "."

    def units(self, rng: np.random.Generator) -> Iterator[tuple[str, str]]:
        sents = self.sentences(rng)
        while True:
            n = int(rng.integers(3, 8))
            for j in range(n):
                yield ("\n\n" if j == 0 else " "), next(sents)


_PROSE: _ProseChain | None = None


def _prose_chain() -> _ProseChain:
    global _PROSE
    if _PROSE is None:
        _PROSE = _ProseChain()
    return _PROSE


# ----------------------------------------------------------------------------------------------------- code

_CODE_VERBS = "compute count find sum filter scale merge check collect update build parse".split()
_CODE_NOUNS = "items values scores names rows totals prices counts words keys nodes points".split()
_CODE_CLASSES = "Point Account Vector Timer Buffer Counter Range Queue Grid Item".split()
_CODE_ATTRS = "x y width height size limit rate start end step total offset".split()


def _code_snippet(rng: np.random.Generator) -> str:
    t = int(rng.integers(0, 6))
    verb = _CODE_VERBS[int(rng.integers(len(_CODE_VERBS)))]
    noun = _CODE_NOUNS[int(rng.integers(len(_CODE_NOUNS)))]
    s = noun[:-1]
    k = int(rng.integers(1, 10))
    m = int(rng.integers(2, 20))
    if t == 0:
        cmp = (">", "<", ">=", "<=", "==")[int(rng.integers(5))]
        return (
            f"def {verb}_{noun}({noun}, limit):\n    total = 0\n    for {s} in {noun}:\n"
            f"        if {s} {cmp} limit:\n            total += {s}\n    return total"
        )
    if t == 1:
        op, name = (">", "max") if rng.random() < 0.5 else ("<", "min")
        return (
            f"def {name}_{s}({noun}):\n    best = {noun}[0]\n    for {s} in {noun}[1:]:\n"
            f"        if {s} {op} best:\n            best = {s}\n    return best"
        )
    if t == 2:
        acc = ("out", "result", "acc", "seen")[int(rng.integers(4))]
        d = int(rng.integers(1, 4))
        return f"def {verb}_{noun}(n):\n    {acc} = []\n    while n > {k}:\n        {acc}.append(n * {m})\n        n -= {d}\n    return {acc}"
    if t == 3:
        cls = _CODE_CLASSES[int(rng.integers(len(_CODE_CLASSES)))]
        i, j = rng.choice(len(_CODE_ATTRS), size=2, replace=False)
        a, b = _CODE_ATTRS[int(i)], _CODE_ATTRS[int(j)]
        op = ("+", "-", "*")[int(rng.integers(3))]
        return (
            f"class {cls}:\n    def __init__(self, {a}, {b}):\n        self.{a} = {a}\n        self.{b} = {b}\n\n"
            f"    def {verb}(self):\n        return self.{a} {op} self.{b}"
        )
    if t == 4:
        return f"def count_{noun}({noun}):\n    counts = {{}}\n    for {s} in {noun}:\n        counts[{s}] = counts.get({s}, 0) + 1\n    return counts"
    op = ("+", "-", "*")[int(rng.integers(3))]
    x = int(rng.integers(0, 50))
    y = x + k if op == "+" else x - k if op == "-" else x * k
    result = y - m if y > m else y
    return f"def {verb}_{s}(x):\n    y = x {op} {k}\n    if y > {m}:\n        return y - {m}\n    return y\n\nassert {verb}_{s}({x}) == {result}"


def _code_units(rng: np.random.Generator) -> Iterator[tuple[str, str]]:
    while True:
        yield "\n\n\n", _code_snippet(rng)


# --------------------------------------------------------------------------------------------------- recall

_KEY_CHARS = np.array(list("abcdefghijklmnopqrstuvwxyz"))
_VAL_CHARS = np.array(list("abcdefghijklmnopqrstuvwxyz0123456789"))
_KEY_LEN, _VAL_LEN = 5, 6
_PAIR_LINE = _KEY_LEN + 1 + _VAL_LEN + 1  # "key=value\n"


def _recall_document(rng: np.random.Generator, doc_len: int) -> str:
    head, mid = "pairs:\n", "\n\nqueries:\n"
    n_pairs = max(1, (doc_len // 5) // _PAIR_LINE)  # ~20% pairs, ~20% queries, ~60% filler
    n_pairs = min(n_pairs, (doc_len - len(head) - len(mid)) // (2 * _PAIR_LINE))
    n_pairs = max(n_pairs, 1)
    keys: list[str] = []
    seen: set[str] = set()
    while len(keys) < n_pairs:
        cand = rng.choice(_KEY_CHARS, size=(n_pairs, _KEY_LEN))
        for row in cand:
            key = "".join(row)
            if key not in seen:
                seen.add(key)
                keys.append(key)
                if len(keys) == n_pairs:
                    break
    vals = ["".join(r) for r in rng.choice(_VAL_CHARS, size=(n_pairs, _VAL_LEN))]
    pairs = "\n".join(f"{k}={v}" for k, v in zip(keys, vals))
    order = rng.permutation(n_pairs)
    queries = "\n".join(f"{keys[i]}?{vals[i]}" for i in order)
    budget = doc_len - len(head) - len(pairs) - 2 - len(mid) - len(queries)  # 2: "\n\n" after the pairs
    filler = _fill(_prose_chain().units(rng), budget) if budget > 0 else ""
    if filler:
        return f"{head}{pairs}\n\n{filler}{mid}{queries}"
    return f"{head}{pairs}{mid}{queries}"


# ------------------------------------------------------------------------------------------------------ API

_UNITS: dict[str, Callable[[np.random.Generator], Iterator[tuple[str, str]]]] = {
    "arithmetic": _arithmetic_units,
    "records": _records_units,
    "prose": lambda rng: _prose_chain().units(rng),
    "code": _code_units,
}


def generate_documents(domain: str, n_docs: int, seed: int, *, doc_len: int | None = None) -> list[str]:
    """``n_docs`` documents of ``domain`` (one of ``DOMAINS``), each at most ``doc_len`` characters
    (default ``DEFAULT_DOC_LEN``, at least ``MIN_DOC_LEN``). Deterministic in all arguments; see the
    module docstring."""
    if domain not in DOMAINS:
        raise DataError(f"unknown synthetic data domain {domain!r} (expected one of: {', '.join(DOMAINS)})")
    if isinstance(n_docs, bool) or not isinstance(n_docs, (int, np.integer)) or n_docs < 0:
        raise DataError(f"synthetic data: n_docs must be a non-negative integer, got {n_docs!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise DataError(f"data.seed: must be an integer, got {seed!r}")
    if doc_len is None:
        doc_len = DEFAULT_DOC_LEN
    if isinstance(doc_len, bool) or not isinstance(doc_len, (int, np.integer)) or doc_len < MIN_DOC_LEN:
        raise DataError(f"data.doc_len: must be an integer >= {MIN_DOC_LEN} (characters per document), got {doc_len!r}")
    key = _domain_key(domain)
    docs = []
    for i in range(int(n_docs)):
        rng = np.random.default_rng([int(seed) % 2**64, key, i])  # any int seed; negative ones wrap
        if domain == "recall":
            docs.append(_recall_document(rng, int(doc_len)))
        else:
            docs.append(_fill(_UNITS[domain](rng), int(doc_len)))
    return docs
