"""Behavioural tests of jaxeff.data: tokenizers, synthetic corpus, local files, packing, mixture loader."""

import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from jaxeff.data import (  # noqa: E402
    DOMAINS,
    DOMAIN_DESCRIPTIONS,
    ByteTokenizer,
    HFTokenizer,
    MixtureLoader,
    eval_batches,
    generate_documents,
    load_text_documents,
    load_tokenizer,
    pack_documents,
    pack_texts,
    process_slice,
)
from jaxeff.errors import DataError, JaxeffError  # noqa: E402

# ------------------------------------------------------------------------------------------------ tokenizers


def test_byte_tokenizer_roundtrips_utf8_and_has_fixed_special_ids():
    tok = ByteTokenizer()
    assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id, tok.name) == (259, 256, 257, 258, "byte")
    text = "héllo, wörld = 42 ✓"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == text
    assert tok.encode_batch(["ab", ""]) == [[97, 98], []]


def test_byte_tokenizer_decode_skips_special_ids_and_replaces_invalid_utf8():
    tok = ByteTokenizer()
    assert tok.decode([257, 104, 105, 256, 258]) == "hi"
    assert tok.decode(np.array([104, 300, 105])) == "hi"  # ids beyond the vocab (padded embedding) skipped
    assert tok.decode([0xFF, 104]) == "\ufffdh"


def test_load_tokenizer_none_or_byte_gives_the_byte_tokenizer():
    assert isinstance(load_tokenizer(None), ByteTokenizer)
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)


def test_load_tokenizer_missing_file_raises_data_error_with_exact_message(tmp_path):
    p = str(tmp_path / "nope.json")
    with pytest.raises(DataError) as ei:
        load_tokenizer(p)
    assert str(ei.value) == (f"data.tokenizer: file '{p}' does not exist (expected 'byte' or a path to a Hugging Face tokenizer.json)")
    assert isinstance(ei.value, JaxeffError)


def test_load_tokenizer_rejects_a_directory_without_tokenizer_json_and_a_non_tokenizer_file(tmp_path):
    with pytest.raises(DataError, match="is a directory without a tokenizer.json"):
        load_tokenizer(str(tmp_path))
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"not": "a tokenizer"}')
    with pytest.raises(DataError, match="cannot read .* as a Hugging Face tokenizer.json"):
        load_tokenizer(str(bad))


_CORPUS = ["the cat sat on the mat", "the dog sat on the log", "a cat and a dog"] * 5


def _bpe_json(tmp_path, specials, name="tokenizer.json"):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=list(specials), initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS, trainer)
    path = tmp_path / name
    tok.save(str(path))
    return str(path), tok


def test_hf_tokenizer_from_local_json_encodes_decodes_and_finds_special_ids(tmp_path):
    path, raw = _bpe_json(tmp_path, ["<pad>", "<s>", "</s>"])
    tok = load_tokenizer(path)
    assert isinstance(tok, HFTokenizer)
    assert tok.name == path
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)  # specials come first in the trained vocab
    assert tok.vocab_size == raw.get_vocab_size()
    ids = tok.encode("the cat sat")
    assert ids == raw.encode("the cat sat", add_special_tokens=False).ids
    assert not {0, 1, 2} & set(ids)
    assert tok.decode([tok.bos_id] + ids + [tok.eos_id, tok.pad_id]) == "the cat sat"
    assert tok.encode_batch(["the cat sat", "a dog"]) == [ids, tok.encode("a dog")]


def test_load_tokenizer_accepts_a_directory_holding_tokenizer_json(tmp_path):
    path, _ = _bpe_json(tmp_path, ["<pad>", "<s>", "</s>"])
    tok = load_tokenizer(str(tmp_path))
    assert tok.name == path and tok.encode("the cat") == HFTokenizer(path).encode("the cat")


def test_hf_tokenizer_without_pad_token_uses_eos_as_pad_and_endoftext_as_bos_and_eos(tmp_path):
    path, _ = _bpe_json(tmp_path, ["<|endoftext|>"])
    tok = HFTokenizer(path)
    assert tok.bos_id == tok.eos_id == tok.pad_id == 0


