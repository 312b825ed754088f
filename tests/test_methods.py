"""The training methods: one interface picked by name, LISA on every layer equals full
fine-tuning, the per-layer layout, state templates for checkpoints, --lisa-probs files."""
import json

import jax
import numpy as np
import pytest

from lisa_jax import methods
from lisa_jax.checkpoints import Checkpoints
from lisa_jax.config import TrainConfig, TrainError, choices
from lisa_jax.hf import load_hf
from lisa_jax.importance import probs_from_norms, save_probs
from lisa_jax.train import train


def test_lisa_on_every_layer_equals_full_fine_tuning_with_decay_and_clipping(
        model_dir, data_file, tmp_path, small, final_params):
    """γ = L trains what full fine-tuning trains, with the same AdamW: weight decay spares the
    norm scales of both (a stacked norm ``[L, D]`` is no matrix), and both clip by the norm of
    every gradient."""
    kw = dict(steps=4, lr=1e-3, weight_decay=0.5, clip_norm=0.05, lisa_interval=100,
              remat="full", save_every=4)
    train(small(model_dir, data_file, tmp_path / "full", method="full", **kw))
    train(small(model_dir, data_file, tmp_path / "lisa", method="lisa", lisa_layers=4, **kw))
    _, pf, _ = final_params(tmp_path / "full")
    _, pl, _ = final_params(tmp_path / "lisa")
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(pf)[0], jax.tree.leaves(pl)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=0,
                                   err_msg=jax.tree_util.keystr(path))


@pytest.mark.slow  # test_step checks the per-layer step against the stacked one
def test_per_layer_layout_trains_as_the_stacked_one_and_shares_its_checkpoints(
        model_dir, data_file, tmp_path, small, final_params, logged_layers):
    """The per-layer layout (``--layer-layout per_layer``) is a layout, not another method: the
    same run in both layouts ends at the same weights (to float rounding: the programs
    differ), and a run interrupted in one layout resumes in the other."""
    train(small(model_dir, data_file, tmp_path / "s", layer_layout="stacked"))
    train(small(model_dir, data_file, tmp_path / "p", layer_layout="per_layer"))
    train(small(model_dir, data_file, tmp_path / "m", layer_layout="per_layer"), halt_at=5)
    resumed = train(small(model_dir, data_file, tmp_path / "m", layer_layout="stacked",
                          resume=True))
    assert resumed["status"] == "finished"
    _, ps, _ = final_params(tmp_path / "s")
    assert logged_layers(tmp_path / "s") == logged_layers(tmp_path / "p") == \
        logged_layers(tmp_path / "m")
    for run in ("p", "m"):
        _, p, _ = final_params(tmp_path / run)
        assert jax.tree.structure(p) == jax.tree.structure(ps)  # stacked on disk
        for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(ps)):
            a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
            assert np.max(np.abs(a - b)) <= 1e-4 * np.max(np.abs(b)), run


def test_every_method_of_the_settings_has_a_class_picked_by_name():
    assert tuple(methods.METHODS) == choices("method")
    for name, kind in methods.METHODS.items():
        assert kind.name == name
        assert isinstance(methods.method_for(TrainConfig(method=name), None), kind)


@pytest.mark.parametrize("method,kw", [
    ("lisa", {}), ("lisa", {"lisa_probs": "0.5,0.5,0.5,0.5"}), ("full", {}), ("lora", {}),
    ("lisa", {"dtype": "bfloat16"})])
def test_state_template_has_the_structure_of_a_trained_state_and_needs_no_schedule(
        model_dir, data_file, tmp_path, method, kw, small):
    """What ``lisa-jax export`` restores a checkpoint into: a template built without the run's
    schedule, yet of the structure of the state the run saved."""
    cfg = small(model_dir, data_file, tmp_path / "run", method=method, steps=2, save_every=2,
                **kw)
    train(cfg)
    model = load_hf(model_dir, dtype=cfg.dtype)
    template = methods.method_for(cfg, model.cfg).state_template(model.params)
    trained = methods.method_for(cfg, model.cfg, model.params, methods.make_schedule(cfg, 2))
    assert jax.tree.structure(template) == jax.tree.structure(trained.state)
    ckpts = Checkpoints(tmp_path / "run" / "checkpoints", 2)
    params, state, meta = ckpts.restore(2, model.params, template)
    assert meta["step"] == 2 and meta["method"] == method
    assert jax.tree.structure(state) == jax.tree.structure(trained.state)


def test_lora_exports_its_adapters_merged_and_the_others_the_parameters(model_dir):
    model = load_hf(model_dir)
    lora = methods.method_for(TrainConfig(method="lora", lora_rank=2), model.cfg, model.params,
                              methods.make_schedule(TrainConfig(), 1))
    adapters = jax.tree.map(lambda x: x + 0.1, lora.state[0])  # b starts at zero: no delta
    merged = lora.export_params(model.params, (adapters, lora.state[1]))
    changed = [not np.array_equal(a, b) for a, b in
               zip(jax.tree.leaves(merged["layers"]), jax.tree.leaves(model.params["layers"]))]
    assert any(changed) and not all(changed)  # the targets, not the norms
    full = methods.method_for(TrainConfig(method="full"), model.cfg)
    assert full.export_params(model.params, None) is model.params


