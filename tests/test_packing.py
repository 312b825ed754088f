"""Packing (``--packing``): rows of several examples give each example what it has alone (logits,
losses, gradients, for every step function), the packer and the packed stream (each example
once an epoch, exact resume), and mixing weights."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lisa_jax
from lisa_jax import data
from lisa_jax import layout as layout_lib
from lisa_jax import lora as lora_lib
from lisa_jax import model as M
from lisa_jax import step as S


def examples_of(lengths, vocab=64, seed=0, first_is_target=False):
    """Random examples; the loss mask is 1 on the second half (and on the first token when
    ``first_is_target``: packing must not let the previous example predict it)."""
    rng = np.random.default_rng(seed)
    out = []
    for n in lengths:
        mask = (np.arange(n) >= n // 2).astype(np.int32)
        if first_is_target:
            mask[0] = 1
        out.append(data.Example(rng.integers(0, vocab, n).astype(np.int32), mask))
    return out


# ----------------------------------------------------------------------------- the model


@pytest.mark.parametrize("variant", [{}, {"sliding_window": 3}], ids=["full", "window"])
def test_packed_rows_give_each_example_the_logits_it_has_alone(variant, tiny_cfg,
                                                               perturbed_params):
    """Each example's logits in a packed row equal its logits alone (so its losses do), with
    full attention and with a sliding window (which then counts within the example)."""
    cfg = tiny_cfg(num_layers=2, **variant)
    p = perturbed_params(cfg)
    exs = examples_of([5, 7, 4, 9, 3])
    rows = [[0, 1, 2], [3, 4]]
    batch = data.pack_batch(exs, rows, 2, 20, pad_id=0)
    np.testing.assert_array_equal(batch["segment_ids"][0], [1] * 5 + [2] * 7 + [3] * 4 + [0] * 4)
    forward = jax.jit(lambda ids, seg=None: M.forward(cfg, p, ids, segment_ids_BxS=seg))
    logits = forward(jnp.asarray(batch["input_ids"]), jnp.asarray(batch["segment_ids"]))
    # Each example alone, right padded (which causal attention ignores) to one shape.
    alone = forward(jnp.asarray(data.pad_batch(exs, len(exs), 20, 0)["input_ids"]))
    for r, row in enumerate(rows):
        t = 0
        for i in row:
            n = len(exs[i])
            np.testing.assert_allclose(logits[r, t:t + n], alone[i, :n], rtol=1e-5, atol=1e-5)
            t += n
    # Without the segments the later examples would see the earlier ones: the test can fail.
    crossed = forward(jnp.asarray(batch["input_ids"]))
    assert not np.allclose(crossed[0, 5:12], logits[0, 5:12], atol=1e-3)


def _one_by_one(exs, S_):
    """The examples as ``len(exs)`` micro-batches of one row each (gradient accumulation
    weighs them by their target tokens: the token mean over all of them)."""
    ids = np.zeros((len(exs), 1, S_), np.int32)
    mask = np.zeros((len(exs), 1, S_), np.int32)
    for a, ex in enumerate(exs):
        ids[a, 0, :len(ex)] = ex.input_ids
        mask[a, 0, :len(ex)] = ex.loss_mask
    return {"input_ids": jnp.asarray(ids), "loss_mask": jnp.asarray(mask)}


def _packed(exs, rows, S_):
    b = data.pack_batch(exs, rows, len(rows), S_, pad_id=0)
    return {k: jnp.asarray(b[k]) for k in ("input_ids", "loss_mask", "segment_ids")}


STEPS = ["lisa_stacked", "lisa_per_layer", "full", "lora"]


def _make_step(kind, cfg, p0):
    """``(step, params, state, read)``: one SGD(lr=1) step of ``kind``; ``read(params, state)``
    gives what it trained, so two runs compare by their updates (= their gradients)."""
    sgd = optax.sgd(1.0)
    if kind.startswith("lisa"):
        tx = lisa_jax.lisa(sgd, n_active=1, interval=100, key=3)
        p = layout_lib.convert(p0, kind.split("_", 1)[1])
        return (S.make_lisa_step(cfg, tx, donate=False), p, tx.init(p0),
                lambda p, s: layout_lib.convert(p, "stacked"))
    if kind == "full":
        return S.make_plain_step(cfg, sgd, donate=False), p0, sgd.init(p0), lambda p, s: p
    lora = lora_lib.init_lora(p0["layers"], jax.random.key(0), rank=2)
    lora = jax.tree.map(lambda x: x + 0.05, lora)  # nonzero B factors: both get gradients
    return (S.make_lora_step(cfg, sgd, lora_lib.lora_scale(2, None), donate=False), p0,
            (lora, sgd.init(lora)), lambda p, s: s[0])


@pytest.mark.parametrize("kind", STEPS)
def test_packed_batch_steps_as_the_examples_one_by_one(kind, tiny_cfg, perturbed_params,
                                                       rel_err):
    """The loss and the update of a step on a packed batch equal those of the same examples
    run one by one (one micro-batch each), for LISA's own backward (both layouts), full
    fine-tuning and LoRA; the first token of each example has loss mask 1, which packing must
    drop (no example predicts another's first token). LoRA's packed batch comes as three
    micro-batches of one row: the accumulation carries the segments along."""
    cfg = tiny_cfg(num_layers=2)
    p0 = perturbed_params(cfg)
    exs = examples_of([6, 9, 4, 11, 5, 7], first_is_target=True)
    rows = [[0, 1, 2], [3, 4], [5]]
    S_ = 24
    packed = _packed(exs, rows, S_)
    if kind == "lora":
        packed = jax.tree.map(lambda x: x.reshape(len(rows), 1, S_), packed)
    step, p, state, read = _make_step(kind, cfg, p0)
    pa, sa, ma = step(p, state, packed)
    step, p, state, read = _make_step(kind, cfg, p0)
    pb, sb, mb = step(p, state, _one_by_one(exs, S_))
    assert float(ma["tokens"]) == float(mb["tokens"]) == \
        sum(int(e.loss_mask[1:].sum()) for e in exs)
    assert abs(float(ma["loss"]) - float(mb["loss"])) < 1e-5
    moved = 0.0
    for a, b, p_ in zip(jax.tree.leaves(read(pa, sa)), jax.tree.leaves(read(pb, sb)),
                        jax.tree.leaves(read(p, state))):
        assert rel_err(np.asarray(a) - np.asarray(p_), np.asarray(b) - np.asarray(p_)) < 1e-4
        moved += float(np.abs(np.asarray(b) - np.asarray(p_)).sum())
    assert moved > 0


# ----------------------------------------------------------------------------- the packer


def test_pack_rows_places_every_item_once_within_capacity():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 129, 500).tolist()
    rows = data.pack_rows(lengths, 128)
    assert sorted(i for row in rows for i in row) == list(range(500))
    assert all(sum(lengths[i] for i in row) <= 128 for row in rows)
    # Best fit keeps the rows nearly full on an instruction set's lengths.
    lengths = _lengths_like_instructions(1000)
    rows = data.pack_rows(lengths, 512)
    assert sum(lengths) / (512 * len(rows)) > 0.97
    with pytest.raises(data.DataError, match="200 tokens, more than --max-seq-len 128"):
        data.pack_rows([5, 3, 200], 128)


def test_pack_batch_numbers_segments_and_drops_each_first_target():
    exs = examples_of([3, 4], first_is_target=True)
    b = data.pack_batch(exs, [[0, 1]], batch_size=2, seq_len=8, pad_id=9)
    assert b["segment_ids"].tolist() == [[1, 1, 1, 2, 2, 2, 2, 0], [0] * 8]
    assert b["input_ids"][0, :7].tolist() == exs[0].input_ids.tolist() + \
        exs[1].input_ids.tolist()
    assert b["input_ids"][0, 7] == 9 and (b["input_ids"][1] == 9).all()
    # Each example's first token (mask 1 in the example) is no target in the row.
    assert b["loss_mask"][0].tolist() == [0, 1, 1, 0, 0, 1, 1, 0]
    assert (b["num_tokens"], b["num_examples"], b["num_target_tokens"]) == (7, 2, 4)


# ----------------------------------------------------------------------------- the stream


def _stream(loader, n):
    return [next(loader) for _ in range(n)]


def _same(a, b):
    for x, y in zip(a, b):
        for k in ("input_ids", "loss_mask", "segment_ids"):
            np.testing.assert_array_equal(x[k], y[k])
        assert (x["epoch"], x["step_in_epoch"]) == (y["epoch"], y["step_in_epoch"])


def _lengths_like_instructions(n, seed=0):
    """Many short examples and a long tail, as instruction sets have."""
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(4.3, 0.8, n).astype(int), 8, 256).tolist()


def test_packed_epoch_holds_every_example_once_in_full_rows():
    exs = examples_of(_lengths_like_instructions(300))
    loader = data.DataLoader(exs, batch_size=4, seed=1, max_seq_len=256, packing=True,
                             drop_last=False)
    seen = []
    for _ in range(len(loader)):
        b = next(loader)
        assert b["input_ids"].shape[0] == 4 and b["input_ids"].shape[1] <= 256
        seg = b["segment_ids"]
        for r in range(4):
            k = int(seg[r].max())
            assert (np.diff(seg[r][seg[r] > 0]) >= 0).all()  # contiguous, in order
            for s in range(1, k + 1):
                toks = b["input_ids"][r][seg[r] == s]
                seen.append(next(i for i, e in enumerate(exs) if len(e) == len(toks)
                                 and (e.input_ids == toks).all() and i not in seen))
        assert b["epoch"] == 0
    assert sorted(seen) == list(range(300))
    # Too few rows for a batch: the fix in flag words.
    with pytest.raises(data.DataError, match="pack into 1 rows .* lower --batch-size to 1"):
        data.DataLoader(examples_of([10] * 5), batch_size=4, max_seq_len=64, packing=True)
    unpacked = data.DataLoader(exs, batch_size=4, seed=1, max_seq_len=256, drop_last=False)
    # Packing needs far fewer rows than one example a row.
    assert len(loader) < 0.5 * len(unpacked)
    assert next(loader)["epoch"] == 1


@pytest.mark.parametrize("mixed", [False, True])
def test_packed_stream_resumes_exactly_across_epochs(mixed):
    exs = examples_of(_lengths_like_instructions(120, seed=2))
    kw = dict(batch_size=3, seed=5, max_seq_len=256, packing=True)
    if mixed:
        kw.update(sources=[i % 3 for i in range(120)], weights=[0.6, 0.3, 0.1])
    full = data.DataLoader(exs, **kw)
    n = 3 * len(full) + 2
    want = _stream(full, n)
    assert len({b["epoch"] for b in want}) >= 3
    for k in (1, len(full), 2 * len(full) + 1):
        a = data.DataLoader(exs, **kw)
        _stream(a, k)
        b = data.DataLoader(exs, **kw)
        b.load_state_dict(json.loads(json.dumps(a.state_dict())))
        _same(_stream(b, n - k), want[k:])
    # The epochs differ (a new shuffle and packing), another seed gives another stream.
    assert want[0]["input_ids"].tolist() != want[len(full)]["input_ids"].tolist()
    other = data.DataLoader(exs, **{**kw, "seed": 6})
    assert next(other)["input_ids"].tolist() != want[0]["input_ids"].tolist()
    unpacked = data.DataLoader(exs, **{**kw, "packing": False})
    with pytest.raises(data.DataError, match="--packing"):
        unpacked.load_state_dict(full.state_dict())


# ----------------------------------------------------------------------------- mixing


def test_mixture_draws_each_file_by_its_weight_deterministically():
    # 300 examples of file 0, 60 of file 1: weights 1:3 make file 1 repeat, file 0 a subset.
    exs = examples_of([8] * 360)
    sources = [0] * 300 + [1] * 60
    kw = dict(batch_size=6, seed=0, sources=sources, weights=[1.0, 3.0])
    loader = data.DataLoader(exs, **kw)
    pools = [loader.epoch_pool(e) for e in range(3)]
    for pool in pools:
        assert len(pool) == 360
        from_1 = int(np.sum(pool >= 300))
        assert from_1 == 270  # 3/4 of 360: file 1's 60 examples 4 times and 30 more
        counts = np.bincount(pool[pool >= 300] - 300, minlength=60)
        assert counts.min() >= 4 and counts.max() <= 5
        assert len(set(pool[pool < 300].tolist())) == 90  # file 0: 90 distinct a draw
    assert pools[0].tolist() != pools[1].tolist()  # a different subset each epoch
    assert data.DataLoader(exs, **kw).epoch_pool(1).tolist() == pools[1].tolist()
    with pytest.raises(data.DataError, match=r"^--data b\.jsonl \(weight 3\) has no training"):
        data.DataLoader(exs, **{**kw, "sources": [0] * 360},
                        source_names=["a.jsonl", "b.jsonl"])
    # The batches follow the draw.
    ids = np.concatenate([b for b in loader.epoch_plan(0)])
    assert sorted(ids.tolist()) == sorted(pools[0].tolist())


def test_data_spec_weights_and_paths(tmp_path):
    assert data.parse_data_spec("a.jsonl:0.7,b.parquet:0.3") == \
        (["a.jsonl", "b.parquet"], [0.7, 0.3])
    assert data.parse_data_spec("a.jsonl:2,b.jsonl:1e-1") == (["a.jsonl", "b.jsonl"], [2.0, 0.1])
    assert data.parse_data_spec("a.jsonl:0.5") == (["a.jsonl"], None)  # one file: no mixture
    odd = tmp_path / "run:2"  # an existing path that looks weighted is taken whole
    odd.write_text("")
    assert data.parse_data_spec(str(odd)) == ([str(odd)], None)
    assert data.parse_data_spec(f"{odd},b.jsonl") == ([str(odd), "b.jsonl"], None)
    with pytest.raises(data.DataError, match=r"not to b\.jsonl; give every file a weight"):
        data.parse_data_spec("a.jsonl:0.7,b.jsonl")
    with pytest.raises(data.DataError, match="weight of b.jsonl is 0; weights must be positive"):
        data.parse_data_spec("a.jsonl:1,b.jsonl:0")


# ----------------------------------------------------------------------------- the trainer


def test_packed_mixed_run_resumes_bit_identical(model_dir, data_file, tmp_path, small,
                                                final_params):
    """``--packing`` with ``--data a:0.7,b:0.3``: the checkpoint's data position continues the
    packed, mixed stream exactly (same batches, so bit-identical parameters)."""
    from lisa_jax.train import train
    lines = open(data_file).read().splitlines()
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("\n".join(lines[:120]) + "\n")
    b.write_text("\n".join(lines[120:]) + "\n")
    kw = dict(packing=True, data=f"{a}:0.7,{b}:0.3", steps=4, save_every=2, eval_fraction=0.0)
    straight = train(small(model_dir, data_file, tmp_path / "x", **kw))
    assert straight["status"] == "finished"
    # Packed rows hold several examples: more tokens a step than one example a row.
    rows = [json.loads(x) for x in open(tmp_path / "x" / "metrics.jsonl")]
    assert min(r["tokens"] for r in rows if "tokens" in r) > 4 * 128 * 0.6
    train(small(model_dir, data_file, tmp_path / "y", **kw), halt_at=2)
    train(small(model_dir, data_file, tmp_path / "y", resume=True, **kw))
    (sx, px, mx), (sy, py, my) = final_params(tmp_path / "x"), final_params(tmp_path / "y")
    assert sx == sy == 4 and mx["data"] == my["data"] and mx["data"]["packing"] == 1
    for u, v in zip(jax.tree.leaves(px), jax.tree.leaves(py)):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


def test_settings_spell_the_weights_and_their_mistakes_in_flag_words():
    from lisa_jax.config import TrainConfig, TrainError, data_paths, data_weights
    cfg = TrainConfig(data="a.jsonl:3,b.jsonl:1")
    assert data_paths(cfg) == ["a.jsonl", "b.jsonl"] and data_weights(cfg) == [3.0, 1.0]
    assert data_weights(TrainConfig(data="a.jsonl,b.jsonl")) is None
    with pytest.raises(TrainError, match="^--data gives weights to some files but not to b"):
        data_paths(TrainConfig(data="a.jsonl:3,b.jsonl"))
