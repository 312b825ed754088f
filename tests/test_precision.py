"""lisa_jax.precision: float32-precision updates of bfloat16 parameters, alone and under LISA."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra.numpy import arrays

import lisa_jax
from lisa_jax import layout as layout_lib
from lisa_jax import lora as lora_lib
from lisa_jax import model as M
from lisa_jax import step as S
from lisa_jax import precision
from lisa_jax.precision import (join_master, master_weights, split_master, stochastic_bf16_nu,
                                stochastic_round_bf16)


def _bits(x):
    return np.asarray(jax.lax.bitcast_convert_type(jnp.asarray(x, jnp.float32), jnp.uint32))


finite_f32 = st.floats(width=32, allow_nan=False, allow_infinity=False)


@settings(deadline=None, max_examples=200)
@given(arrays(np.float32, 64, elements=finite_f32))
def test_split_then_join_is_exact_and_the_high_half_is_the_nearest_bfloat16(values):
    x = jnp.asarray(values)
    hi, rem = split_master(x)
    assert (_bits(join_master(hi, rem)) == _bits(x)).all()
    # Round to nearest: no bfloat16 is closer than the high half (ties may go either way).
    nearest = np.asarray(x.astype(jnp.bfloat16).astype(jnp.float32), np.float64)
    err = np.abs(np.asarray(hi.astype(jnp.float32), np.float64) - np.asarray(x, np.float64))
    finite = np.isfinite(np.asarray(hi, np.float32))
    assert (err[finite] <= np.abs(nearest - np.asarray(x, np.float64))[finite]).all()


def test_float32_parameters_pass_through_unchanged():
    params = {"w": jnp.linspace(-1, 1, 6, dtype=jnp.float32).reshape(2, 3)}
    grads = {"w": jnp.full((2, 3), 0.3, jnp.float32)}
    inner = optax.adamw(1e-2, weight_decay=0.1)
    wrapped = master_weights(inner)
    s_in, s_wr = inner.init(params), wrapped.init(params)
    assert isinstance(s_wr.remainder["w"], optax.MaskedNode)
    for _ in range(3):
        u_in, s_in = inner.update(grads, s_in, params)
        u_wr, s_wr = wrapped.update(grads, s_wr, params)
        assert (np.asarray(u_in["w"]) == np.asarray(u_wr["w"])).all()
        params = optax.apply_updates(params, u_in)


def test_bfloat16_masters_follow_a_float32_run_step_for_step():
    """The same AdamW from the same start: the float32 master of the bfloat16 run stays within
    float32 rounding of the float32 run, while plain bfloat16 updates leave weights in place."""
    rng = np.random.default_rng(0)
    w0 = rng.normal(0, 0.5, (64,)).astype(np.float32)
    w0 = np.asarray(jnp.asarray(w0).astype(jnp.bfloat16).astype(jnp.float32))  # bf16-exact
    grads = [rng.normal(0, 1, (64,)).astype(np.float32) for _ in range(50)]
    inner = optax.adamw(1e-5, weight_decay=0.01)
    p32, s32 = {"w": jnp.asarray(w0)}, inner.init({"w": jnp.asarray(w0)})
    pbf = {"w": jnp.asarray(w0).astype(jnp.bfloat16)}
    tx = master_weights(inner)
    sbf = tx.init(pbf)
    plain_tx, pplain = inner, dict(pbf)
    splain = plain_tx.init(pplain)
    update = jax.jit(tx.update)
    for g in grads:
        u, s32 = inner.update({"w": jnp.asarray(g)}, s32, p32)
        p32 = optax.apply_updates(p32, u)
        u, sbf = update({"w": jnp.asarray(g).astype(jnp.bfloat16)}, sbf, pbf)
        pbf = optax.apply_updates(pbf, u)
        u, splain = plain_tx.update({"w": jnp.asarray(g).astype(jnp.bfloat16)}, splain, pplain)
        pplain = optax.apply_updates(pplain, u)
    assert pbf["w"].dtype == jnp.bfloat16
    master = np.asarray(join_master(pbf["w"], sbf.remainder["w"]))
    moved = np.asarray(p32["w"]) - w0
    assert np.abs(moved).min() > 0
    # bfloat16 gradients differ from float32 ones by their rounding only: Adam's steps agree
    # to a fraction of a percent of the distance travelled.
    assert np.linalg.norm(master - np.asarray(p32["w"])) < 0.01 * np.linalg.norm(moved)
    # The parameter is its master rounded to nearest.
    assert (np.asarray(pbf["w"]) == np.asarray(jnp.asarray(master).astype(jnp.bfloat16))).all()
    # Plain bfloat16: no weight with |w| >= 2**-8 moved in 50 steps of 1e-5.
    big = np.abs(w0) >= 2.0 ** -8
    assert (np.asarray(pplain["w"], np.float32)[big] == w0[big]).all()


def test_update_without_params_is_a_clear_error():
    tx = master_weights(optax.sgd(0.1))
    params = {"w": jnp.ones(2, jnp.bfloat16)}
    with pytest.raises(ValueError, match="needs params"):
        tx.update(params, tx.init(params))


def test_float16_parameters_are_refused():
    with pytest.raises(ValueError, match="bfloat16 or float32"):
        master_weights(optax.sgd(0.1)).init({"w": jnp.ones(2, jnp.float16)})


# ----------------------------------------------------------------------------- under LISA

def _toy(L=6, D=4):
    key = jax.random.key(0)
    k1, k2 = jax.random.split(key)
    return {"embed": jax.random.normal(k1, (5, D)).astype(jnp.bfloat16),
            "layers": {"w": jax.random.normal(k2, (L, D, D)).astype(jnp.bfloat16),
                       "norm": jnp.ones((L, D), jnp.bfloat16)}}


@pytest.mark.parametrize("reset", ["sampled", "all"])
def test_resampling_moves_a_kept_layers_remainder_and_starts_new_layers_at_zero(reset):
    """Remainders are weights, not moments: at a period boundary a layer that stays sampled
    takes its remainder to its new slot (under either reset mode), a newly drawn layer starts
    at zero (its bfloat16 value, exactly), and the always-trained leaves keep theirs."""
    params = _toy()
    tx = lisa_jax.lisa(master_weights(optax.sgd(1e-4)), n_active=3, interval=2, key=1,
                       reset=reset)
    state = tx.init(params)
    update = jax.jit(tx.update)
    grads = jax.tree.map(lambda x: jnp.full(x.shape, 0.37, x.dtype), params)
    kept_seen = new_seen = 0
    for _ in range(8):  # periods
        for _ in range(2):
            u, state = update(grads, state, params)
            params = optax.apply_updates(params, u)
        prepared = tx.prepare(state, params)
        old, new = state.active.tolist(), prepared.active.tolist()
        for name in ("w", "norm"):
            r_old = np.asarray(state.slot_state.remainder["layers"][name])
            r_new = np.asarray(prepared.slot_state.remainder["layers"][name])
            assert np.abs(r_old).max() > 0
            for slot, layer in enumerate(new):
                if layer in old:
                    kept_seen += 1
                    assert (r_new[slot] == r_old[old.index(layer)]).all()
                else:
                    new_seen += 1
                    assert (r_new[slot] == 0).all()
        assert (np.asarray(prepared.rest_state.remainder["embed"]) ==
                np.asarray(state.rest_state.remainder["embed"])).all()
        state = prepared
    assert kept_seen and new_seen


def test_lisa_with_master_weights_moves_what_plain_bfloat16_cannot():
    """At lr 1e-5 the sampled layers' weights and the always-trained leaves reach their
    float32 trajectory; frozen layers stay bit-identical."""
    params0 = _toy()
    grads = jax.tree.map(lambda x: jnp.full(x.shape, 1.0, x.dtype), params0)
    results = {}
    for name, inner in [("mixed", master_weights(optax.adam(1e-5))), ("plain", optax.adam(1e-5))]:
        tx = lisa_jax.lisa(inner, n_active=2, interval=1000, key=3)
        p, s = params0, tx.init(params0)
        update = jax.jit(tx.update)
        for _ in range(400):
            u, s = update(grads, s, p)
            p = optax.apply_updates(p, u)
        results[name] = (p, s)
    p, s = results["mixed"]
    active = np.asarray(s.active)
    frozen = np.setdiff1d(np.arange(6), active)
    w0 = np.asarray(params0["layers"]["w"], np.float32)
    w = np.asarray(p["layers"]["w"], np.float32)
    assert (w[frozen] == w0[frozen]).all()
    masters = join_master(p["layers"]["w"][active], s.slot_state.remainder["layers"]["w"])
    np.testing.assert_allclose(np.asarray(masters), w0[active] - 400e-5, atol=2e-5, rtol=0)
    norm_master = join_master(p["layers"]["norm"][active], s.slot_state.remainder["layers"]["norm"])
    np.testing.assert_allclose(np.asarray(norm_master), 1 - 400e-5, atol=2e-5)
    assert (np.asarray(p["layers"]["norm"][active], np.float32) < 1).all()  # crossed a spacing
    plain, _ = results["plain"]
    assert (np.asarray(plain["layers"]["norm"], np.float32) == 1).all()


# ----------------------------------------------------------------------------- on the model

L = 4


def _cfg(dtype):
    return M.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=L,
                         num_heads=4, num_kv_heads=2, head_dim=8, dtype=dtype)


def _batches(n=4, B=4, S_=24):
    keys = jax.random.split(jax.random.key(7), n)
    return [{"input_ids": jax.random.randint(k, (B, S_), 0, 64)} for k in keys]


def _start():
    """float32 weights that bfloat16 holds exactly; norm scales away from 1 (a power of two
    would sit at a spacing edge)."""
    p = M.init_params(_cfg("float32"), jax.random.key(0))
    p = jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), p)
    p["layers"]["attn_norm"] = p["layers"]["attn_norm"] * 0.75
    p["layers"]["mlp_norm"] = p["layers"]["mlp_norm"] * 1.25
    return p


def _masters(params, state):
    """The float32 masters of the leaves a run trained, from its bfloat16 parameters and its
    state: a MasterWeightsState, or a LisaState of one (the always-trained leaves and the
    slots, which a LISA transform's ``view`` gathers)."""
    if isinstance(state, lisa_jax.LisaState):
        remainder = {**state.rest_state.remainder,
                     "layers": state.slot_state.remainder["layers"]}
        view = lisa_jax.lisa(optax.identity()).view(params, state)
        return jax.tree.map(join_master, view, remainder)
    return jax.tree.map(join_master, params, state.remainder)


@functools.lru_cache(maxsize=None)  # the float32 reference serves both LISA layouts
def _run(method, dtype, update_dtype, steps, lr=1e-5, layout="stacked", nu="float32"):
    """(trained leaves at the end as float32 numpy, their masters or None, start values);
    ``nu="bfloat16"``: Adam's second moment stochastically rounded to bfloat16."""
    cfg = _cfg(dtype)
    start = _start()
    params = jax.tree.map(lambda x: x.astype(dtype), start)
    # As the trainer: bfloat16 runs keep Adam's first moment in bfloat16.
    inner = optax.adamw(lr, weight_decay=0.0,
                        mu_dtype=jnp.bfloat16 if dtype == "bfloat16" else None)
    if nu == "bfloat16":
        inner = stochastic_bf16_nu(inner)
    if update_dtype == "float32" and dtype == "bfloat16":
        inner = master_weights(inner)
    batches = _batches()
    if method == "lisa":
        tx = lisa_jax.lisa(inner, n_active=2, interval=steps, key=0)
        step = S.make_lisa_step(cfg, tx, donate=False)
        state = tx.init(params)
        p = layout_lib.convert(params, layout)
    elif method == "full":
        step = S.make_plain_step(cfg, inner, donate=False)
        state, p = inner.init(params), params
    else:
        lora = lora_lib.init_lora(start["layers"], jax.random.key(1), 4)
        for i, name in enumerate(lora):  # b non-zero, so that its bfloat16 spacing matters
            lora[name]["b"] = 0.05 * jax.random.normal(jax.random.key(2 + i),
                                                       lora[name]["b"].shape)
        start = jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), lora)
        step = S.make_lora_step(cfg, inner, lora_lib.lora_scale(4, None), donate=False)
        adapters = jax.tree.map(lambda x: x.astype(dtype), start)
        state, p = (adapters, inner.init(adapters)), params
    for i in range(steps):
        p, state, _ = step(p, state, batches[i % len(batches)])
    if method == "lora":
        trained, opt_state = state
        mixed = update_dtype == "float32" and dtype == "bfloat16"
        return trained, _masters(trained, opt_state) if mixed else None, start, None
    p = layout_lib.convert(p, "stacked")
    masters = _masters(p, state) if update_dtype == "float32" and dtype == "bfloat16" else None
    active = np.asarray(lisa_jax.active_layers(state)) if method == "lisa" else None
    return p, masters, start, active


