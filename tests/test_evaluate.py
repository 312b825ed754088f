"""Evaluation by answers (--eval-data, --eval-scorer), --keep-best and --early-stop-patience."""
import json

import jax
import numpy as np
import pytest

from lisa_jax import data as data_lib
from lisa_jax import evaluate as ev
from lisa_jax.checkpoints import Checkpoints
from lisa_jax.config import TrainConfig, TrainError, check_config, with_default_remat
from lisa_jax.hf import load_hf
from lisa_jax.prompts import conversation_ids, prompt_ids, sample
from lisa_jax.train import train


def test_scorers_builtin_and_a_users_function(tmp_path, monkeypatch):
    assert ev.exact(" 42\n", "42") == 1.0 and ev.exact("42.", "42") == 0.0
    assert ev.contains("the answer is 42.", " 42 ") == 1.0 and ev.contains("4 2", "42") == 0.0
    assert ev.first_line("42\nbecause", "42") == 1.0 and ev.first_line("so\n42", "42") == 0.0
    (tmp_path / "my_scores.py").write_text(
        "def length_ratio(reply, reference):\n    return len(reply) / max(len(reference), 1)\n"
        "NOT_A_FUNCTION = 3\n"
        "def stopped(reply, reference):\n    return 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    got = ev.scorers("exact, my_scores:length_ratio")
    assert [s.metric for s in got] == ["eval_exact", "eval_length_ratio"]
    assert got[1].fn("abcd", "ab") == 2.0
    by_file = ev.scorers(f"{tmp_path / 'my_scores.py'}:length_ratio")  # a file, off the path
    assert by_file[0].metric == "eval_length_ratio" and by_file[0].fn("ab", "ab") == 1.0
    for spec, message in [("exactly", "unknown --eval-scorer 'exactly'; use exact, contains"),
                          ("no_such_mod:f", "module 'no_such_mod' cannot be imported"),
                          ("my_scores:nope", "module 'my_scores' has no 'nope'"),
                          ("nowhere/s.py:f", "file 'nowhere/s.py' not found"),
                          ("my_scores:NOT_A_FUNCTION", "is not a function"),
                          ("my_scores:stopped", "would be logged as eval_stopped"),
                          ("exact,exact", "names 'exact' twice")]:
        with pytest.raises(TrainError, match=message) as e:
            ev.scorers(spec)
        assert len(str(e.value).splitlines()) == 1


def test_settings_name_the_fix_in_flags(model_dir, data_file, tmp_path):
    base = with_default_remat(TrainConfig(model=model_dir, data=data_file))
    cases = [
        (dict(eval_data=str(tmp_path / "none.jsonl")), "eval data file .* not found; pass "
         "--eval-data FILE"),
        (dict(keep_best="eval_exact"), "eval_exact comes from answers to --eval-data; pass "
         "--eval-data FILE"),
        (dict(keep_best="eval_loss", eval_fraction=0.0), "raise --eval-fraction"),
        (dict(keep_best="eval_bleu", eval_data=data_file), "this run logs eval_loss, "
         "eval_exact, eval_stopped"),
        (dict(early_stop_patience=2), "--early-stop-patience needs --keep-best METRIC"),
        (dict(early_stop_patience=-1, keep_best="eval_loss"), "must be 0 \\(off\\) or more"),
        (dict(eval_max_new_tokens=0, eval_data=data_file), "--eval-max-new-tokens must be at "
         "least 1")]
    for kw, message in cases:
        with pytest.raises(TrainError, match=message) as e:
            check_config(TrainConfig(**{**base.__dict__, **kw}))
        assert len(str(e.value).splitlines()) == 1
    check_config(TrainConfig(**{**base.__dict__, "eval_data": data_file,
                                "keep_best": "eval_exact", "early_stop_patience": 3}))


def test_items_of_alpaca_and_chat_records_are_prompted_as_in_training(tiny_llama_dir):
    tok = data_lib.load_tokenizer(tiny_llama_dir)
    alpaca = ev.item_of(tok, {"instruction": "w5 w6", "input": "w7", "output": "w9 w10"})
    assert alpaca.reference == "w9 w10" and alpaca.shown == "w5 w6 | w7"
    np.testing.assert_array_equal(alpaca.prompt, prompt_ids(tok, {"instruction": "w5 w6",
                                                                  "input": "w7"}))
    msgs = [{"role": "system", "content": "w3"}, {"role": "user", "content": "w4"},
            {"role": "assistant", "content": "w5"}, {"role": "user", "content": "w6 w7"},
            {"role": "assistant", "content": "w8 w9"}]
    chat = ev.item_of(tok, {"messages": msgs})
    assert chat.reference == "w8 w9" and chat.shown == "w6 w7"
    np.testing.assert_array_equal(chat.prompt, conversation_ids(tok, msgs[:4]))
    sharegpt = ev.item_of(tok, {"conversations": [{"from": "human", "value": "w4"},
                                                  {"from": "gpt", "value": "w5"}]})
    assert sharegpt.reference == "w5"
    with pytest.raises(TrainError, match="record 1: the reference reply .* follow a user turn"):
        ev.item_of(tok, {"messages": [{"role": "assistant", "content": "w5"}]}, "record 1")


def test_batched_left_padded_replies_are_the_one_by_one_greedy_replies(tiny_llama_dir):
    """Two prompts of different lengths, the longer first, in a batch of three rows (the last
    a repeated row): each reply is the unbatched greedy one, in the order given, cut at the
    stop id, and ``stopped`` says whether a stop id came."""
    model = load_hf(tiny_llama_dir)
    tok = data_lib.load_tokenizer(tiny_llama_dir)
    records = [{"instruction": " ".join(f"w{3 + (7 * i + j) % 120}" for j in range(n))}
               for i, n in enumerate([14, 1])]
    prompts = [prompt_ids(tok, r) for r in records]
    assert len(prompts[0]) > len(prompts[1])
    got = ev.greedy_replies(model, tok, prompts, 10, batch_size=3, model_dir=tiny_llama_dir)
    want = [sample(model, tok, r, 10, tiny_llama_dir) for r in records]
    assert [reply for reply, _ in got] == want
    assert want[0] != want[1]  # so that the order given is checked
    # A reply cut by a stop id says so.
    stop_at_once = ev.greedy_replies(model, tok, prompts, 10, 3, stop_ids=tuple(range(128)))
    assert stop_at_once == [("", True), ("", True)]


def _answers(tmp_path, data_file, n):
    lines = open(data_file).read().splitlines()[-n:]
    path = tmp_path / "answers.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path), [json.loads(x) for x in lines]


def test_eval_data_is_scored_logged_and_the_last_replies_kept(model_dir, data_file, tmp_path,
                                                              small, monkeypatch):
    """Every --eval-every steps the answers are scored: the means are logged in metrics.jsonl
    beside the loss, eval_replies.jsonl holds the last evaluation's replies (at most
    --eval-max-examples), each scored, and they are the final model's greedy replies."""
    (tmp_path / "lens.py").write_text("def chars(reply, reference):\n    return len(reply)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    eval_path, records = _answers(tmp_path, data_file, 7)
    out = tmp_path / "run"
    train(small(model_dir, data_file, out, steps=4, eval_every=2, eval_data=eval_path,
                eval_scorer="exact,contains,lens:chars", eval_max_examples=5,
                eval_max_new_tokens=6, export=True, save_every=100))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r for r in rows if "eval_exact" in r}
    assert sorted(evals) == [2, 4]
    assert all({"eval_loss", "eval_contains", "eval_chars", "eval_stopped"} <= set(r)
               for r in evals.values())
    replies = [json.loads(x) for x in (out / "eval_replies.jsonl").read_text().splitlines()]
    assert len(replies) == 5 and {r["step"] for r in replies} == {4}
    assert [r["reference"] for r in replies] == [r["output"] for r in records[:5]]
    for r in replies:
        assert r["exact"] == ev.exact(r["reply"], r["reference"])
        assert r["contains"] == ev.contains(r["reply"], r["reference"])
        assert r["chars"] == len(r["reply"])
    assert evals[4]["eval_chars"] == pytest.approx(np.mean([r["chars"] for r in replies]))
    assert evals[4]["eval_stopped"] == pytest.approx(np.mean([r["stopped"] for r in replies]))
    final = load_hf(out / "hf")
    tok = data_lib.load_tokenizer(model_dir)
    items = ev.load_items([eval_path], tok, 5)
    again = ev.greedy_replies(final, tok, [it.prompt for it in items], 6, 4,
                              model_dir=model_dir)
    assert [r["reply"] for r in replies] == [reply for reply, _ in again]


def test_keep_best_exports_the_step_with_the_lowest_eval_loss(model_dir, data_file, tmp_path,
                                                              small, final_params):
    out = tmp_path / "run"
    summary = train(small(model_dir, data_file, out, steps=8, eval_every=2, save_every=2,
                          keep_checkpoints=4, keep_best="eval_loss", lr=2e-2,
                          schedule="constant"))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["eval_loss"] for r in rows if "eval_loss" in r}
    best_step = min(losses, key=losses.get)
    assert len(set(losses.values())) == 4
    info = json.loads((out / "best" / "best.json").read_text())
    assert info == {"metric": "eval_loss", "value": losses[best_step], "step": best_step}
    assert summary["best"]["step"] == best_step
    ckpt = Checkpoints(out / "checkpoints", 4).read(best_step, "params")["params"]
    exported = load_hf(out / "best" / "hf").params
    for a, b in zip(jax.tree.leaves(exported), jax.tree.leaves(ckpt)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_early_stopping_counts_evaluations_without_improvement_across_a_resume(
        model_dir, data_file, tmp_path, small, final_params):
    """An untrained model's exact match stays 0: the first evaluation is the best (best/
    holds step 1's weights), equal ones are no improvement, and patience 2 stops the run
    after step 3 of 8. Interrupted at step 2 and resumed, the run keeps its count from the
    checkpoint (a fresh count would stop at step 4) and its best; a further --resume stops
    at once."""
    eval_path, _ = _answers(tmp_path, data_file, 4)  # the shapes of the test above
    kw = dict(steps=8, eval_every=1, save_every=1, keep_checkpoints=4, eval_data=eval_path,
              eval_max_new_tokens=6, keep_best="eval_exact", early_stop_patience=2)
    out = tmp_path / "run"
    assert train(small(model_dir, data_file, out, **kw), halt_at=2)["steps"] == 2
    params_1 = Checkpoints(out / "checkpoints", 4).read(1, "params")["params"]
    resumed = train(small(model_dir, data_file, out, resume=True, **kw))
    assert resumed["status"] == "early_stopped" and resumed["steps"] == 3
    assert resumed["best"] == {"metric": "eval_exact", "value": 0.0, "step": 1,
                               "dir": str(out / "best")}
    step, _, meta = final_params(out)
    assert step == 3 and meta["best"] == {"metric": "eval_exact", "best": 0.0, "best_step": 1,
                                          "since": 2}
    for a, b in zip(jax.tree.leaves(load_hf(out / "best" / "hf").params),
                    jax.tree.leaves(params_1)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    again = train(small(model_dir, data_file, out, resume=True, **kw))
    assert again["status"] == "early_stopped" and again["steps"] == 3
