"""Module-level sampling (``lisa(granularity=...)``): each module group samples its own layers;
the fast step against plain autodiff fed to the same transform, its frozen modules, the state's
size, one compile across resamples, resume, and the errors."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.interpreters import partial_eval as pe

import lisa_jax
from lisa_jax import block
from lisa_jax import layout as layout_lib
from lisa_jax import ops, sampling
from lisa_jax import step as S
from lisa_jax.config import TrainConfig, TrainError, check_config

L = 3  # the tiny config's, with fewer layers (half the compile)


def _tx(granularity="matrix", n_active=1, interval=2, **kw):
    # A larger eps keeps Adam's g / sqrt(v) from amplifying rounding in near-zero gradients.
    return lisa_jax.lisa(optax.adamw(1e-2, eps=1e-3, weight_decay=0.1), n_active=n_active,
                         interval=interval, key=5, granularity=granularity, **kw)


@pytest.fixture(scope="module")
def model(tiny_cfg, perturbed_params):
    cfg = tiny_cfg(attention_bias=True, num_layers=L)  # biases ride with their matrices
    return cfg, jax.jit(lambda: perturbed_params(cfg))()  # one compile, not op by op


def _group_of(tx, name):
    return next(n for n, (_, names) in enumerate(tx.config.groups) if name in names)


@pytest.mark.parametrize("granularity,layout,inner", [
    ("matrix", "stacked", "adamw"), ("matrix", "per_layer", "sgd")])
def test_fast_step_equals_plain_autodiff_and_only_sampled_modules_move(
        granularity, layout, inner, model, batch_for, rel_err):
    """Over a resample the fast step's updates match plain autodiff's full gradient fed to the
    same transform (masked AdamW, or SGD: the gradient itself); an unsampled module of a layer
    stays bit-identical."""
    cfg, p0 = model
    tx = _tx(granularity) if inner == "adamw" else lisa_jax.lisa(
        optax.sgd(0.5), n_active=1, interval=2, key=5, granularity=granularity)
    fast = S.make_lisa_step(cfg, tx, donate=False)
    plain = S.make_plain_step(cfg, tx, donate=False)
    pa, sa = layout_lib.convert(p0, layout), tx.init(p0)
    pb, sb = p0, tx.init(p0)
    seen = set()
    for i in range(3):  # resample at step 2
        before, before_b = layout_lib.convert(pa, "stacked"), pb
        batch = batch_for(cfg, seed=i)
        pa, sa, ma = fast(pa, sa, batch)
        pb, sb, mb = plain(pb, sb, batch)
        active = np.asarray(lisa_jax.active_layers(sa))
        assert active.shape == (len(tx.config.groups), 1)
        seen.add(active.tobytes())
        np.testing.assert_array_equal(active, np.asarray(lisa_jax.active_layers(sb)))
        assert abs(float(ma["loss"]) - float(mb["loss"])) < 1e-5
        assert ma["layer_grad_norms"].shape == active.shape
        after = layout_lib.convert(pa, "stacked")
        for a, a0, b, b0 in zip(*map(jax.tree.leaves, (after, before, pb, before_b))):
            assert rel_err(a, b) < 1e-5
            assert rel_err(a - a0, b - b0) < 1e-4
        for name, w in after["layers"].items():
            rows = set(active[_group_of(tx, name)].tolist())
            for layer in range(L):
                same = np.array_equal(np.asarray(w[layer]),
                                      np.asarray(before["layers"][name][layer]))
                assert same == (layer not in rows), (name, layer)
    assert len(seen) > 1, "the test should cross a resample with a different sample"


def test_a_modules_weight_gradient_is_its_own_gemm_alone(model, batch_for):
    """``weight_grads_from_parts(names=...)``, what the grouped backward runs under a sampled
    group's ``lax.cond``: one weight GEMM per matrix named, none for the others."""
    cfg, p = model
    lp = jax.tree.map(lambda x: x[0], p["layers"])
    h = jax.random.normal(jax.random.key(0), (2, 8, cfg.hidden_size))
    rope = ops.rope_tables(cfg, jnp.arange(8)[None].repeat(2, 0))

    @jax.jit
    def layer_parts(lp, h, rope):
        out, saved = block.layer_forward(cfg, lp, h, rope, "none")
        return block.layer_backward(cfg, lp, saved, rope, jnp.ones_like(out), "none")[1]
    parts = layer_parts(lp, h, rope)

    def dots(names):  # the dot products that the gradients need (what XLA keeps)
        closed = jax.make_jaxpr(
            lambda: block.weight_grads_from_parts(cfg, lp, parts, rope, names=names))()
        jaxpr, _ = pe.dce_jaxpr(closed.jaxpr, [True] * len(closed.jaxpr.outvars))
        return sum(eqn.primitive.name == "dot_general" for eqn in jaxpr.eqns)
    assert dots(None) == 7
    for _, names in block.MODULE_GROUPS["matrix"]:
        assert dots(tuple(n for n in names if n in lp)) == 1, names
    assert dots(("attn_norm",)) == 0  # a norm's gradient is elementwise