def _ratio(w, w32, w0):
    return float(np.linalg.norm(w - w32) / np.linalg.norm(w32 - w0))


def _trained(tree, active):
    """The leaves a run trains, as float32 numpy (LISA: the sampled layers' slices)."""
    tree = jax.tree.map(lambda x: np.asarray(x, np.float32), tree)
    if active is None:
        return tree
    return {**tree, "layers": jax.tree.map(lambda x: x[active], tree["layers"])}


@pytest.mark.parametrize("method,layout", [
    # the layouts train alike (test_step); the per-layer one compiles in half the time
    pytest.param("lisa", "stacked", marks=pytest.mark.slow), ("lisa", "per_layer"),
    pytest.param("full", "stacked", marks=pytest.mark.slow),
    pytest.param("lora", "stacked", marks=pytest.mark.slow)])
def test_bfloat16_run_tracks_the_float32_run(method, layout):
    """150 steps at lr 1e-5 from the same weights: for every trained matrix the bfloat16 run's
    weights end close to the float32 run's, relative to how far the float32 run moved them
    (a run whose updates are lost scores about 1), and every trained norm scale's master
    moves with the float32 run. Plain bfloat16 updates score about 1."""
    steps = 150
    w32, _, start, active = _run(method, "float32", "float32", steps)
    wbf, mbf, _, active_bf = _run(method, "bfloat16", "float32", steps, layout=layout)
    wplain, _, _, _ = _run(method, "bfloat16", "bfloat16", steps, layout=layout)
    if active is not None:
        assert active.tolist() == active_bf.tolist()
    t32, tbf, tplain, t0 = (_trained(t, active) for t in (w32, wbf, wplain, start))
    tm = jax.tree.map(lambda x: np.asarray(x, np.float32), mbf)
    flat = jax.tree_util.tree_flatten_with_path(t32)[0]
    lost = []
    for (path, a32), abf, aplain, a0, am in zip(
            flat, jax.tree.leaves(tbf), jax.tree.leaves(tplain), jax.tree.leaves(t0),
            jax.tree.leaves(tm)):
        name = jax.tree_util.keystr(path)
        if np.linalg.norm(a32 - a0) == 0:
            continue  # e.g. embedding rows of tokens the batches never hold
        if a32.ndim - (1 if "layers" in name else 0) >= 2:  # a matrix
            assert _ratio(abf, a32, a0) < 0.3, name
            lost.append(_ratio(aplain, a32, a0))
        else:  # a norm scale: its master moves with the float32 run, every entry
            assert (am != a0).all(), name
            assert _ratio(am, a32, a0) < 0.3, name
    assert max(lost) > 0.9  # plain bfloat16 loses the updates of some matrix




