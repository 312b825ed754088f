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