def test_hf_tokenizer_without_any_special_token_adds_endoftext_and_grows_vocab(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    raw = Tokenizer(models.WordLevel({"hello": 0, "world": 1, "[UNK]": 2}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    path = str(tmp_path / "wl.json")
    raw.save(path)
    tok = HFTokenizer(path)
    assert tok.vocab_size == 4
    assert tok.bos_id == tok.eos_id == tok.pad_id == 3
    assert tok.encode("hello world") == [0, 1]
    assert tok.decode([3, 0, 1, 3]) == "hello world"


# ---------------------------------------------------------------------------------------- synthetic corpus


def test_domains_are_the_five_documented_ones_with_descriptions():
    assert DOMAINS == ("arithmetic", "records", "prose", "code", "recall")
    assert set(DOMAIN_DESCRIPTIONS) == set(DOMAINS)
    assert all(len(v) > 20 for v in DOMAIN_DESCRIPTIONS.values())


@pytest.mark.parametrize("domain", DOMAINS)
def test_generate_documents_same_seed_same_output_different_seed_different_output(domain):
    a = generate_documents(domain, 5, seed=7)
    assert a == generate_documents(domain, 5, seed=7)
    b = generate_documents(domain, 5, seed=8)
    assert len(b) == 5 and all(x != y for x, y in zip(a, b))
    assert len(set(a)) == 5  # documents differ from each other
    # asking for more documents does not change the earlier ones
    assert generate_documents(domain, 9, seed=7)[:5] == a


def test_generate_documents_is_identical_in_a_fresh_process():
    code = (
        "import json, sys; from jaxeff.data.synthetic import generate_documents, DOMAINS;"
        "json.dump({d: generate_documents(d, 3, 11, doc_len=400) for d in DOMAINS}, sys.stdout)"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert json.loads(out) == {d: generate_documents(d, 3, 11, doc_len=400) for d in DOMAINS}


@pytest.mark.parametrize("domain", DOMAINS)
@pytest.mark.parametrize("doc_len", [64, 333, 4000])
def test_documents_are_ascii_nonempty_and_no_longer_than_doc_len(domain, doc_len):
    docs = generate_documents(domain, 6, seed=1, doc_len=doc_len)
    assert len(docs) == 6
    for d in docs:
        assert 0 < len(d) <= doc_len
        assert d.isascii()
    if doc_len == 4000:  # whole units fill the budget up to less than one unit (a few hundred characters)
        assert min(len(d) for d in docs) >= 0.9 * doc_len


def test_generate_documents_unknown_domain_names_it_and_the_valid_ones():
    with pytest.raises(DataError) as ei:
        generate_documents("poetry", 1, 0)
    msg = str(ei.value)
    assert "'poetry'" in msg and all(d in msg for d in DOMAINS)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(n_docs=-1, seed=0), "n_docs"),
        (dict(n_docs=1, seed="3"), "seed"),
        (dict(n_docs=1, seed=0, doc_len=10), "doc_len"),
        (dict(n_docs=1, seed=0, doc_len=100.0), "doc_len"),
    ],
)
def test_generate_documents_rejects_bad_arguments_naming_them(kwargs, field):
    with pytest.raises(DataError, match=field):
        generate_documents("prose", **kwargs)


def test_generate_documents_accepts_negative_seeds_deterministically():
    a = generate_documents("records", 2, seed=-3)
    assert a == generate_documents("records", 2, seed=-3) and a != generate_documents("records", 2, seed=3)


def test_generate_documents_zero_docs_is_empty():
    assert generate_documents("code", 0, 0) == []


def test_generating_a_million_characters_per_domain_takes_under_two_seconds():
    # CPU time of this process, so that other jobs sharing the machine do not make the test flaky
    t0 = time.process_time()
    total = {d: sum(map(len, generate_documents(d, 1100, seed=3))) for d in DOMAINS}
    elapsed = time.process_time() - t0
    assert all(n >= 1_000_000 for n in total.values()), total
    assert elapsed < 2.0, elapsed


def test_arithmetic_lines_are_exactly_correct():
    lines = "\n".join(generate_documents("arithmetic", 20, seed=5)).split("\n")
    assert len(lines) > 1000
    pat = re.compile(r"^[0-9+\-*()]+=-?[0-9]+$")
    kinds = set()
    for line in lines:
        assert pat.match(line), line
        lhs, rhs = line.split("=")
        assert eval(lhs) == int(rhs), line  # lhs is digits and + - * ( ) only (checked above)
        kinds.add("(" if "(" in lhs else "multi" if len(re.findall(r"[+\-*]", lhs)) > 1 else re.sub(r"\d", "", lhs))
    assert kinds == {"+", "-", "*", "(", "multi"}


def _parse_records(doc):
    lines = doc.split("\n")
    if lines[0].startswith("{"):
        return [json.loads(x) for x in lines]
    if lines[0] == "id,name,age,city,country,job,email":
        keys = lines[0].split(",")
        return [dict(zip(keys, x.split(","))) for x in lines[1:]]
    return [dict(kv.split(": ", 1) for kv in x.split(" | ")) for x in lines]


def test_records_are_consistent_country_follows_city_email_follows_name_ids_count_up():
    from jaxeff.data.synthetic import _CITIES

    country_of = dict(_CITIES)
    formats = set()
    for doc in generate_documents("records", 12, seed=2):
        recs = _parse_records(doc)
        formats.add("json" if doc[0] == "{" else "csv" if doc.startswith("id,name") else "kv")
        assert len(recs) >= 3
        ids = [int(r["id"]) for r in recs]
        assert ids == list(range(ids[0], ids[0] + len(ids)))
        for r in recs:
            assert set(r) == {"id", "name", "age", "city", "country", "job", "email"}
            assert country_of[r["city"]] == r["country"]
            first, last = r["name"].split(" ")
            assert r["email"].startswith(f"{first.lower()}.{last.lower()}@")
            assert 18 <= int(r["age"]) <= 90
    assert formats == {"json", "csv", "kv"}


def test_prose_follows_the_fixed_markov_table_whatever_the_seed():
    from jaxeff.data.synthetic import _prose_chain

    chain = _prose_chain()
    index = {w: i for i, w in enumerate(chain.words)}
    allowed = {(a, b) for a in range(len(chain.words)) for b in chain.succ[a]}
    allowed |= {(chain.start, b) for b in chain.succ[chain.start]}
    n_pairs = 0
    for seed in (0, 1, 99):
        for doc in generate_documents("prose", 4, seed=seed):
            assert "\n\n" in doc  # several paragraphs
            for sent in re.split(r"(?<=\.)\s+", doc):
                assert sent.endswith(".") and sent[0].isupper(), sent
                words = [w.rstrip(",.").lower() for w in sent.split()]
                words = ["a" if w == "an" else w for w in words]
                prev = chain.start
                for w in words:
                    assert (prev, index[w]) in allowed, (sent, w)
                    prev = index[w]
                    n_pairs += 1
    assert n_pairs > 1000
    assert 300 <= len(chain.words) <= 500 and len(set(chain.words)) == len(chain.words)


def test_code_documents_are_valid_python_whose_asserts_hold():
    docs = generate_documents("code", 30, seed=4)
    n_asserts = 0
    kinds = set()
    for doc in docs:
        exec(compile(doc, "<synthetic>", "exec"), {})  # raises on a wrong assert or a syntax error
        n_asserts += doc.count("\nassert ")
        kinds |= set(re.findall(r"^(def|class) ", doc, re.M))
        kinds |= set(re.findall(r"^\s+(for|while|if|return) ", doc, re.M))
    assert n_asserts > 5
    assert kinds == {"def", "class", "for", "while", "if", "return"}


@pytest.mark.parametrize("doc_len", [200, 16384])
def test_recall_queries_repeat_values_of_keys_listed_at_the_start(doc_len):
    for doc in generate_documents("recall", 3, seed=6, doc_len=doc_len):
        assert len(doc) <= doc_len
        assert doc.startswith("pairs:\n")
        head, queries = doc.split("\nqueries:\n")
        pair_block, _, filler = head[len("pairs:\n") :].partition("\n\n")
        pairs = dict(line.split("=") for line in pair_block.split("\n"))
        assert len(pairs) == len(pair_block.split("\n"))  # keys are unique
        q = [line.split("?") for line in queries.split("\n")]
        assert sorted(k for k, _ in q) == sorted(pairs)  # every key is queried once
        assert all(pairs[k] == v for k, v in q)
        assert "=" not in filler and "?" not in filler
        if doc_len == 16384:
            assert len(doc) > 0.9 * doc_len
            assert len(pairs) > 200
            assert len(filler) > 0.5 * doc_len  # long stretch between the keys and the queries
            assert [k for k, _ in q] != list(pairs)  # queries in another order


# -------------------------------------------------------------------------------------------------- files


def test_load_text_documents_reads_txt_jsonl_parquet_in_path_order(tmp_path):
    import datasets

    (tmp_path / "a.txt").write_text("first line\nsecond line\n\nnew paragraph\n")
    (tmp_path / "b.jsonl").write_text('{"text": "j one", "n": 1}\n{"text": "j two", "n": 2}\n')
    datasets.Dataset.from_dict({"text": ["p one", "p two", "p three"]}).to_parquet(str(tmp_path / "c.parquet"))
    (tmp_path / "d.txt").write_text("second file")
    paths = [str(tmp_path / n) for n in ("a.txt", "b.jsonl", "c.parquet", "d.txt")]
    docs = load_text_documents(paths)
    # a .txt file is ONE document, verbatim (newlines and blank lines kept)
    assert docs == ["first line\nsecond line\n\nnew paragraph\n", "j one", "j two", "p one", "p two", "p three", "second file"]


def test_load_text_documents_takes_paths_literally_not_as_glob_patterns(tmp_path):
    (tmp_path / "odd [1] *.txt").write_text("odd")
    (tmp_path / "odd 1 x.txt").write_text("would match the pattern")
    assert load_text_documents([str(tmp_path / "odd [1] *.txt")]) == ["odd"]


def test_load_text_documents_uses_text_field_and_skips_empty_and_null_rows(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"body": "keep"}\n{"body": ""}\n{"body": null}\n{"body": "also"}\n')
    assert load_text_documents([str(p)], text_field="body") == ["keep", "also"]


def test_load_text_documents_explicit_format_overrides_the_extension(tmp_path):
    p = tmp_path / "corpus.log"
    p.write_text("log text")
    assert load_text_documents([str(p)], format="text") == ["log text"]
    q = tmp_path / "rows.data"
    q.write_text('{"text": "r"}\n')
    assert load_text_documents([str(q)], format="jsonl") == ["r"]


def test_load_text_documents_missing_file_names_its_index_and_field(tmp_path):
    ok = tmp_path / "ok.txt"
    ok.write_text("x")
    missing = str(tmp_path / "missing.txt")
    with pytest.raises(DataError) as ei:
        load_text_documents([str(ok), missing])
    assert str(ei.value) == f"data.paths[1]: file '{missing}' does not exist"
    with pytest.raises(DataError, match=r"^train\.files\[0\]: file"):
        load_text_documents([missing], field_name="train.files")


def test_load_text_documents_missing_text_field_lists_the_columns_found(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"content": "a", "id": 1}\n')
    with pytest.raises(DataError) as ei:
        load_text_documents([str(p)])
    msg = str(ei.value)
    assert "'text'" in msg and "content, id" in msg and "data.paths[0]" in msg


def test_load_text_documents_rejects_unknown_extension_format_and_malformed_files(tmp_path):
    csv = tmp_path / "x.csv"
    csv.write_text("a,b\n")
    with pytest.raises(DataError, match=r"data.paths\[0\]: cannot tell the format .*'\.csv'"):
        load_text_documents([str(csv)])
    with pytest.raises(DataError, match="unknown format 'xml'"):
        load_text_documents([str(csv)], format="xml")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{broken\n')
    with pytest.raises(DataError, match=r"data.paths\[0\]: cannot read .* as json"):
        load_text_documents([str(bad)])
    notpq = tmp_path / "fake.parquet"
    notpq.write_text("not parquet")
    with pytest.raises(DataError, match="as parquet"):
        load_text_documents([str(notpq)])
    with pytest.raises(DataError, match="no files"):
        load_text_documents([])


def test_load_text_documents_does_not_write_to_the_default_datasets_cache(tmp_path):
    import datasets

    cache = str(datasets.config.HF_DATASETS_CACHE)

    def snapshot():
        if not os.path.isdir(cache):
            return None
        return sorted(os.path.join(r, f) for r, _, fs in os.walk(cache) for f in fs)

    before = snapshot()
    p = tmp_path / "a.jsonl"
    p.write_text('{"text": "z"}\n')
    assert load_text_documents([str(p)]) == ["z"]
    assert snapshot() == before


# ------------------------------------------------------------------------------------------------ packing

BOS, EOS, PAD = 97, 98, 99


def test_pack_documents_exact_layout_with_a_split_document():
    out = pack_documents([[1, 2, 3], [4, 5], [6, 7, 8, 9, 10, 11]], 5, bos_id=BOS, eos_id=EOS, pad_id=PAD)
    np.testing.assert_array_equal(out["inputs"], [[97, 1, 2, 3, 98], [97, 4, 5, 98, 97], [6, 7, 8, 9, 10], [11, 98, 99, 99, 99]])
    np.testing.assert_array_equal(out["targets"], [[1, 2, 3, 98, 99], [4, 5, 98, 99, 6], [7, 8, 9, 10, 11], [98, 99, 99, 99, 99]])
    np.testing.assert_array_equal(out["segment_ids"], [[1, 1, 1, 1, 1], [1, 1, 1, 1, 2], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    np.testing.assert_array_equal(out["positions"], [[0, 1, 2, 3, 4], [0, 1, 2, 3, 0], [0, 1, 2, 3, 4], [0, 1, 0, 0, 0]])
    np.testing.assert_array_equal(out["loss_mask"], [[1, 1, 1, 1, 0], [1, 1, 1, 0, 1], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    assert {k: v.dtype for k, v in out.items()} == {
        "inputs": np.int32,
        "targets": np.int32,
        "segment_ids": np.int32,
        "positions": np.int32,
        "loss_mask": np.float32,
    }


@pytest.mark.parametrize("seed", range(6))
def test_pack_documents_invariants_on_random_documents(seed):
    rng = np.random.default_rng(seed)
    seq_len = int(rng.integers(1, 40))
    docs = [rng.integers(0, 90, size=int(rng.integers(0, 60))).tolist() for _ in range(int(rng.integers(1, 30)))]
    out = pack_documents(docs, seq_len, bos_id=BOS, eos_id=EOS, pad_id=PAD)
    inp, tgt, seg, pos, msk = (out[k] for k in ("inputs", "targets", "segment_ids", "positions", "loss_mask"))
    n_rows = inp.shape[0]
    stream = [t for d in docs for t in [BOS] + d + [EOS]]
    assert inp.shape == (-(-len(stream) // seq_len), seq_len)
    real = seg > 0
    # every real token appears, in order, and padding only at the very end
    assert inp[real].tolist() == stream
    assert real.reshape(-1)[: len(stream)].all() and not real.reshape(-1)[len(stream) :].any()
    assert (inp[~real] == PAD).all() and (tgt[~real] == PAD).all() and (pos[~real] == 0).all()
    assert (msk[~real] == 0).all()
    # loss only where the target is the next token of the same document: zero exactly at each eos
    assert msk.sum() == len(stream) - len(docs)
    assert ((msk == 0) & real).sum() == len(docs)
    assert (inp[(msk == 0) & real] == EOS).all() and (tgt[(msk == 0) & real] == PAD).all()
    flat_t = tgt.reshape(-1)[: len(stream)]
    flat_m = msk.reshape(-1)[: len(stream)]
    assert (flat_t[flat_m == 1] == np.array(stream[1:] + [PAD])[flat_m == 1]).all()
    for r in range(n_rows):
        ids = seg[r][real[r]]
        # segments numbered 1, 2, ... in order, positions restart at 0 in each segment
        assert ids[0] == 1 and (np.diff(ids) >= 0).all() and (np.diff(ids) <= 1).all()
        for s in np.unique(ids):
            (cols,) = np.nonzero(seg[r] == s)
            assert pos[r, cols].tolist() == list(range(len(cols)))
            assert (tgt[r, cols[:-1]] == inp[r, cols[1:]]).all()  # next token within the segment
        # a piece cut by the end of the row predicts the first token of the next row
        if real[r, -1] and msk[r, -1] == 1:
            assert tgt[r, -1] == inp[r + 1, 0] and pos[r + 1, 0] == 0 and seg[r + 1, 0] == 1


def test_pack_documents_drop_remainder_drops_only_the_partial_last_row():
    docs = [[1] * 8, [2] * 3]  # 10 + 5 = 15 tokens
    kept = pack_documents(docs, 4, bos_id=BOS, eos_id=EOS, pad_id=PAD, drop_remainder=True)
    full = pack_documents(docs, 4, bos_id=BOS, eos_id=EOS, pad_id=PAD)
    assert kept["inputs"].shape == (3, 4) and full["inputs"].shape == (4, 4)
    for k in kept:
        np.testing.assert_array_equal(kept[k], full[k][:3])
    exact = pack_documents([[1, 2]], 4, bos_id=BOS, eos_id=EOS, pad_id=PAD, drop_remainder=True)
    assert exact["inputs"].tolist() == [[BOS, 1, 2, EOS]]


def test_pack_documents_empty_input_and_empty_document():
    out = pack_documents([], 8, bos_id=BOS, eos_id=EOS, pad_id=PAD)
    assert all(v.shape == (0, 8) for v in out.values())
    out = pack_documents([[]], 3, bos_id=BOS, eos_id=EOS, pad_id=PAD)
    assert out["inputs"].tolist() == [[BOS, EOS, PAD]] and out["loss_mask"].tolist() == [[1, 0, 0]]


def test_pack_documents_accepts_numpy_documents_and_generators():
    gen = (np.arange(i) for i in range(3))
    out = pack_documents(gen, 16, bos_id=BOS, eos_id=EOS, pad_id=PAD)
    assert out["inputs"][0, :9].tolist() == [BOS, EOS, BOS, 0, EOS, BOS, 0, 1, EOS]


@pytest.mark.parametrize(
    "docs, kwargs, match",
    [
        ([[1]], dict(seq_len=0), "seq_len"),
        ([[1]], dict(seq_len=4.0), "seq_len"),
        ([[1]], dict(seq_len=4, bos_id=-1), "bos_id"),
        ([[0.5]], dict(seq_len=4), "integer token ids"),
        ([[[1, 2]]], dict(seq_len=4), "1-D"),
    ],
)
def test_pack_documents_rejects_bad_arguments(docs, kwargs, match):
    args = dict(bos_id=BOS, eos_id=EOS, pad_id=PAD)
    args.update(kwargs)
    with pytest.raises(DataError, match=match):
        pack_documents(docs, **args)


def test_pack_texts_tokenizes_and_packs_with_the_tokenizer_special_ids():
    tok = ByteTokenizer()
    out = pack_texts(["ab", "c"], tok, 8)
    assert out["inputs"].tolist() == [[257, 97, 98, 258, 257, 99, 258, 256]]


# ------------------------------------------------------------------------------------------------- loader


def _packed(n_rows, seq_len=4, base=0):
    """Packed-like arrays whose row r has inputs all equal to base + r (so rows are identifiable)."""
    v = (base + np.arange(n_rows, dtype=np.int32))[:, None].repeat(seq_len, 1)
    return {
        "inputs": v,
        "targets": v + 1,
        "segment_ids": np.ones_like(v),
        "positions": np.tile(np.arange(seq_len, dtype=np.int32), (n_rows, 1)),
        "loss_mask": np.ones(v.shape, np.float32),
    }


def _domains():
    return {"a": _packed(7, base=0), "b": _packed(5, base=100), "c": _packed(11, base=200)}


def test_mixture_loader_batches_have_the_right_shapes_and_rows_from_the_named_domain():
    loader = MixtureLoader(_domains(), batch_size=6, seed=1)
    assert loader.domain_names == ["a", "b", "c"]
    assert loader.weights == pytest.approx({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3})  # None = uniform
    for _ in range(5):
        b = loader.next_batch()
        assert set(b) == {"inputs", "targets", "segment_ids", "positions", "loss_mask", "domain_ids"}
        assert all(b[k].shape == (6, 4) for k in b if k != "domain_ids") and b["domain_ids"].shape == (6,)
        assert b["domain_ids"].dtype == np.int32 and b["inputs"].dtype == np.int32
        assert b["loss_mask"].dtype == np.float32
        assert (b["inputs"][:, 0] // 100 == b["domain_ids"]).all()  # row r of domain d has value 100 d + r
        assert (b["targets"] == b["inputs"] + 1).all()  # whole rows are copied together
    assert loader.step == 5


def test_mixture_loader_serves_each_row_once_per_epoch_in_a_fresh_permutation():
    loader = MixtureLoader({"only": _packed(10)}, batch_size=5, seed=3)
    rows = np.concatenate([loader.next_batch()["inputs"][:, 0] for _ in range(6)])
    epochs = rows.reshape(3, 10)
    for e in epochs:
        assert sorted(e.tolist()) == list(range(10))
    assert epochs[0].tolist() != epochs[1].tolist() and epochs[0].tolist() != list(range(10))
    assert loader.state_dict()["domains"]["only"] == {"cursor": 0, "epoch": 3, "n_rows": 10}


def test_mixture_loader_is_deterministic_in_seed():
    def run(seed):
        lo = MixtureLoader(_domains(), batch_size=8, seed=seed)
        return np.stack([lo.next_batch()["inputs"] for _ in range(4)])

    np.testing.assert_array_equal(run(5), run(5))
    assert not np.array_equal(run(5), run(6))
    np.testing.assert_array_equal(run(-5), run(-5))  # negative seeds are allowed
    assert not np.array_equal(run(-5), run(5))


def test_mixture_loader_resumes_exactly_from_a_json_state_dict():
    ref = MixtureLoader(_domains(), batch_size=4, weights={"a": 1, "b": 2, "c": 3}, seed=9)
    for _ in range(7):
        ref.next_batch()
    ref.set_weights({"a": 0.5, "b": 0.1, "c": 0.4})
    for _ in range(4):
        ref.next_batch()
    state = json.loads(json.dumps(ref.state_dict()))
    assert state["step"] == 11
    expected = [ref.next_batch() for _ in range(25)]  # crosses several epoch boundaries

    resumed = MixtureLoader(_domains(), batch_size=4, seed=9)  # default weights: restored from the state
    resumed.load_state_dict(state)
    assert resumed.weights == ref.weights or resumed.weights == pytest.approx({"a": 0.5, "b": 0.1, "c": 0.4})
    for e in expected:
        got = resumed.next_batch()
        for k in e:
            np.testing.assert_array_equal(got[k], e[k])


def test_mixture_loader_weights_set_the_domain_frequencies():
    loader = MixtureLoader(_domains(), batch_size=64, weights={"a": 3, "b": 1}, seed=0)
    assert loader.weights == {"a": 0.75, "b": 0.25, "c": 0.0}  # normalised; missing domains get 0
    ids = np.concatenate([loader.next_batch()["domain_ids"] for _ in range(50)])
    counts = np.bincount(ids, minlength=3) / ids.size
    assert counts[2] == 0
    assert abs(counts[0] - 0.75) < 0.03
    loader.set_weights({"c": 1.0})
    ids = np.concatenate([loader.next_batch()["domain_ids"] for _ in range(3)])
    assert (ids == 2).all()


@pytest.mark.parametrize(
    "weights, match",
    [
        ({"zzz": 1.0}, "unknown domain.*'zzz'.*a, b, c"),
        ({"a": -1.0, "b": 2.0}, r"data.weights\['a'\].*>= 0"),
        ({"a": float("nan")}, r"data.weights\['a'\]"),
        ({"a": 0.0, "b": 0.0}, "sum to 0"),
        ({"a": "heavy"}, "expected a number"),
    ],
)
def test_set_weights_rejects_invalid_weights(weights, match):
    loader = MixtureLoader(_domains(), batch_size=2)
    with pytest.raises(DataError, match=match):
        loader.set_weights(weights)
    assert loader.weights == pytest.approx({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3})  # unchanged


def test_mixture_loader_rejects_inconsistent_domains_and_bad_batch_size():
    with pytest.raises(DataError, match="seq_len 8 differs"):
        MixtureLoader({"a": _packed(3, 4), "b": _packed(3, 8)}, batch_size=2)
    with pytest.raises(DataError, match="has no rows"):
        MixtureLoader({"a": _packed(0)}, batch_size=2)
    with pytest.raises(DataError, match="missing arrays"):
        MixtureLoader({"a": {"inputs": np.zeros((2, 2))}}, batch_size=2)
    with pytest.raises(DataError, match="at least one domain"):
        MixtureLoader({}, batch_size=2)
    with pytest.raises(DataError, match="batch_size"):
        MixtureLoader(_domains(), batch_size=0)


def test_load_state_dict_rejects_a_state_of_different_data_or_seed():
    state = MixtureLoader(_domains(), batch_size=2, seed=1).state_dict()
    with pytest.raises(DataError, match="seed 1"):
        MixtureLoader(_domains(), batch_size=2, seed=2).load_state_dict(state)
    with pytest.raises(DataError, match="domains a, b, c"):
        MixtureLoader({"a": _packed(7)}, batch_size=2, seed=1).load_state_dict(state)
    other = _domains()
    other["b"] = _packed(6, base=100)
    with pytest.raises(DataError, match="'b' had 5 rows"):
        MixtureLoader(other, batch_size=2, seed=1).load_state_dict(state)
    with pytest.raises(DataError, match="missing entry"):
        MixtureLoader(_domains(), batch_size=2, seed=1).load_state_dict({"version": 1})


def test_mixture_loader_on_packed_synthetic_text():
    tok = ByteTokenizer()
    doms = {d: pack_texts(generate_documents(d, 4, seed=0, doc_len=300), tok, 64) for d in ("prose", "recall")}
    b = MixtureLoader(doms, batch_size=8, seed=0).next_batch()
    assert b["inputs"].shape == (8, 64)
    assert b["inputs"].max() < tok.vocab_size and b["loss_mask"].sum() > 0


def test_eval_batches_are_in_order_and_the_last_one_is_padded_with_masked_rows():
    arrays = _packed(10)
    batches = list(eval_batches(arrays, 4, pad_id=PAD))
    assert len(batches) == 3
    assert all(b[k].shape == (4, 4) for b in batches for k in b)
    rows = np.concatenate([b["inputs"][:, 0] for b in batches])
    assert rows[:10].tolist() == list(range(10)) and (rows[10:] == PAD).all()
    last = batches[-1]
    assert last["loss_mask"][:2].all() and not last["loss_mask"][2:].any()
    assert (last["segment_ids"][2:] == 0).all()
    again = list(eval_batches(arrays, 4, pad_id=PAD))
    assert all(np.array_equal(x[k], y[k]) for x, y in zip(batches, again) for k in x)
    assert sum(b["loss_mask"].sum() for b in batches) == arrays["loss_mask"].sum()
    assert len(list(eval_batches(_packed(8), 4))) == 2  # no padding batch when it divides


def test_process_slice_splits_the_global_batch_into_equal_contiguous_blocks():
    batch = MixtureLoader(_domains(), batch_size=6, seed=2).next_batch()
    parts = [process_slice(batch, i, 3) for i in range(3)]
    for k in batch:
        assert all(p[k].shape[0] == 2 for p in parts)
        np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), batch[k])
    np.testing.assert_array_equal(parts[1]["inputs"], batch["inputs"][2:4])
    with pytest.raises(DataError, match="6 is not divisible by the number of processes 4"):
        process_slice(batch, 0, 4)
    with pytest.raises(DataError, match="process_index"):
        process_slice(batch, 3, 3)