def test_bfloat16_nu_run_tracks_the_float32_run():
    """LISA with float32-precision updates and Adam's second moment in stochastically rounded
    bfloat16, 150 steps at lr 1e-5: every trained matrix ends as close to the float32 run's as
    the run with a float32 second moment does (bound 0.3 of how far the float32 run moved it),
    and the moments it keeps are bfloat16."""
    steps = 150
    w32, _, start, active = _run("lisa", "float32", "float32", steps)
    wbf, _, _, active_bf = _run("lisa", "bfloat16", "float32", steps, layout="per_layer",
                                nu="bfloat16")
    assert active.tolist() == active_bf.tolist()
    t32, tbf, t0 = (_trained(t, active) for t in (w32, wbf, start))
    for (path, a32), abf, a0 in zip(jax.tree_util.tree_flatten_with_path(t32)[0],
                                    jax.tree.leaves(tbf), jax.tree.leaves(t0)):
        name = jax.tree_util.keystr(path)
        if np.linalg.norm(a32 - a0) > 0 and a32.ndim - ("layers" in name) >= 2:
            assert _ratio(abf, a32, a0) < 0.3, name


@settings(deadline=None, max_examples=30, derandomize=True)
@given(arrays(np.float32, 8, elements=st.floats(-2.0**100, 2.0**100, width=32)))
def test_stochastic_rounding_picks_a_neighbour_and_is_unbiased(x):
    """Each draw is one of the two bfloat16 numbers around x (x itself where it is one), and
    the mean of 4096 draws is x within 5 standard errors of a spacing."""
    draws = 4096
    keys = jax.random.split(jax.random.key(0), draws)
    y = np.asarray(jax.vmap(lambda k: stochastic_round_bf16(jnp.asarray(x), k))(keys)
                   .astype(jnp.float32))
    down = np.asarray(jax.lax.bitcast_convert_type(
        (_bits(x) >> 16).astype(np.uint16), jnp.bfloat16).astype(jnp.float32))
    bits_up = (_bits(x) >> 16) + ((_bits(x) & 0xFFFF) != 0)
    up = np.asarray(jax.lax.bitcast_convert_type(bits_up.astype(np.uint16), jnp.bfloat16)
                    .astype(jnp.float32))
    assert ((y == down) | (y == up)).all()
    spacing = np.abs(up.astype(np.float64) - down)
    err = np.abs(y.astype(np.float64).mean(0) - x)
    assert (err <= 5 * 0.5 * spacing / np.sqrt(draws) + 1e-45).all()


