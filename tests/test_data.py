"""Data pipeline: loss masks, chat masking, input errors, bucketing, resuming, eval split."""
import json

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from lisa_jax import data

WORDS = ["###", "Instruction", "Input", "Response", ":", "Reverse", "the", "list", "be",
         "brief", "hi", "hello", "bye", "see", "you", "a", "b", "c"] + [str(i) for i in range(10)]
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]
VOCAB = {w: i for i, w in enumerate(SPECIAL + WORDS)}
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} </s> "
                 "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


def make_tokenizer(pad=True, chat=False, add_bos=True, bos="<s>"):
    """Llama 2 style by default: the tokenizer itself puts ``<s>`` first (``add_bos_token``)."""
    tok = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(SPECIAL)
    kw = dict(bos_token=bos, eos_token="</s>", unk_token="<unk>",
              add_bos_token=add_bos and bos is not None)
    if pad:
        kw["pad_token"] = "<pad>"
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **kw)
    if chat:
        fast.chat_template = chat if isinstance(chat, str) else CHAT_TEMPLATE
    return fast


def ids(*words):
    return [VOCAB[w] for w in words]


def test_alpaca_loss_mask_exact_positions():
    tok = make_tokenizer()
    ex = data.tokenize_record(tok, {"instruction": "Reverse the list", "output": "4 1 3"})
    prompt = ids("<s>", "###", "Instruction", ":", "Reverse", "the", "list", "###", "Response",
                 ":")
    assert ex.input_ids.tolist() == prompt + ids("4", "1", "3", "</s>")
    assert ex.loss_mask.tolist() == [0] * 10 + [1] * 4
    assert ex.input_ids.dtype == np.int32

    ex = data.tokenize_record(tok, {"instruction": "Reverse the list", "input": "3 1 4",
                                    "output": "4 1 3"})
    prompt = ids("<s>", "###", "Instruction", ":", "Reverse", "the", "list", "###", "Input", ":",
                 "3", "1", "4", "###", "Response", ":")
    assert ex.input_ids.tolist() == prompt + ids("4", "1", "3", "</s>")
    assert ex.loss_mask.tolist() == [0] * len(prompt) + [1] * 4
    # An empty input leaves the Input section out.
    ex2 = data.tokenize_record(tok, {"instruction": "Reverse the list", "input": "",
                                     "output": "4"})
    assert VOCAB["Input"] not in ex2.input_ids.tolist()


def test_chat_template_masks_only_assistant_turns():
    tok = make_tokenizer(chat=True)
    rec = {"messages": [{"role": "system", "content": "be brief"},
                        {"role": "user", "content": "hi"},
                        {"role": "assistant", "content": "hello"},
                        {"role": "user", "content": "bye"},
                        {"role": "assistant", "content": "see you"}]}
    ex = data.tokenize_record(tok, rec)
    expect = ids("<s>", "<|system|>", "be", "brief", "</s>", "<|user|>", "hi", "</s>",
                 "<|assistant|>", "hello", "</s>", "<|user|>", "bye", "</s>", "<|assistant|>",
                 "see", "you", "</s>")
    assert ex.input_ids.tolist() == expect
    assert ex.loss_mask.tolist() == [0] * 9 + [1, 1] + [0] * 4 + [1, 1, 1]