def test_state_holds_gamma_slices_of_each_group(model):
    """The slots' state is one per group, ``γ`` slices of its leaves: it grows with γ, and no
    moment has the layer axis ``L``."""
    cfg, p = model
    layer_size = sum(x.size for x in jax.tree.leaves(p["layers"])) // L

    def slot_size(n_active):
        state = _tx("matrix", n_active=n_active).init(p)
        assert len(state.slot_state) == len(block.MODULE_GROUPS["matrix"])
        for s in state.slot_state:
            mu = s[0].mu["layers"]
            assert all(x.shape[0] == n_active for x in jax.tree.leaves(mu))
        return sum(x.size for x in jax.tree.leaves(state.slot_state) if x.ndim > 1)

    # mu and nu: two moments of γ slices of every layer leaf (each in one group)
    assert slot_size(1) == 2 * layer_size
    assert slot_size(2) == 2 * slot_size(1)


@pytest.mark.parametrize("layout", ["stacked", "per_layer"])
def test_one_compile_across_resamples(layout, model, batch_for):
    cfg, p0 = model
    tx = _tx("attn_mlp", interval=1)
    step = S.make_lisa_step(cfg, tx)
    p, s = layout_lib.convert(jax.tree.map(jnp.copy, p0), layout), tx.init(p0)
    samples = set()
    for i in range(3):
        p, s, _ = step(p, s, batch_for(cfg, seed=i))
        samples.add(np.asarray(lisa_jax.active_layers(s)).tobytes())
    assert len(samples) > 1
    assert step._cache_size() == 1