def _final_nu(tx, steps=1000):
    """Adam's second moment after ``steps`` steps whose gradient falls from 1 to 0.5."""
    g_T = jnp.where(jnp.arange(steps) < 10, 1.0, 0.5)
    step = lambda s, g: (tx.update({"w": jnp.full(512, g)}, s)[1], None)  # noqa: E731
    state = jax.lax.scan(step, tx.init({"w": jnp.zeros(512)}), g_T)[0]
    return np.asarray(state[0].nu["w"].astype(jnp.float32))


def test_bfloat16_nu_follows_float32_where_rounding_to_nearest_sticks(monkeypatch):
    """At b2 = 0.999 a step moves nu by under half a bfloat16 spacing: rounded to nearest it
    stops far below the float32 moment; stochastically rounded its mean is within 2%."""
    exact = _final_nu(optax.adam(1e-3)).mean()
    rounded = _final_nu(stochastic_bf16_nu(optax.adam(1e-3)))
    assert abs(rounded.mean() - exact) < 0.02 * exact
    monkeypatch.setattr(precision, "stochastic_round_bf16",
                        lambda x, key: x.astype(jnp.bfloat16))
    nearest = _final_nu(stochastic_bf16_nu(optax.adam(1e-3)))
    assert nearest.mean() < 0.7 * exact