def test_chat_record_with_plain_template():
    tok = make_tokenizer()
    rec = {"messages": [{"role": "user", "content": "hi"},
                        {"role": "assistant", "content": "hello"}]}
    ex = data.tokenize_record(tok, rec)
    assert ex.input_ids.tolist() == ids("<s>", "###", "Instruction", ":", "hi", "###",
                                        "Response", ":", "hello", "</s>")
    assert ex.loss_mask.tolist() == [0] * 8 + [1, 1]


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_load_json_and_jsonl(tmp_path):
    recs = [{"instruction": "a", "output": "b"},
            {"messages": [{"role": "user", "content": "a"},
                          {"role": "assistant", "content": "b"}]}]
    assert data.load_records(write(tmp_path, "d.json", json.dumps(recs))) == recs
    jl = write(tmp_path, "d.jsonl", "\n".join(json.dumps(r) for r in recs) + "\n\n")
    assert data.load_records(jl) == recs


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        data.load_records(tmp_path / "nope.jsonl")
    bad = write(tmp_path, "bad.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": \n')
    with pytest.raises(ValueError, match="line 2"):
        data.load_records(bad)
    missing = write(tmp_path, "m.jsonl", '{"instruction": "a", "output": "b"}\n'
                                         '{"instruction": "a"}\n')
    with pytest.raises(ValueError, match="line 2 of .*m.jsonl is missing 'output'"):
        data.load_records(missing)
    neither = write(tmp_path, "n.json", '[{"prompt": "a"}]')
    with pytest.raises(ValueError, match="record 1 of .*n.json is missing 'instruction' and "
                                         "'output'"):
        data.load_records(neither)
    no_asst = write(tmp_path, "c.json", '[{"messages": [{"role": "user", "content": "a"}]}]')
    with pytest.raises(ValueError, match="record 1 of .*no assistant"):
        data.load_records(no_asst)
    bad_role = write(tmp_path, "r.json", '[{"messages": [{"role": "bot", "content": "a"}]}]')
    with pytest.raises(ValueError, match="record 1 of .*r.json: message 1 has role 'bot'"):
        data.load_records(bad_role)
    # Records given to the API directly are numbered from 1 too.
    with pytest.raises(data.DataError, match="^record 2 is missing 'output'"):
        data.build_examples([{"instruction": "a", "output": "b"}, {"instruction": "a"}],
                            make_tokenizer(), 10)
    tok = make_tokenizer()
    recs = [{"instruction": "Reverse the list", "output": "1 2 3"}] * 3
    with pytest.raises(ValueError, match=r"all 3 examples.*3 dropped.*--max-seq-len"):
        data.build_examples(recs, tok, max_seq_len=5)
    # Some dropped: counted, not an error.
    exs, stats = data.build_examples(recs + [{"instruction": "hi", "output": "a"}], tok, 10)
    assert stats.dropped_too_long == 3 and len(exs) == 1
    # Truncation keeps them when a target token survives.
    exs, stats = data.build_examples(recs, tok, max_seq_len=12, truncate=True)
    assert stats.truncated == 3 and all(len(e) == 12 for e in exs)


def test_load_tokenizer_sets_pad_to_eos(tmp_path):
    make_tokenizer(pad=False).save_pretrained(tmp_path)
    tok = data.load_tokenizer(tmp_path)
    assert tok.pad_token_id == tok.eos_token_id == VOCAB["</s>"]
    with pytest.raises(ValueError, match="tokenizer"):
        data.load_tokenizer(tmp_path / "missing")


def random_examples(n, seed=0, lo=3, hi=200):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        L = int(rng.integers(lo, hi + 1))
        tokens = np.full(L, 10 + i % 7, np.int32)
        tokens[0] = i  # identifies the example
        mask = np.zeros(L, np.int32)
        mask[L // 2:] = 1
        out.append(data.Example(tokens, mask))
    return out


def test_bucketing_shapes_and_coverage():
    exs = random_examples(103)
    loader = data.DataLoader(exs, batch_size=8, seed=3, pad_id=0, max_seq_len=200,
                             drop_last=False)
    allowed = {(8, 64), (8, 128), (8, 192), (8, 200)}
    assert loader.shapes() == allowed
    for epoch in range(2):
        seen = []
        for _ in range(len(loader)):
            b = next(loader)
            assert b["epoch"] == epoch
            assert b["input_ids"].shape in allowed and b["input_ids"].dtype == np.int32
            assert b["loss_mask"].shape == b["input_ids"].shape
            lens = [len(exs[i]) for i in b["input_ids"][: b["num_examples"], 0]]
            assert b["num_tokens"] == sum(lens)
            assert b["input_ids"].shape[1] == loader.bucket_for(max(lens))
            for r, i in enumerate(b["input_ids"][: b["num_examples"], 0]):
                ex = exs[i]
                assert (b["input_ids"][r, :len(ex)] == ex.input_ids).all()
                assert (b["input_ids"][r, len(ex):] == 0).all()
                assert (b["loss_mask"][r, :len(ex)] == ex.loss_mask).all()
                assert not b["loss_mask"][r, len(ex):].any()
            seen += b["input_ids"][: b["num_examples"], 0].tolist()
        assert sorted(seen) == list(range(103))
    # Sorting within chunks keeps padding well below that of unsorted batching.
    def fill(chunk_batches):
        ld = data.DataLoader(exs, batch_size=8, seed=3, max_seq_len=200, drop_last=False,
                             chunk_batches=chunk_batches)
        b = [next(ld) for _ in range(2 * len(ld))]
        return sum(x["num_tokens"] for x in b) / sum(x["input_ids"].size for x in b)
    assert fill(16) > fill(1) + 0.15


def test_drop_last_and_epochs_reshuffle():
    exs = random_examples(20)
    loader = data.DataLoader(exs, batch_size=6, seed=1)
    assert len(loader) == 3
    e0 = [next(loader)["input_ids"][:, 0].tolist() for _ in range(3)]
    e1 = [next(loader)["input_ids"][:, 0].tolist() for _ in range(3)]
    assert e0 != e1
    loader2 = data.DataLoader(exs, batch_size=6, seed=1, num_epochs=1)
    assert [b["input_ids"][:, 0].tolist() for b in loader2] == e0


def test_resume_gives_identical_batches():
    exs = random_examples(50, seed=2)
    kw = dict(batch_size=4, seed=7, pad_id=0, max_seq_len=200)
    a = data.DataLoader(exs, **kw)
    for _ in range(17):  # crosses the epoch boundary (12 batches an epoch)
        next(a)
    state = json.loads(json.dumps(a.state_dict()))
    rest_a = [next(a) for _ in range(15)]
    b = data.DataLoader(exs, **kw)
    b.load_state_dict(state)
    rest_b = [next(b) for _ in range(15)]
    for x, y in zip(rest_a, rest_b):
        assert x["epoch"] == y["epoch"] and x["step_in_epoch"] == y["step_in_epoch"]
        np.testing.assert_array_equal(x["input_ids"], y["input_ids"])
        np.testing.assert_array_equal(x["loss_mask"], y["loss_mask"])
    # The same as an uninterrupted run.
    c = data.DataLoader(exs, **kw)
    full = [next(c) for _ in range(32)]
    for x, y in zip(full[17:], rest_b):
        np.testing.assert_array_equal(x["input_ids"], y["input_ids"])
    with pytest.raises(ValueError, match="seed"):
        data.DataLoader(exs, batch_size=4, seed=8).load_state_dict(state)


def test_eval_split_deterministic_and_disjoint():
    items = list(range(100))
    tr, ev = data.train_eval_split(items, eval_fraction=0.1, seed=5)
    tr2, ev2 = data.train_eval_split(items, eval_fraction=0.1, seed=5)
    assert (tr, ev) == (tr2, ev2)
    assert len(ev) == 10 and not set(tr) & set(ev) and sorted(tr + ev) == items
    _, ev3 = data.train_eval_split(items, eval_size=10, seed=6)
    assert ev3 != ev
    assert data.train_eval_split(items, seed=0) == (items, [])
    with pytest.raises(ValueError):
        data.train_eval_split(items, eval_size=100)


def test_prepare_data_and_eval_batches(tmp_path):
    tok = make_tokenizer()
    recs = [{"instruction": "Reverse the list", "input": " ".join(str(i % 10) for i in range(k)),
             "output": str(k % 10)} for k in range(1, 41)]
    p = write(tmp_path, "d.jsonl", "\n".join(json.dumps(r) for r in recs))
    s = data.prepare_data(p, tok, max_seq_len=64, eval_size=6, seed=0)
    assert len(s.train) == 34 and len(s.eval) == 6
    batches = data.eval_batches(s.eval, batch_size=4, pad_id=tok.pad_token_id, max_seq_len=64)
    assert [b["num_examples"] for b in batches] == [4, 2]
    assert all(b["input_ids"].shape == (4, 64) for b in batches)
    assert sum(b["num_target_tokens"] for b in batches) == sum(int(e.loss_mask.sum())
                                                               for e in s.eval)


def distinct_length_examples(n):
    """``n`` examples of lengths 1..n in a scrambled order; token 0 of each is its index."""
    lengths = np.random.default_rng(4).permutation(np.arange(1, n + 1))
    return [data.Example(np.full(L, i, np.int32), np.ones(L, np.int32))
            for i, L in enumerate(lengths)]


def test_drop_last_leaves_out_different_examples_each_epoch():
    exs = distinct_length_examples(100)
    loader = data.DataLoader(exs, batch_size=8, seed=0, max_seq_len=128)
    assert len(loader) == 12
    seen_per_epoch = []
    for _ in range(20):
        seen = []
        for _ in range(len(loader)):
            b = next(loader)
            assert b["num_examples"] == 8
            seen += b["input_ids"][:, 0].tolist()
        assert len(set(seen)) == 96
        seen_per_epoch.append(frozenset(seen))
    assert set().union(*seen_per_epoch) == set(range(100))  # nothing is starved
    assert len(set(seen_per_epoch)) > 1
    # The longest examples are trained on too, not only the shortest 96.
    longest = max(range(100), key=lambda i: len(exs[i]))
    assert sum(longest in s for s in seen_per_epoch) >= 10


def test_drop_last_resume_mid_epoch_matches_uninterrupted():
    exs = distinct_length_examples(100)
    kw = dict(batch_size=8, seed=5, max_seq_len=128)
    full = data.DataLoader(exs, **kw)
    uninterrupted = [next(full)["input_ids"] for _ in range(30)]
    a = data.DataLoader(exs, **kw)
    for _ in range(17):  # the middle of the second epoch
        next(a)
    b = data.DataLoader(exs, **kw)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    for want in uninterrupted[17:]:
        np.testing.assert_array_equal(next(b)["input_ids"], want)
    # And the same seed gives the same plan, another seed another one.
    assert [x.tolist() for x in data.DataLoader(exs, **kw).epoch_plan(3)] == \
        [x.tolist() for x in full.epoch_plan(3)]
    other = data.DataLoader(exs, **{**kw, "seed": 6})
    assert [x.tolist() for x in other.epoch_plan(3)] != [x.tolist() for x in full.epoch_plan(3)]


def test_too_few_examples_names_cli_flags():
    with pytest.raises(ValueError) as e:
        data.DataLoader(random_examples(5), batch_size=8)
    msg = str(e.value)
    assert "--batch-size" in msg and "5" in msg and "add examples" in msg
    assert "drop_last" not in msg


def test_eval_batches_subset_spans_all_lengths():
    exs = distinct_length_examples(100)
    lengths = np.array([len(e) for e in exs])

    def chosen(seed):
        batches = data.eval_batches(exs, batch_size=4, max_seq_len=128, max_batches=5,
                                    seed=seed)
        assert len(batches) == 5 and all(b["num_examples"] == 4 for b in batches)
        return [int(i) for b in batches for i in b["input_ids"][:, 0]]

    picks = {seed: chosen(seed) for seed in range(8)}
    for ids in picks.values():
        assert len(set(ids)) == 20
        # A sample across all lengths: its mean is near the mean of all (the shortest 20
        # examples would have mean 10.5 against 50.5), and long examples are among them.
        assert abs(lengths[ids].mean() - lengths.mean()) < 20
        assert lengths[ids].max() > 60
    assert picks[0] == chosen(0)  # deterministic in the seed
    assert len({tuple(v) for v in picks.values()}) > 1
    longest = int(np.argmax(lengths))
    assert any(longest in ids for ids in picks.values())
    # Each batch still holds examples of similar length (length-bucketed).
    batches = data.eval_batches(exs, batch_size=4, max_seq_len=128, max_batches=5)
    maxima = [b["num_tokens"] for b in batches]
    assert maxima == sorted(maxima)
    # None, or a limit the set does not exceed, evaluates every example once.
    for limit in (None, 25, 40):
        every = data.eval_batches(exs, batch_size=4, max_seq_len=128, max_batches=limit)
        assert sorted(int(i) for b in every for i in b["input_ids"][:b["num_examples"], 0]) == \
            list(range(100))
    assert data.eval_batches(exs, batch_size=4, max_seq_len=128, max_batches=0) == []


def test_bos_only_when_the_tokenizer_adds_it(tmp_path):
    rec = {"instruction": "Reverse the list", "output": "4 1 3"}
    prompt = data.PROMPT_TEMPLATE_NO_INPUT.format(instruction="Reverse the list")
    for add_bos in (True, False):
        tok = make_tokenizer(add_bos=add_bos)
        assert (tok("hi")["input_ids"][0] == VOCAB["<s>"]) == add_bos
        ex = data.tokenize_record(tok, rec)
        # Training sees the prompt exactly as the tokenizer encodes it (lisa-jax generate --raw).
        raw = tok(prompt)["input_ids"]
        assert ex.input_ids[:len(raw)].tolist() == raw
        assert ex.input_ids.tolist().count(VOCAB["<s>"]) == int(add_bos)
        assert ex.loss_mask.tolist() == [0] * len(raw) + [1] * 4
        # The same after a save and load_tokenizer.
        tok.save_pretrained(tmp_path / str(add_bos))
        again = data.load_tokenizer(tmp_path / str(add_bos))
        assert data.tokenize_record(again, rec).input_ids.tolist() == ex.input_ids.tolist()
    no_bos = make_tokenizer(bos=None)
    assert VOCAB["<s>"] not in data.tokenize_record(no_bos, rec).input_ids.tolist()


def test_chat_template_bos_never_doubled():
    rec = {"messages": [{"role": "user", "content": "hi"},
                        {"role": "assistant", "content": "hello"}]}
    body = ids("<|user|>", "hi", "</s>", "<|assistant|>", "hello", "</s>")
    assert data.tokenize_record(make_tokenizer(chat=True, add_bos=False), rec
                                ).input_ids.tolist() == body
    assert data.tokenize_record(make_tokenizer(chat=True, add_bos=True), rec
                                ).input_ids.tolist() == ids("<s>") + body
    # A template that writes the BOS itself gets exactly one, whatever add_bos_token says.
    with_bos = "{{ bos_token }}" + CHAT_TEMPLATE
    for add_bos in (True, False):
        ex = data.tokenize_record(make_tokenizer(chat=with_bos, add_bos=add_bos), rec)
        assert ex.input_ids.tolist() == ids("<s>") + body
        assert ex.loss_mask.tolist() == [0] * 5 + [1, 1]


# ----------------------------------------------------------------------------- file formats

ALPACA = [{"instruction": "Reverse the list", "input": "3 1 4", "output": "4 1 3"},
          {"instruction": "Reverse the list, be brief", "input": "", "output": "a b"},
          # quotes, a comma, a newline and U+2028 (a line break to str.splitlines, not JSON)
          {"instruction": 'hi, "be brief"\nhello', "input": "a\u2028b", "output": "see you"},
          {"instruction": "hi", "input": "1 2", "output": "bye"}]
CHAT = [{"messages": [{"role": "system", "content": "be brief"},
                      {"role": "user", "content": "hi"},
                      {"role": "assistant", "content": "hello"},
                      {"role": "user", "content": "bye, \"a\""},
                      {"role": "assistant", "content": "see you"}]},
        {"messages": [{"role": "user", "content": "Reverse the list\n1 2"},
                      {"role": "assistant", "content": "2 1"}]},
        {"messages": [{"role": "user", "content": "a"},
                      {"role": "assistant", "content": "b c"}]}]
TO_SHAREGPT = {"system": "system", "user": "human", "assistant": "gpt"}


def sharegpt(records, roles=TO_SHAREGPT):
    return [{"conversations": [{"from": roles[m["role"]], "value": m["content"]}
                               for m in r["messages"]]} for r in records]


def table_rows(records):
    """Records as table rows: chat messages as JSON text (a CSV cell holds text)."""
    return [{"messages": json.dumps(r["messages"])} if "messages" in r else r for r in records]


def write_jsonl(path, records, bom=False, crlf=False):
    nl = "\r\n" if crlf else "\n"
    text = nl.join(json.dumps(r, ensure_ascii=False) for r in records) + nl
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode())
    return path


def write_csv(path, records, delimiter=",", bom=False, crlf=False):
    import csv
    import io
    rows = table_rows(records)
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=list(rows[0]), delimiter=delimiter,
                       lineterminator="\r\n" if crlf else "\n")
    w.writeheader()
    w.writerows(rows)
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + buf.getvalue().encode())
    return path