def test_resume_from_a_state_round_trip_continues_exactly(model, batch_for, tmp_path):
    """The sampler's key, period and per-group indices live in the state: a state saved and
    restored (its arrays through numpy) continues the run bit for bit."""
    cfg, p0 = model
    tx = _tx("matrix", interval=2)
    step = S.make_lisa_step(cfg, tx, donate=False)
    p, s = p0, tx.init(p0)
    for i in range(3):
        p, s, _ = step(p, s, batch_for(cfg, seed=i))
    leaves, treedef = jax.tree.flatten((p, s))
    np.savez(tmp_path / "ckpt.npz", *[np.asarray(x) for x in leaves])
    with np.load(tmp_path / "ckpt.npz") as f:
        restored = jax.tree.unflatten(treedef, [jnp.asarray(f[f"arr_{i}"])
                                                for i in range(len(leaves))])
    run_a, run_b = (p, s), restored
    for i in range(3, 5):  # crosses the resample at step 4
        run_a = step(*run_a, batch_for(cfg, seed=i))[:2]
        run_b = step(*run_b, batch_for(cfg, seed=i))[:2]
    for a, b in zip(jax.tree.leaves(run_a), jax.tree.leaves(run_b)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_groups_of_ones_own_on_a_generic_tree():
    params = {"embed": jnp.ones((4, 2)), "layers": {"a": jnp.ones((5, 2, 2)),
                                                    "b": jnp.ones((5, 3))}}
    tx = lisa_jax.lisa(optax.sgd(1.0), n_active=2, interval=2, key=0,
                       groups={"first": ("a",), "second": ("b",)})
    state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, state = jax.jit(tx.update)(grads, state, params)
    for n, name in enumerate("ab"):
        moved = np.flatnonzero(np.asarray(updates["layers"][name]).reshape(5, -1).any(axis=1))
        assert moved.tolist() == np.asarray(state.active[n]).tolist()


@pytest.mark.parametrize("reset", ["sampled", "all"])
def test_one_group_of_every_leaf_is_layer_level_lisa(reset):
    """The grouped code with a single group holding every layer leaf samples and updates as
    whole-layer LISA does, bit for bit, across resamples."""
    params = {"embed": jnp.linspace(-1, 1, 8).reshape(4, 2),
              "layers": {"a": jnp.linspace(0, 2, 20).reshape(5, 2, 2),
                         "b": jnp.linspace(1, -1, 15).reshape(5, 3)}}
    kw = dict(n_active=2, interval=2, key=3, reset=reset)
    layer = lisa_jax.lisa(optax.adamw(1e-2), **kw)
    grouped = lisa_jax.lisa(optax.adamw(1e-2), groups={"all": ("a", "b")}, **kw)
    sa, sb = layer.init(params), grouped.init(params)
    for i in range(5):
        grads = jax.tree.map(lambda x: jnp.cos(x * (i + 1)), params)
        ua, sa = jax.jit(layer.update)(grads, sa, params)
        ub, sb = jax.jit(grouped.update)(grads, sb, params)
        np.testing.assert_array_equal(sa.active, sb.active[0])
        for a, b in zip(jax.tree.leaves(ua), jax.tree.leaves(ub)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        params = optax.apply_updates(params, ua)


@pytest.mark.parametrize("kw,match", [
    (dict(granularity="module"), "unknown granularity='module'; use one of layer, attn_mlp, "
                                 "matrix"),
    (dict(granularity="matrix", groups={"a": ("wq",)}), "either granularity='matrix' or groups"),
    (dict(groups={"a": ("wq",), "b": ("wq",)}), "leaf 'wq' is in module groups 'a' and 'b'"),
    (dict(groups={"a": ()}), "groups must be a non-empty dict"),
    (dict(granularity="matrix", sampler=sampling.Ordered(2)), "sampler=Ordered works at "
                                                              "granularity='layer' only"),
    (dict(granularity="attn_mlp", probs=[0.5] * L), "probs= works at granularity='layer'"),
])
def test_bad_options_are_one_line_errors(kw, match):
    with pytest.raises(ValueError, match=match) as e:
        lisa_jax.lisa(optax.sgd(1.0), **kw)
    assert len(str(e.value).splitlines()) == 1


def test_a_layer_leaf_in_no_group_is_a_one_line_error():
    tx = lisa_jax.lisa(optax.sgd(1.0), n_active=1, granularity="matrix")
    with pytest.raises(ValueError, match=r"layer leaf \['layers'\]\['w'\] is in no module "
                                         r"group of granularity='matrix'") as e:
        tx.init({"layers": {"w": jnp.ones((3, 2))}})
    assert len(str(e.value).splitlines()) == 1
    tx = lisa_jax.lisa(optax.sgd(1.0), n_active=1, groups={"a": ("w",), "b": ("nope",)})
    with pytest.raises(ValueError, match="module group 'b' of groups=.* holds no layer leaf"):
        tx.init({"layers": {"w": jnp.ones((3, 2))}})


def test_trainer_flag_checks(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    (tmp_path / "d.jsonl").write_text("")
    good = TrainConfig(model=str(tmp_path / "m"), data=str(tmp_path / "d.jsonl"), remat="none",
                       lisa_granularity="matrix")
    check_config(good)
    for bad, fix in [(dict(lisa_sampler="owl"), "drop --lisa-sampler owl"),
                     (dict(lisa_probs="0.5,0.5"), "drop --lisa-probs"),
                     (dict(lisa_importance="online"), "drop --lisa-importance online")]:
        with pytest.raises(TrainError, match=f"--lisa-granularity matrix .*{fix}") as e:
            check_config(dataclasses.replace(good, **bad))
        assert len(str(e.value).splitlines()) == 1