def test_bfloat16_nu_changes_only_the_stored_moment():
    """The first update (from zero moments, exact in bfloat16 too) is optax.adamw's to the bit,
    with the first moment and count as optax keeps them; nu is bfloat16 and the rest float32."""
    params = {"w": jnp.linspace(-1, 1, 64).reshape(8, 8), "b": jnp.ones(8)}
    grads = jax.tree.map(lambda p: jnp.cos(3 * p), params)
    ref = optax.adamw(1e-2, weight_decay=0.1)
    tx = stochastic_bf16_nu(optax.adamw(1e-2, weight_decay=0.1))
    u_ref, s_ref = ref.update(grads, ref.init(params), params)
    u, s = tx.update(grads, tx.init(params), params)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), u, u_ref))
    assert s[0].nu["w"].dtype == jnp.bfloat16 and s[0].mu["w"].dtype == jnp.float32
    assert int(s[0].count) == 1
    assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), s[0].mu, s_ref[0].mu))


def test_trainer_setting_keeps_nu_in_bfloat16_under_lisa():
    """--adam-nu-dtype bfloat16: the LISA slots' and the always-trained leaves' second moments
    are bfloat16 (under the master weights), their first moments as before."""
    from lisa_jax import config as C
    from lisa_jax import methods
    cfg = C.TrainConfig(dtype="bfloat16", adam_nu_dtype="bfloat16")
    inner = methods.adamw(cfg, optax.constant_schedule(1e-5))
    tx = lisa_jax.lisa(inner, n_active=1, interval=4, key=0)
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), _start())
    state = tx.init(params)
    adam = [x for x in jax.tree.leaves(state, is_leaf=lambda x: isinstance(
        x, optax.ScaleByAdamState)) if isinstance(x, optax.ScaleByAdamState)]
    assert adam and all(v.dtype == jnp.bfloat16 for s in adam for v in jax.tree.leaves(s.nu))
    assert all(v.dtype == jnp.bfloat16 for s in adam for v in jax.tree.leaves(s.mu))