def write_parquet(path, records, json_text=False):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(table_rows(records) if json_text else records), path)
    return path


def write_arrow_stream(path, records):
    import pyarrow as pa
    table = pa.Table.from_pylist(records)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return path


def write_save_to_disk(folder, records, shards=2):
    """The layout ``datasets.Dataset.save_to_disk`` writes (Arrow streams listed in state.json;
    checked against datasets 5.2), without needing the library."""
    folder.mkdir()
    cut = -(-len(records) // shards)
    names = [f"data-{i:05d}-of-{shards:05d}.arrow" for i in range(shards)]
    for i, name in enumerate(names):
        write_arrow_stream(folder / name, records[i * cut:(i + 1) * cut])
    (folder / "state.json").write_text(json.dumps(
        {"_data_files": [{"filename": n} for n in names], "_fingerprint": "0",
         "_format_columns": None, "_format_kwargs": {}, "_format_type": None,
         "_output_all_columns": False, "_split": None}))
    (folder / "dataset_info.json").write_text("{}")
    return folder


FORMATS = {
    "jsonl": lambda d, r: write_jsonl(d / "d.jsonl", r),
    "jsonl_bom_crlf": lambda d, r: write_jsonl(d / "d.jsonl", r, bom=True, crlf=True),
    "json_array": lambda d, r: write(d, "d.json", json.dumps(r, indent=2)),
    "json_array_bom_crlf": lambda d, r: (d / "d.json").write_bytes(
        b"\xef\xbb\xbf" + json.dumps(r, indent=2).replace("\n", "\r\n").encode()) and d / "d.json",
    "parquet": lambda d, r: write_parquet(d / "d.parquet", r),
    "parquet_json_text": lambda d, r: write_parquet(d / "d.parquet", r, json_text=True),
    "parquet_no_suffix": lambda d, r: write_parquet(d / "d.data", r),
    "csv": lambda d, r: write_csv(d / "d.csv", r),
    "csv_bom_crlf": lambda d, r: write_csv(d / "d.csv", r, bom=True, crlf=True),
    "tsv": lambda d, r: write_csv(d / "d.tsv", r, delimiter="\t"),
    "arrow": lambda d, r: write_arrow_stream(d / "d.arrow", r),
    "save_to_disk": lambda d, r: write_save_to_disk(d / "saved", r),
}
SHAREGPT_FORMATS = {
    "sharegpt_json": lambda d, r: write(d, "s.json", json.dumps(sharegpt(r))),
    "sharegpt_jsonl": lambda d, r: write_jsonl(d / "s.jsonl", sharegpt(r)),
    "sharegpt_user_assistant": lambda d, r: write_jsonl(
        d / "s.jsonl", sharegpt(r, {"system": "system", "user": "user",
                                    "assistant": "assistant"})),
    "sharegpt_parquet": lambda d, r: write_parquet(d / "s.parquet", sharegpt(r)),
    "sharegpt_csv": lambda d, r: write_csv(d / "s.csv", [
        {"conversations": json.dumps(c["conversations"])} for c in sharegpt(r)]),
}


def batches_of(records, tok):
    exs, _ = data.build_examples(records, tok, max_seq_len=64)
    loader = data.DataLoader(exs, batch_size=2, seed=3, pad_id=tok.pad_token_id,
                             max_seq_len=64, drop_last=False, num_epochs=2)
    return [(b["input_ids"].tolist(), b["loss_mask"].tolist()) for b in loader]


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("kind", ["alpaca", "chat"])
def test_every_format_gives_the_batches_of_jsonl(tmp_path, fmt, kind):
    records, tok = (ALPACA, make_tokenizer()) if kind == "alpaca" else \
        (CHAT, make_tokenizer(chat=True))
    loaded = data.load_records(FORMATS[fmt](tmp_path, records))
    assert loaded == records  # every field, in order, newlines and U+2028 kept
    assert batches_of(loaded, tok) == batches_of(records, tok)


@pytest.mark.parametrize("fmt", sorted(SHAREGPT_FORMATS))
def test_sharegpt_reads_as_chat_records(tmp_path, fmt):
    loaded = data.load_records(SHAREGPT_FORMATS[fmt](tmp_path, CHAT))
    assert loaded == CHAT  # human -> user, gpt -> assistant, system kept, order kept
    for tok in (make_tokenizer(chat=True), make_tokenizer()):
        assert batches_of(loaded, tok) == batches_of(CHAT, tok)
    # The API takes ShareGPT records as they are too.
    tok = make_tokenizer(chat=True)
    raw = sharegpt(CHAT)[0]
    assert data.tokenize_record(tok, raw).input_ids.tolist() == \
        data.tokenize_record(tok, CHAT[0]).input_ids.tolist()
    assert batches_of(sharegpt(CHAT), tok) == batches_of(CHAT, tok)


def test_sharegpt_system_field_and_masks():
    rec = {"system": "be brief", "conversations": [{"from": "human", "value": "hi"},
                                                   {"from": "gpt", "value": "hello"}]}
    assert data.normalize_record(rec, 0) == {"messages": [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"}]}
    ex = data.tokenize_record(make_tokenizer(chat=True), rec)
    # Only the gpt turn is a target.
    assert [t for t, m in zip(ex.input_ids.tolist(), ex.loss_mask.tolist()) if m] == \
        ids("hello", "</s>")


def test_datasets_save_to_disk_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(ALPACA).save_to_disk(str(tmp_path / "ds"))
    assert data.load_records(tmp_path / "ds") == ALPACA


def test_arrow_folder_without_state_json_reads_every_shard(tmp_path):
    folder = write_save_to_disk(tmp_path / "saved", ALPACA, shards=3)
    (folder / "state.json").unlink()
    assert data.load_records(folder) == ALPACA


def test_several_files_concatenate_in_order(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", ALPACA[:2])
    b = write_csv(tmp_path / "b.csv", CHAT)
    c = write_parquet(tmp_path / "c.parquet", ALPACA[2:])
    assert data.load_records([a, b, c]) == ALPACA[:2] + CHAT + ALPACA[2:]
    assert data.load_records([c, a]) == ALPACA[2:] + ALPACA[:2]
    assert data.load_records([str(a)]) == ALPACA[:2]
    tok = make_tokenizer()
    s = data.prepare_data([a, c], tok, max_seq_len=64)
    one = data.prepare_data(write_jsonl(tmp_path / "all.jsonl", ALPACA), tok, max_seq_len=64)
    assert [e.input_ids.tolist() for e in s.train] == [e.input_ids.tolist() for e in one.train]
    # A mistake in the second file names that file and its own line numbers.
    bad = write(tmp_path, "bad.jsonl", json.dumps(ALPACA[0]) + '\n{"instruction": "a"}\n')
    with pytest.raises(data.DataError, match=r"^line 2 of \S*bad\.jsonl is missing 'output'"):
        data.load_records([a, bad])
    with pytest.raises(data.DataError, match="--data"):
        data.load_records([])


def test_mixed_alpaca_and_chat_rows_in_one_csv(tmp_path):
    cell = json.dumps(CHAT[1]["messages"]).replace('"', '""')
    p = write(tmp_path, "m.csv", f'instruction,input,output,messages\nhi,,a,\n,,,"{cell}"\n')
    assert data.load_records(p) == [{"instruction": "hi", "input": "", "output": "a"}, CHAT[1]]


# ----------------------------------------------------------------------------- bad inputs


def _csv(text):
    return lambda d: write(d, "data.csv", text)


def _parquet(rows, name="data.parquet"):
    return lambda d: write_parquet(d / name, rows)


def write_dataset_dict(folder):
    """What ``datasets.DatasetDict.save_to_disk`` writes: a folder per split."""
    folder.mkdir()
    for split in ("train", "test"):
        write_save_to_disk(folder / split, ALPACA)
    (folder / "dataset_dict.json").write_text('{"splits": ["train", "test"]}')
    return folder


GOOD = json.dumps({"instruction": "a", "output": "b"})
BAD_INPUTS = {
    # name: (make the input in a folder, substrings the message must hold)
    "missing_file": (lambda d: d / "nope.jsonl", ["nope.jsonl", "not found", "--data"]),
    "binary": (lambda d: (d / "data.jsonl").write_bytes(b"PK\x03\x04\x00\x00\x01") and
               d / "data.jsonl", ["data.jsonl", "binary", "--data"]),
    "latin1": (lambda d: (d / "data.jsonl").write_bytes(
        (GOOD + '\n{"instruction": "caf\xe9", "output": "b"}\n').encode("latin-1")) and
        d / "data.jsonl", ["data.jsonl", "not UTF-8", "line 2", "UTF-8"]),
    "utf16": (lambda d: (d / "data.jsonl").write_bytes((GOOD + "\n").encode("utf-16")) and
              d / "data.jsonl", ["data.jsonl", "UTF-16", "UTF-8"]),
    "empty": (lambda d: write(d, "data.jsonl", "\n \n"), ["data.jsonl", "empty"]),
    "jsonl_malformed": (lambda d: write(d, "data.jsonl", f"{GOOD}\n{GOOD}\n{{\"instruction\":\n"),
                        ["line 3 of", "data.jsonl", "malformed JSON"]),
    # a blank line: line numbers count it, so the second record is on line 3
    "jsonl_missing_output": (lambda d: write(d, "data.jsonl", f'{GOOD}\n\n{{"instruction": "a"}}'),
                             ["line 3 of", "data.jsonl", "missing 'output'", "'instruction'"]),
    "jsonl_first_line": (lambda d: write(d, "data.jsonl", '{"prompt": "a", "answer": "b"}\n'),
                         ["line 1 of", "'prompt'", "'instruction' and 'output'", "messages",
                          "conversations"]),
    "json_record_2": (lambda d: write(d, "data.json", f'[{GOOD}, {{"output": "b"}}]'),
                      ["record 2 of", "data.json", "missing 'instruction'"]),
    "json_not_object": (lambda d: write(d, "data.json", f'[{GOOD}, ["a", "b"]]'),
                        ["record 2 of", "data.json", "list, not an object"]),
    "json_malformed": (lambda d: write(d, "data.json", f'[\n{GOOD},\n{GOOD}\n{GOOD}]'),
                       ["line 4 of", "data.json", "malformed JSON"]),
    "json_one_object": (lambda d: write(d, "data.json", '{\n"data": [\n' + GOOD + "]\n}"),
                        ["data.json", "one JSON object", "'data'", "--data"]),
    "json_number_field": (lambda d: write(d, "data.json", '[{"instruction": 3, "output": "b"}]'),
                          ["record 1 of", "'instruction' must be a string, not number"]),
    "chat_bad_role": (lambda d: write(d, "data.jsonl", json.dumps({"messages": [
        {"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]})),
        ["line 1 of", "message 2 has role 'bot'", "assistant"]),
    "sharegpt_bad_role": (lambda d: write(d, "data.jsonl", GOOD + "\n" + json.dumps(
        {"conversations": [{"from": "human", "value": "a"}, {"from": "bot", "value": "b"}]})),
        ["line 2 of", "data.jsonl", "turn 2 is from 'bot'", "human, gpt or system"]),
    "sharegpt_no_gpt": (lambda d: write(d, "data.json", json.dumps(
        [{"conversations": [{"from": "human", "value": "a"}]}])),
        ["record 1 of", "data.json", "no gpt turn"]),
    "sharegpt_no_value": (lambda d: write(d, "data.json", json.dumps(
        [{"conversations": [{"from": "human", "text": "a"}]}])),
        ["record 1 of", "turn 1", "'from' or 'value'"]),
    "csv_columns": (_csv("prompt,response\na,b\n"),
                    ["data.csv", "columns 'prompt', 'response'", "'instruction' and 'output'",
                     "messages"]),
    "csv_field_count": (_csv("instruction,output\na,b\nc,d,e\n"),
                        ["line 3 of", "data.csv", "3 fields", "header has 2", "quote"]),
    # a quoted newline in record 1: record 2 starts on line 4
    "csv_multiline_then_bad": (_csv('instruction,output\n"a\nb",c\nd,e,f\n'),
                               ["line 4 of", "data.csv", "3 fields"]),
    # a bad record spanning lines 3-4: named by the line it starts on
    "csv_bad_multiline_record": (_csv('instruction,output\na,b\n"c\nd",e,f\n'),
                                 ["line 3 of", "data.csv", "3 fields"]),
    "csv_messages_not_json": (_csv('messages\n"[{""role"": ""assistant"", ""content"": ""a""}]"\n'
                                   '"[{role: user}]"\n'),
                              ["line 3 of", "data.csv", "column 'messages' is not JSON"]),
    "csv_messages_missing_content": (_csv('messages\n"[{""role"": ""user""}]"\n'),
                                     ["line 2 of", "data.csv", "message 1", "'content'"]),
    "csv_empty": (_csv(""), ["data.csv", "empty"]),
    "parquet_columns": (_parquet([{"text": "a"}]), ["data.parquet", "columns 'text'"]),
    "parquet_null_output": (_parquet([{"instruction": "a", "output": "b"},
                                      {"instruction": "a", "output": None}]),
                            ["record 2 of", "data.parquet", "'output' must be a string, not null"]),
    "parquet_corrupt": (lambda d: write(d, "data.parquet", "not parquet"),
                        ["data.parquet", "not a readable parquet file", "--data"]),
    "dataset_dict": (lambda d: write_dataset_dict(d / "dd"),
                     ["DatasetDict", "train, test", "--data", "dd/train"]),
    "folder_without_arrow": (lambda d: (d / "empty_dir").mkdir() or d / "empty_dir",
                             ["empty_dir", "without .arrow files", "--data"]),
    "save_to_disk_bad_record": (lambda d: write_save_to_disk(d / "saved", ALPACA[:3] + [
        {"instruction": "a", "input": "", "output": None}]),
        ["record 4 of", "saved", "'output' must be a string"]),
}
PYTHON_NAMES = ("drop_last", "use_chat_template", "eval_fraction", "eval_size", "batch_size",
                "max_batches", "=False", "=True", "record 0")


def check_one_line(msg, must):
    assert "\n" not in msg, msg
    for part in must:
        assert part in msg, (part, msg)
    for name in PYTHON_NAMES:
        assert name not in msg, (name, msg)


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_gives_one_line_naming_file_record_and_fix(tmp_path, case):
    make, must = BAD_INPUTS[case]
    path = make(tmp_path)
    with pytest.raises(data.DataError) as e:
        data.load_records(path)
    check_one_line(str(e.value), must)
    assert isinstance(e.value, ValueError)  # the trainer turns ValueErrors into one-line errors


def _not_incremental():
    # The template writes the turn count first, so an earlier rendering is no prefix.
    tok = make_tokenizer(chat="{{ messages|length }} " + CHAT_TEMPLATE)
    data.tokenize_record(tok, CHAT[1])


def _resume(**kw):
    exs = random_examples(20)
    state = data.DataLoader(exs, batch_size=4, seed=0).state_dict()
    other = dict(exs=exs, batch_size=4, seed=0) | kw
    data.DataLoader(other.pop("exs"), **other).load_state_dict(state)


API_MISTAKES = {
    "too_few_for_a_batch": (lambda: data.DataLoader(random_examples(5), batch_size=8),
                            ["5 training examples", "--batch-size to 5", "--data"]),
    "batch_size_0": (lambda: data.DataLoader(random_examples(5), batch_size=0),
                     ["--batch-size must be at least 1"]),
    "eval_fraction_1": (lambda: data.train_eval_split(list(range(9)), eval_fraction=1.0),
                        ["--eval-fraction", "[0, 1)"]),
    "eval_takes_all": (lambda: data.train_eval_split([1], eval_size=1),
                       ["--eval-fraction", "--data"]),
    "eval_batches": (lambda: data.eval_batches(random_examples(3), 2, max_batches=-1),
                     ["--eval-batches"]),
    "resume_seed": (lambda: _resume(seed=1), ["--seed"]),
    "resume_data": (lambda: _resume(exs=random_examples(21)), ["--data"]),
    "resume_batch": (lambda: _resume(batch_size=2), ["--batch-size"]),
    "all_too_long": (lambda: data.build_examples(ALPACA, make_tokenizer(), 4),
                     ["--max-seq-len", "--truncate"]),
    "template": (_not_incremental, ["chat template", "tokenizer_config.json", "plain"]),
    "tokenizer_dir": (lambda: data.load_tokenizer("/nonexistent/model"),
                      ["/nonexistent/model", "--model", "not found"]),
    "tokenizer_files": (lambda: data.load_tokenizer(data.Path(__file__).parent),
                        ["--model", "tokenizer.json"]),
}


@pytest.mark.parametrize("case", sorted(API_MISTAKES))
def test_mistakes_name_cli_flags_not_python_parameters(case):
    call, must = API_MISTAKES[case]
    with pytest.raises(data.DataError) as e:
        call()
    check_one_line(str(e.value), must)


def test_fewer_records_than_a_batch_after_the_eval_split(tmp_path):
    tok = make_tokenizer()
    p = write_jsonl(tmp_path / "d.jsonl", ALPACA + ALPACA[:2])  # 6 records, 1 held out
    s = data.prepare_data(p, tok, max_seq_len=64, eval_fraction=0.2)
    assert (len(s.train), len(s.eval)) == (5, 1)
    with pytest.raises(data.DataError, match="5 training examples.*--batch-size to 5"):
        data.DataLoader(s.train, batch_size=8)
    assert len(data.DataLoader(s.train, batch_size=5)) == 1


# ----------------------------------------------------------------------------- vocab, empty


def test_check_vocab_counts_added_tokens():
    tok = make_tokenizer()
    n = len(VOCAB)
    data.check_vocab(tok, n)
    data.check_vocab(tok, n + 64)  # a padded embedding is fine
    with pytest.raises(data.DataError) as e:
        data.check_vocab(tok, n - 1)
    check_one_line(str(e.value), [f"{n} tokens", f"vocab_size is {n - 1}", "--model"])
    # An added token past the model's rows: tokenizer.vocab_size does not count it.
    tok.add_tokens(["<extra>"])
    assert tok.vocab_size == n
    with pytest.raises(data.DataError, match=f"{n + 1} tokens.*vocab_size is {n}"):
        data.check_vocab(tok, n)


def test_all_empty_responses_warn_and_count(tmp_path):
    import warnings
    tok = make_tokenizer()
    empty = [{"instruction": "hi", "output": ""}, {"instruction": "bye", "output": "  "},
             {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}]}]
    with pytest.warns(UserWarning, match="all 3 records have an empty response.*no response "
                                         "tokens.*--data"):
        exs, stats = data.build_examples(empty, tok, 64)
    assert stats.empty_responses == 3
    # What is left to learn is the end of the response.
    assert all(e.input_ids[e.loss_mask == 1].tolist() == ids("</s>") for e in exs)
    # One warning from prepare_data, not one per split.
    p = write_jsonl(tmp_path / "e.jsonl", empty * 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data.prepare_data(p, tok, 64, eval_fraction=0.25)
    assert len([w for w in caught if "empty response" in str(w.message)]) == 1
    # Some empty responses: counted, no warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, stats = data.build_examples(empty + ALPACA, tok, 64)
    assert stats.empty_responses == 3


def test_plain_template_separates_a_later_turn_from_the_reply_before_it():
    """In the plain template a second user turn starts a new paragraph: the decoded
    conversation never glues an instruction to the previous reply's last word."""
    segs = data.render_plain({"messages": [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]})
    assert [t for t, target in segs if target] == ["b", "d"]
    assert segs[2][0].startswith("\n\n### Instruction:\nc")
    assert not segs[0][0].startswith("\n")  # the first turn has nothing to be separated from


def test_train_on_inputs_makes_every_token_after_the_first_a_target():
    tok = make_tokenizer()
    rec = {"instruction": "Reverse the list", "output": "4 1 3"}
    base = data.tokenize_record(tok, rec)
    ex = data.tokenize_record(tok, rec, train_on_inputs=True)
    assert ex.input_ids.tolist() == base.input_ids.tolist()
    assert ex.loss_mask.tolist() == [0] + [1] * (len(ex) - 1)
    chat = make_tokenizer(chat=True)
    msgs = {"messages": [{"role": "system", "content": "be brief"},
                         {"role": "user", "content": "hi"},
                         {"role": "assistant", "content": "hello"}]}
    ex = data.tokenize_record(chat, msgs, train_on_inputs=True)
    assert ex.loss_mask.tolist() == [0] + [1] * (len(ex) - 1)
    assert data.tokenize_record(chat, msgs).loss_mask.sum() < ex.loss_mask.sum()


def test_chat_template_choice(tmp_path):
    # auto: the tokenizer's when it has one; plain removes it, so samples render alike.
    tok = make_tokenizer(chat=True)
    assert data.use_chat_template(tok, "auto") and data.use_chat_template(tok, "tokenizer")
    assert not data.use_chat_template(tok, "plain") and not tok.chat_template
    assert not data.use_chat_template(make_tokenizer(), "auto")
    with pytest.raises(data.DataError, match="has no chat template; pass --chat-template plain"):
        data.use_chat_template(make_tokenizer(), "tokenizer")
    # A Jinja file becomes the tokenizer's template and renders the records.
    jinja = write(tmp_path, "t.jinja", CHAT_TEMPLATE)
    tok = make_tokenizer()
    assert data.use_chat_template(tok, str(jinja))
    rec = {"messages": [{"role": "user", "content": "hi"},
                        {"role": "assistant", "content": "hello"}]}
    ex = data.tokenize_record(tok, rec)
    assert ex.input_ids.tolist() == data.tokenize_record(make_tokenizer(chat=True),
                                                         rec).input_ids.tolist()
    with pytest.raises(data.DataError, match="neither auto, tokenizer, plain nor a Jinja file"):
        data.use_chat_template(make_tokenizer(), str(tmp_path / "missing.jinja"))
    broken = write(tmp_path, "b.jinja", "{% for m in messages %}{{ m['content'] }")
    with pytest.raises(data.DataError, match=r"b\.jinja does not render a conversation"):
        data.use_chat_template(make_tokenizer(), str(broken))


def test_prepare_data_tells_each_training_example_its_file(tmp_path):
    """``train_sources`` follows the examples through the eval split and the examples dropped
    as too long, so mixing weights apply to the right file."""
    long = {"instruction": " ".join(["a"] * 80), "output": "b"}
    a = write_jsonl(tmp_path / "a.jsonl", [ALPACA[0], long, ALPACA[1]] * 4)
    b = write_jsonl(tmp_path / "b.jsonl", [dict(ALPACA[2], output="c c c")] * 5)
    s = data.prepare_data([a, b], make_tokenizer(), max_seq_len=64, eval_fraction=0.2, seed=1)
    assert len(s.train_sources) == len(s.train) and s.stats.dropped_too_long > 0
    for ex, src in zip(s.train, s.train_sources):
        assert (ids("c", "c", "c")[0] in ex.input_ids.tolist()) == (src == 1)
    assert set(s.train_sources) == {0, 1}
    assert data.prepare_data(a, make_tokenizer(), max_seq_len=64).train_sources is None


def test_export_renders_as_training_did(tmp_path):
    """``--chat-template plain`` or a Jinja file: the exported directory's tokenizer renders
    as training did (so ``lisa-jax generate`` on it does too)."""
    from transformers import AutoTokenizer
    jinja = write(tmp_path, "t.jinja", CHAT_TEMPLATE.replace("</s> ", "</s>\n"))
    for choice in ("plain", str(jinja), "auto"):
        d = tmp_path / f"hf{len(choice)}"
        make_tokenizer(chat=True).save_pretrained(d)  # the model's own template, copied
        tok = make_tokenizer(chat=True)
        data.use_chat_template(tok, choice)
        data.export_chat_template(d, tok, choice)
        back = AutoTokenizer.from_pretrained(str(d))
        want = {"plain": None, "auto": CHAT_TEMPLATE}.get(choice, jinja.read_text())
        assert (back.chat_template or None) == want, choice