def test_to_layout_converts_between_the_trained_and_the_stacked_layout(model_dir):
    params = load_hf(model_dir).params
    want = [np.asarray(x) for x in jax.tree.leaves(params)]
    cfg = TrainConfig(layer_layout="per_layer")
    per_layer = methods.to_layout(params, cfg, training=True)
    assert jax.tree.structure(per_layer) != jax.tree.structure(params)
    stacked = methods.to_layout(per_layer, cfg, training=False)
    for a, b in zip(jax.tree.leaves(stacked), want):
        np.testing.assert_array_equal(np.asarray(a), b)
    same = methods.to_layout(stacked, TrainConfig(layer_layout="stacked"), training=True)
    assert jax.tree.structure(same) == jax.tree.structure(stacked)


def test_lisa_probs_reads_a_file_written_by_save_probs_and_inline_numbers(tmp_path):
    p = probs_from_norms([1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 1.0, 1.0], expected=2)
    save_probs(tmp_path / "p.json", p, {"gamma": 2, "source": "test"})
    assert methods.lisa_probs(str(tmp_path / "p.json"), 4) == [float(x) for x in p]
    assert methods.lisa_probs("0.1, 0.2 0.3,0.4", 4) == [0.1, 0.2, 0.3, 0.4]
    (tmp_path / "list.json").write_text(json.dumps([0.5, 0.5]))
    assert methods.lisa_probs(str(tmp_path / "list.json"), 2) == [0.5, 0.5]
    with pytest.raises(TrainError, match="neither a file nor a list of numbers"):
        methods.lisa_probs("0.5,half", 2)
    with pytest.raises(TrainError, match="has 2 values but the model has 4 layers"):
        methods.lisa_probs("0.5,0.5", 4)


def test_trainable_counts_the_view_the_adapters_or_everything(model_dir):
    """The header's trainable count: LISA the view (every leaf outside the layers and γ of the
    layers), LoRA its adapters (and rank), full fine-tuning all."""
    from lisa_jax import lora as lora_lib
    model = load_hf(model_dir)
    p, L = model.params, model.cfg.num_layers
    size = lambda t: sum(x.size for x in jax.tree.leaves(t))  # noqa: E731
    total, layers = size(p), size(p["layers"])
    n, what = methods.method_for(TrainConfig(method="full"), model.cfg).trainable(p)
    assert (n, what) == (total, "all parameters")
    n, what = methods.method_for(TrainConfig(method="lisa", lisa_layers=2), model.cfg
                                 ).trainable(p)
    assert n == total - layers + 2 * layers // L
    assert what.startswith("embedding, final norm, head and 2 of 4 layers") or \
        "and 2 of 4 layers at a time" in what, what
    n, what = methods.method_for(TrainConfig(method="lisa", lisa_probs="0.5,0.5,0.5,0.5"),
                                 model.cfg).trainable(p)
    assert n == total - layers + 2 * layers // L and "on average 2 of 4 layers" in what
    n, what = methods.method_for(TrainConfig(method="lora", lora_rank=4), model.cfg
                                 ).trainable(p)
    adapters = lora_lib.init_lora(p["layers"], jax.random.key(0), 4)
    assert n == size(adapters) and "rank 4" in what
    assert methods.count_text(6_738_415_616) == "6.74B" and methods.count_text(999) == "999"


def test_lisa_always_lr_scale_scales_the_always_trained_leaves_step_and_no_other(
        tiny_cfg, perturbed_params, batch_for):
    """``--lisa-always-lr-scale s``: one step from the same start moves the embedding, final
    norm and head s times as far as at s = 1 (AdamW's step and its decay are proportional to
    the learning rate), and the sampled layers exactly as far."""
    from lisa_jax import step as step_lib
    cfg = tiny_cfg()
    params, batch = perturbed_params(cfg), batch_for(cfg)

    def moved(scale):
        run = TrainConfig(method="lisa", lisa_layers=2, lr=1e-2, weight_decay=0.1,
                          lisa_always_lr_scale=scale, clip_norm=0.0)
        method = methods.method_for(run, cfg)
        tx = method.optimizer(methods.make_schedule(run, 10))
        step = step_lib.make_lisa_step(cfg, tx, donate=False)
        state = tx.init(params)
        new, state, _ = step(params, state, batch)
        return jax.tree.map(lambda a, b: np.asarray(b, np.float64) - np.asarray(a), params,
                            new), np.asarray(state.active)

    d1, active1 = moved(1.0)
    dq, activeq = moved(0.25)
    np.testing.assert_array_equal(active1, activeq)
    for name in ("embed", "final_norm"):
        assert np.abs(d1[name]).max() > 0
        ulp = float(np.spacing(np.abs(np.asarray(params[name], np.float32)).max()))
        # both sides of each difference rounded to float32: a few ulps of the weights
        np.testing.assert_allclose(dq[name], 0.25 * d1[name], rtol=1e-4, atol=4 * ulp)
    for a, b in zip(jax.tree.leaves(d1["layers"]), jax.tree.leaves(dq["layers"])):
        np.testing.assert_array_equal(a, b)
        assert np.abs(a[active1]).max() > 0 and not np.any(np.delete(a, active1, axis=0))


@pytest.mark.parametrize("value", [0.0, -1.0, float("nan")])
def test_lisa_always_lr_scale_must_be_positive(value):
    from lisa_jax.config import check_config
    with pytest.raises(TrainError, match="--lisa-always-lr-scale must be a positive number"):
        check_config(TrainConfig(method="lisa", lr=1e-4, lisa_always_lr_scale=value),
                     paths=False)