def _update_temp_bytes(tx, params):
    """Scratch memory XLA allocates for one compiled ``tx.update`` (the grads donated)."""
    state = tx.init(params)
    fn = jax.jit(lambda g, s, p: tx.update(g, s, p), donate_argnums=(0, 1))
    return fn.lower(params, state, params).compile().memory_analysis().temp_size_in_bytes


def test_bfloat16_nu_update_holds_no_leaf_sized_noise(monkeypatch):
    """The rounding's noise is made inside the fused rounding: the bf16-nu update's scratch is
    that of the same update with no noise at all (a materialized draw of random bits is 2-4
    bytes an element: 2-4 MiB here; on the CPU, 4.6 GiB of a 2-layer full fine-tuning step at
    LLaMA-2-7B's width, experiments/update_memory.py)."""
    params = {"w": jnp.ones((1024, 1024), jnp.float32), "b": jnp.ones((1024,), jnp.float32)}
    tx = stochastic_bf16_nu(optax.adamw(1e-3))
    hashed = _update_temp_bytes(tx, params)
    monkeypatch.setattr(precision, "_uniform_bits16",
                        lambda key, shape: jnp.zeros(shape, jnp.uint32))
    noiseless = _update_temp_bytes(tx, params)
    assert hashed <= noiseless + 2**16, (hashed, noiseless)
    # the check can fail: with jax.random.bits's threefry noise the scratch grows by MiBs
    monkeypatch.setattr(precision, "_uniform_bits16", lambda key, shape: jax.random.bits(
        key, shape, jnp.uint16).astype(jnp.uint32))
    threefry = _update_temp_bytes(tx, params)
    assert threefry > noiseless + 2**20, (threefry, noiseless)


def test_the_rounding_noise_is_uniform_and_differs_by_key_and_element():
    """Its 16 bits: each value's share over 2^18 draws within 5 standard errors of uniform (by
    the top byte), half of each bit set, neighbours and two keys' draws uncorrelated."""
    bits = np.asarray(precision._uniform_bits16(jax.random.key(3), (512, 512)))
    other = np.asarray(precision._uniform_bits16(jax.random.key(4), (512, 512)))
    assert bits.max() < 2**16
    n = bits.size
    counts = np.bincount((bits >> 8).ravel(), minlength=256)
    assert np.abs(counts - n / 256).max() < 5 * np.sqrt(n / 256)
    for b in range(16):
        assert abs(((bits >> b) & 1).mean() - 0.5) < 5 * 0.5 / np.sqrt(n), b
    u, v = bits.astype(np.float64).ravel(), other.astype(np.float64).ravel()
    for a, c in [(u[:-1], u[1:]), (u, v), (bits[:-1].ravel(), bits[1:].ravel())]:
        assert abs(np.corrcoef(a, c)[0, 1]) < 5 / np.sqrt(a.size)


def test_bfloat16_nu_init_makes_its_float32_moments_inside_one_compiled_program():
    """``inner.init``'s float32 second moments are cast to bfloat16 where XLA fuses the two:
    run op by op (a caller outside ``jit``) every leaf's float32 moment lived at once before its
    cast, 25 GiB at LLaMA-2-7B full fine-tuning."""
    seen = []
    adamw = optax.adamw(1e-3)

    def spying_init(params):
        seen.append(all(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(params)))
        return adamw.init(params)
    tx = stochastic_bf16_nu(optax.GradientTransformation(spying_init, adamw.update))
    state = tx.init({"w": jnp.ones((8, 8)), "b": jnp.ones(8)})
    assert seen == [True]
    assert state[0].nu["w"].dtype == jnp.bfloat16 and not state[0].nu["w"].any()
