"""The LISA optax transformation: semantics, resampling, compilation, composition, errors."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as st

import lisa_jax
from lisa_jax import LisaState, active_layers, lisa, maybe_resample

L, D, V = 6, 3, 5
TIGHT = dict(rtol=1e-6, atol=1e-7)


def toy_params(num_layers=L, seed=0):
    rng = np.random.default_rng(seed)
    f32 = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)  # noqa: E731
    return {
        "embed": f32(V, D),
        "final_norm": 1.0 + 0.1 * f32(D),
        "layers": {"wq": f32(num_layers, D, D), "norm": f32(num_layers, D)},
        "lm_head": f32(D, V),
    }


def toy_grads(t, like):
    """Deterministic pseudo-random gradients for step ``t`` (numpy: no compilation)."""
    rng = np.random.default_rng(1000 + t)
    return jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), like)


def run_lisa(tx, params, steps, *, jit=False, host_prepare=False, state=None, start=0):
    """Run ``steps`` updates; returns (params, state, per-step active sets, per-step updates)."""
    state = tx.init(params) if state is None else state
    upd = jax.jit(tx.update) if jit else tx.update
    actives, updates = [], []
    for t in range(start, start + steps):
        if host_prepare:
            state = maybe_resample(tx, state, params)
        u, state = upd(toy_grads(t, params), state, params)
        actives.append(np.asarray(state.active).tolist())
        updates.append(u)
        params = optax.apply_updates(params, u)
    return params, state, actives, updates


def layer_slice(tree, l):
    return {n: x[l] for n, x in tree["layers"].items()}


def rest_of(tree):
    return {k: v for k, v in tree.items() if k != "layers"}


def reference_run(opt, params, actives, interval, reset="sampled"):
    """Independent plain-optax simulation of LISA: one ``opt`` on the always-trained leaves and
    one ``opt`` per active layer slice, created when the layer becomes active and dropped when
    it leaves (reset="sampled"), or everything re-created each period (reset="all")."""
    rest = rest_of(params)
    layers = {n: [x[l] for l in range(x.shape[0])] for n, x in params["layers"].items()}
    rest_state, lstates = opt.init(rest), {}
    for t, act in enumerate(actives):
        if t % interval == 0:
            if reset == "all":
                rest_state, lstates = opt.init(rest), {}
            lstates = {l: lstates[l] if l in lstates else
                       opt.init({n: layers[n][l] for n in layers}) for l in act}
        g = toy_grads(t, params)
        u, rest_state = opt.update(rest_of(g), rest_state, rest)
        rest = optax.apply_updates(rest, u)
        for l in act:
            p_l = {n: layers[n][l] for n in layers}
            u, lstates[l] = opt.update(layer_slice(g, l), lstates[l], p_l)
            for n, x in optax.apply_updates(p_l, u).items():
                layers[n][l] = x
    return dict(rest, layers={n: jnp.stack(xs) for n, xs in layers.items()})


def assert_trees_close(a, b, **tol):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, **(tol or TIGHT)), a, b)


def tree_bytes(tree):
    return sum(np.asarray(x).nbytes for x in jax.tree.leaves(tree))


def find_seed(pred, n_active=2, num_layers=L, interval=3):
    """First sampler seed whose period-0/period-1 active sets satisfy ``pred(a0, a1)``."""
    params = toy_params(num_layers)
    for seed in range(200):
        tx = lisa(optax.sgd(0.1), n_active=n_active, interval=interval, key=seed)
        s0 = tx.init(params)
        s1 = tx.prepare(s0._replace(count=jnp.int32(interval)), params)
        a0, a1 = set(np.asarray(s0.active).tolist()), set(np.asarray(s1.active).tolist())
        if pred(a0, a1):
            return seed, sorted(a0), sorted(a1)
    raise AssertionError("no seed found")


# ----------------------------------------------------------------------------- frozen / moving

def test_frozen_layer_slices_get_exactly_zero_updates():
    params = toy_params()
    tx = lisa(optax.adamw(0.1, weight_decay=0.1), n_active=2, interval=2, key=3)
    _, _, actives, updates = run_lisa(tx, params, 6)
    for act, u in zip(actives, updates):
        frozen = [l for l in range(L) if l not in act]
        for x in u["layers"].values():
            assert np.all(np.asarray(x)[frozen] == 0.0)


def test_only_active_layers_and_always_trained_leaves_move():
    params = toy_params()
    tx = lisa(optax.adamw(0.1, weight_decay=0.1), n_active=2, interval=10, key=3)
    new, state, actives, _ = run_lisa(tx, params, 3)
    act = actives[0]
    for name in ("embed", "final_norm", "lm_head"):
        assert np.all(new[name] != params[name])
    for n, x in new["layers"].items():
        moved = np.any(np.asarray(x != params["layers"][n]).reshape(L, -1), axis=1)
        assert np.flatnonzero(moved).tolist() == act
        frozen = [l for l in range(L) if l not in act]
        np.testing.assert_array_equal(np.asarray(x)[frozen],
                                      np.asarray(params["layers"][n])[frozen])


# ----------------------------------------------------------------------------- memory

def test_state_bytes_scale_with_n_active_not_num_layers():
    num_layers, d, f, v, gamma = 32, 8, 16, 16, 2
    params = {"embed": jnp.ones((v, d)), "final_norm": jnp.ones(d), "lm_head": jnp.ones((d, v)),
              "layers": {"wq": jnp.ones((num_layers, d, d)), "w_up": jnp.ones((num_layers, d, f)),
                         "norm": jnp.ones((num_layers, d))}}
    non_layer = tree_bytes(rest_of(params))
    one_layer = tree_bytes(params["layers"]) // num_layers
    plain = tree_bytes(optax.adamw(1e-3).init(params))
    state = lisa(optax.adamw(1e-3), n_active=gamma).init(params)
    got = tree_bytes(state)
    # count, key (2 x uint32), period, active[gamma]; adam counts: rest 1, slots gamma.
    scalars = 4 + 8 + 4 + 4 * gamma + 4 + 4 * gamma
    assert got == 2 * (non_layer + gamma * one_layer) + scalars
    assert plain == 2 * (non_layer + num_layers * one_layer) + 4
    print(f"\nAdamW state bytes, {num_layers}-layer toy: plain={plain}, "
          f"lisa(n_active={gamma})={got} ({got / plain:.3f}x); "
          f"non-layer params={non_layer} B, one layer={one_layer} B")


# ----------------------------------------------------------------------------- dynamics

def test_within_period_active_slices_match_plain_adamw_on_those_slices():
    params = toy_params()
    opt = optax.adamw(0.05, weight_decay=0.1)
    tx = lisa(opt, n_active=3, interval=100, key=7)
    new, _, actives, _ = run_lisa(tx, params, 5)
    act = actives[0]
    # Plain AdamW on one tree holding the always-trained leaves and the active slices alone.
    sub = dict(rest_of(params), **{f"l{l}": layer_slice(params, l) for l in act})
    state = opt.init(sub)
    for t in range(5):
        g = toy_grads(t, params)
        gsub = dict(rest_of(g), **{f"l{l}": layer_slice(g, l) for l in act})
        u, state = opt.update(gsub, state, sub)
        sub = optax.apply_updates(sub, u)
    assert_trees_close(rest_of(new), {k: sub[k] for k in rest_of(params)})
    for l in act:
        assert_trees_close(layer_slice(new, l), sub[f"l{l}"])


def test_reset_sampled_new_layer_fresh_kept_layer_and_rest_keep_moments():
    seed, a0, a1 = find_seed(lambda a0, a1: a0 & a1 and a1 - a0)
    params = toy_params()
    tx = lisa(optax.adam(0.1), n_active=2, interval=3, key=seed)
    _, state, _, _ = run_lisa(tx, params, 3)
    assert state.count == 3 and state.active.tolist() == a0
    new = tx.prepare(state, params)
    assert new.active.tolist() == a1
    old_adam, new_adam = state.slot_state[0], new.slot_state[0]
    for i, l in enumerate(a1):
        if l in a0:  # kept: its moments and bias-correction count moved to its new slot
            j = a0.index(l)
            assert int(new_adam.count[i]) == 3
            for n in ("wq", "norm"):
                np.testing.assert_array_equal(new_adam.mu["layers"][n][i],
                                              old_adam.mu["layers"][n][j])
                np.testing.assert_array_equal(new_adam.nu["layers"][n][i],
                                              old_adam.nu["layers"][n][j])
        else:  # newly sampled: fresh state
            assert int(new_adam.count[i]) == 0
            for n in ("wq", "norm"):
                assert np.all(np.asarray(new_adam.mu["layers"][n][i]) == 0)
                assert np.all(np.asarray(new_adam.nu["layers"][n][i]) == 0)
    jax.tree.map(np.testing.assert_array_equal, new.rest_state, state.rest_state)
    # prepare is idempotent within the period
    again = tx.prepare(new, params)
    jax.tree.map(np.testing.assert_array_equal, again, new)


@pytest.mark.parametrize("reset", ["sampled", "all"])
def test_trajectory_matches_per_layer_adamw_created_when_layer_is_sampled(reset):
    # Over 4 periods: kept layers continue their AdamW, newly sampled layers behave exactly as a
    # fresh optax.adamw on that slice, always-trained leaves run one AdamW throughout
    # (reset="sampled"); or every AdamW is re-created each period (reset="all").
    params = toy_params()
    opt = optax.adamw(0.05, weight_decay=0.1)
    tx = lisa(opt, n_active=3, interval=3, key=1, reset=reset)
    new, _, actives, _ = run_lisa(tx, params, 12)
    assert len({tuple(a) for a in actives}) > 1
    assert_trees_close(new, reference_run(opt, params, actives, 3, reset), rtol=1e-5, atol=1e-6)


def test_reset_all_restarts_every_moment_each_period():
    params = toy_params()
    tx = lisa(optax.adam(0.1), n_active=2, interval=3, key=0, reset="all")
    _, state, _, _ = run_lisa(tx, params, 3)
    new = tx.prepare(state, params)
    adam_slots, adam_rest = new.slot_state[0], new.rest_state[0]
    assert np.all(np.asarray(adam_slots.count) == 0) and int(adam_rest.count) == 0
    for x in jax.tree.leaves((adam_slots.mu, adam_slots.nu, adam_rest.mu, adam_rest.nu)):
        assert np.all(np.asarray(x) == 0)
    assert int(state.rest_state[0].count) == 3  # (it had moments before)


@pytest.mark.parametrize("reset", ["sampled", "all"])
def test_schedule_follows_global_step_after_resample(reset):
    # A linear schedule 1.0 -> 0.0 over 10 steps: at step 3 the lr is 0.7. A freshly started
    # Adam step (eps=0) moves every coordinate by exactly lr, so a newly sampled layer must move
    # by 0.7 (1.0 would mean the schedule restarted with the moments).
    seed, a0, a1 = find_seed(lambda a0, a1: a1 - a0)
    params = toy_params()
    sched = optax.linear_schedule(1.0, 0.0, 10)
    tx = lisa(optax.adam(sched, eps=0.0), n_active=2, interval=3, key=seed, reset=reset)
    _, state, _, _ = run_lisa(tx, params, 3)
    _, state, actives, (u,) = run_lisa(tx, params, 1, state=state, start=3)
    assert actives[0] == a1
    for l in sorted(set(a1) - set(a0)):
        for x in u["layers"].values():
            np.testing.assert_allclose(np.abs(np.asarray(x)[l]), 0.7, rtol=1e-5)
    if reset == "all":
        for name in ("embed", "lm_head"):
            np.testing.assert_allclose(np.abs(u[name]), 0.7, rtol=1e-5)
    sched_slots, sched_rest = state.slot_state[-1], state.rest_state[-1]
    assert np.all(np.asarray(sched_slots.count) == 4) and int(sched_rest.count) == 4


# ----------------------------------------------------------------------------- resampling

def test_resample_at_step_zero_and_every_interval():
    params = toy_params(num_layers=8)
    k = 3
    tx = lisa(optax.sgd(0.1), n_active=2, interval=k, key=5)
    init_active = active_layers(tx.init(params)).tolist()
    _, _, actives, _ = run_lisa(tx, params, 6 * k)
    assert actives[0] == init_active  # step 0 uses the first sample
    for t in range(1, 6 * k):
        if t % k:
            assert actives[t] == actives[t - 1]
    assert len({tuple(a) for a in actives[::k]}) > 1


def test_sample_sequence_is_reproducible_from_key():
    # Period p's sample is sample_uniform(d_p) where (k_{p+1}, d_p) = split(k_p), k_0 = key(seed).
    params = toy_params(num_layers=8)
    _, _, actives, _ = run_lisa(lisa(optax.sgd(0.1), n_active=3, interval=2, key=11), params, 10)
    key, expect = jax.random.key(11), []
    for _ in range(5):
        key, draw = jax.random.split(key)
        expect += [lisa_jax.sample_uniform(draw, 8, 3).tolist()] * 2
    assert actives == expect
    _, _, again, _ = run_lisa(lisa(optax.sgd(0.1), n_active=3, interval=2,
                                   key=jax.random.key(11)), params, 10)
    assert again == actives
    _, _, other, _ = run_lisa(lisa(optax.sgd(0.1), n_active=3, interval=2, key=12), params, 10)
    assert other != actives


def test_restored_state_continues_same_sequence():
    params = toy_params(num_layers=8)
    make = lambda: lisa(optax.adamw(0.05), n_active=2, interval=3, key=4)  # noqa: E731
    full, _, full_act, _ = run_lisa(make(), params, 14)
    mid, state, first_act, _ = run_lisa(make(), params, 7)  # stop mid-period
    saved = jax.tree.map(np.asarray, state)  # e.g. a checkpoint round trip
    restored = jax.tree.map(jnp.asarray, saved)
    assert isinstance(restored, LisaState) and restored.key.dtype == jnp.uint32
    end, _, rest_act, _ = run_lisa(make(), mid, 7, state=restored, start=7)
    assert first_act + rest_act == full_act
    assert_trees_close(end, full)


# ----------------------------------------------------------------------------- compilation

def test_jit_fixed_n_active_never_recompiles_across_periods():
    params = toy_params()
    tx = lisa(optax.adamw(optax.linear_schedule(0.1, 0.0, 50)), n_active=2, interval=2, key=0)
    traces = []

    def step(g, s, p):
        traces.append(1)
        return tx.update(g, s, p)

    jstep = jax.jit(step)
    state, seen = tx.init(params), set()
    for t in range(10):  # 5 periods
        _, state = jstep(toy_grads(t, params), state, params)
        seen.add(tuple(state.active.tolist()))
    assert len(seen) > 1 and len(traces) == 1 and jstep._cache_size() == 1


def test_probs_mode_compiles_once_per_distinct_active_count():
    params = toy_params(num_layers=3)
    tx = lisa(optax.adamw(0.05), probs=[0.5] * 3, interval=2, key=2)
    traces = []

    def step(g, s, p):
        traces.append(s.active.shape[0])
        return tx.update(g, s, p)

    jstep = jax.jit(step)
    state, counts = tx.init(params), []
    for t in range(16):  # 8 periods, at most 4 distinct counts (0..3)
        state = maybe_resample(tx, state, params)
        u, state = jstep(toy_grads(t, params), state, params)
        if t % 2 == 0:
            counts.append(int(state.active.shape[0]))
        frozen = [l for l in range(3) if l not in state.active.tolist()]
        assert np.all(np.asarray(u["layers"]["wq"])[frozen] == 0)
    assert 1 < len(set(counts)) < len(counts)
    assert sorted(traces) == sorted(set(counts))


def test_probs_mode_trajectory_matches_per_layer_adamw():
    params = toy_params()
    opt = optax.adamw(0.05, weight_decay=0.1)
    tx = lisa(opt, probs=[0.3, 0.6, 0.9, 0.5, 0.2, 0.7], interval=2, key=9)
    new, _, actives, _ = run_lisa(tx, params, 6, host_prepare=True)
    assert len({len(a) for a in actives}) > 1
    assert_trees_close(new, reference_run(opt, params, actives, 2), rtol=1e-5, atol=1e-6)


def test_probs_mode_eager_update_resamples_itself():
    params = toy_params()
    make = lambda: lisa(optax.adamw(0.05), probs=[0.5] * L, interval=2, key=9)  # noqa: E731
    a, _, act_a, _ = run_lisa(make(), params, 8, jit=False)
    b, _, act_b, _ = run_lisa(make(), params, 8, host_prepare=True)
    assert act_a == act_b and len({tuple(x) for x in act_a}) > 1
    assert_trees_close(a, b)


def test_probs_mode_zero_count_period_trains_only_non_layer_leaves():
    params = toy_params()
    tx = lisa(optax.adam(0.1), probs=[1e-7] * L, interval=2, key=0)
    new, state, actives, updates = run_lisa(tx, params, 4, host_prepare=True)
    assert actives == [[]] * 4 and state.active.shape == (0,)
    for u in updates:
        assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(u["layers"]))
    assert np.all(new["embed"] != params["embed"])


def test_probs_mode_unprepared_state_under_jit_raises():
    params = toy_params()
    tx = lisa(optax.sgd(0.1), probs=[0.5] * L, interval=2, key=0)
    jstep = jax.jit(tx.update)
    state = tx.init(params)
    for t in range(2):
        _, state = jstep(toy_grads(t, params), state, params)
    with pytest.raises(Exception, match="maybe_resample"):
        _, state = jstep(toy_grads(2, params), state, params)
        jax.block_until_ready(state)


def test_maybe_resample_finds_lisa_state_inside_chain_and_multisteps():
    params = toy_params()
    inner = lisa(optax.adam(0.1), probs=[0.9, 0.1, 0.9, 0.1, 0.9, 0.1], interval=1, key=3)
    ref, _, ref_act, _ = run_lisa(inner, params, 4)  # eager: resamples itself
    for tx, k in [(optax.chain(optax.identity(), inner), 1), (optax.MultiSteps(inner, 2), 2)]:
        state, p, acts, update = tx.init(params), params, [], jax.jit(tx.update)
        for t in range(4 * k):
            state = maybe_resample(inner, state, p)
            u, state = update(toy_grads(t // k, params), state, p)
            p = optax.apply_updates(p, u)
            acts.append(active_layers(state).tolist())
        assert acts[k - 1::k] == ref_act
        assert_trees_close(p, ref)
    assert len({len(a) for a in ref_act}) > 1


def test_fast_step_contract_equals_update():
    params = toy_params()
    tx = lisa(optax.adamw(0.05, weight_decay=0.1), n_active=2, interval=2, key=0)

    @jax.jit
    def slow(params, state, g):
        u, state = tx.update(g, state, params)
        return optax.apply_updates(params, u), state, u

    @jax.jit
    def fast(params, state, g):
        state = tx.prepare(state, params)
        vp = tx.view(params, state)
        vg = tx.view(g, state)  # a fast step differentiates w.r.t. vp directly
        assert vg["layers"]["wq"].shape == (2, D, D) and vg["embed"].shape == (V, D)
        vu, state = tx.update_view(vg, state, vp)
        full = tx.scatter(vu, state, like=params)
        return tx.apply_view(params, vu, state), state, full

    p1, s1 = params, tx.init(params)
    p2, s2 = params, tx.init(params)
    for t in range(5):
        g = toy_grads(t, params)
        p1, s1, u_ref = slow(p1, s1, g)
        p2, s2, full = fast(p2, s2, g)
        assert_trees_close(full, u_ref)
    assert_trees_close(p1, p2)
    assert_trees_close(s1, s2)


# ----------------------------------------------------------------------------- composition

def test_chain_clip_by_global_norm_equals_manual_clip_then_lisa():
    params = toy_params()
    inner = lisa(optax.adamw(0.05), n_active=2, interval=2, key=0)
    chained = optax.chain(optax.clip_by_global_norm(1.0), inner)
    s_chain, s_man = chained.init(params), inner.init(params)
    clip = optax.clip_by_global_norm(1.0)
    p_chain = p_man = params
    update = jax.jit(chained.update)
    for t in range(5):
        g = toy_grads(t, params)
        u, s_chain = update(g, s_chain, p_chain)
        p_chain = optax.apply_updates(p_chain, u)
        gc, _ = clip.update(g, clip.init(params))
        assert optax.global_norm(gc) <= 1.0 + 1e-6 < optax.global_norm(g)
        u, s_man = inner.update(gc, s_man, p_man)
        p_man = optax.apply_updates(p_man, u)
    assert_trees_close(p_chain, p_man)
    assert active_layers(s_chain).tolist() == s_man.active.tolist()


def test_multisteps_applies_lisa_every_k_on_mean_grads():
    params = toy_params()
    k = 3
    inner = lisa(optax.adamw(0.05), n_active=2, interval=2, key=0)
    ms = optax.MultiSteps(inner, k)
    s_ms, s_ref = ms.init(params), inner.init(params)
    p_ms = p_ref = params
    update = jax.jit(ms.update)
    for step in range(4):  # 4 inner steps = 2 LISA periods
        gs = [toy_grads(step * k + i, params) for i in range(k)]
        for i, g in enumerate(gs):
            u, s_ms = update(g, s_ms, p_ms)
            if i < k - 1:
                assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(u))
            p_ms = optax.apply_updates(p_ms, u)
        mean = jax.tree.map(lambda *x: sum(x) / k, *gs)
        u, s_ref = inner.update(mean, s_ref, p_ref)
        p_ref = optax.apply_updates(p_ref, u)
        assert active_layers(s_ms).tolist() == s_ref.active.tolist()
    assert_trees_close(p_ms, p_ref, rtol=1e-5, atol=1e-6)


def test_inject_hyperparams_inner_matches_plain_and_follows_global_step():
    params = toy_params()
    sched = optax.linear_schedule(0.1, 0.0, 20)
    injected = lisa(optax.inject_hyperparams(optax.adamw)(learning_rate=sched, weight_decay=0.1),
                    n_active=2, interval=3, key=0)
    plain = lisa(optax.adamw(sched, weight_decay=0.1), n_active=2, interval=3, key=0)
    a, s, _, _ = run_lisa(injected, params, 8)
    b, _, _, _ = run_lisa(plain, params, 8)
    assert_trees_close(a, b, rtol=1e-5, atol=1e-5)
    # hyperparams were computed from the global step (7) in every slot and the rest state
    np.testing.assert_allclose(s.slot_state.hyperparams["learning_rate"], sched(7), rtol=1e-6)
    np.testing.assert_allclose(s.rest_state.hyperparams["learning_rate"], sched(7), rtol=1e-6)
    assert s.slot_state.count.tolist() == [8, 8]


def test_moments_inside_masked_inner_are_reset_for_new_layers():
    seed, a0, a1 = find_seed(lambda a0, a1: a1 - a0)
    params = toy_params()
    inner = optax.chain(optax.masked(optax.scale_by_adam(), lambda p: jax.tree.map(
        lambda x: x.ndim > 1, p)), optax.scale(-0.1))
    tx = lisa(inner, n_active=2, interval=3, key=seed)
    _, state, _, _ = run_lisa(tx, params, 3)
    new = tx.prepare(state, params)
    adam = new.slot_state[0].inner_state
    for i, l in enumerate(a1):
        mu = np.asarray(adam.mu["layers"]["wq"][i])
        assert (int(adam.count[i]) == 0) == (l not in a0)
        assert np.all(mu == 0) == (l not in a0)
    assert isinstance(adam.mu["layers"]["norm"], optax.MaskedNode)  # mask saw a [D] slice


def test_layers_callable_and_key_name_anywhere_in_path():
    params = {"model": {"blocks": {"w": jnp.ones((4, 2, 2))}, "head": jnp.ones((2, 3))}}
    g = jax.tree.map(jnp.ones_like, params)
    for layers in ("blocks", lambda path, leaf: "blocks" in jax.tree_util.keystr(path)):
        tx = lisa(optax.sgd(1.0), n_active=1, layers=layers, key=0)
        state = tx.init(params)
        u, state = tx.update(g, state, params)
        rows = np.flatnonzero(np.any(np.asarray(u["model"]["blocks"]["w"]) != 0, axis=(1, 2)))
        assert rows.tolist() == state.active.tolist() and len(rows) == 1
        assert np.all(np.asarray(u["model"]["head"]) == -1.0)


# ----------------------------------------------------------------------------- properties

@settings(max_examples=8, deadline=None)
@given(num_layers=st.integers(1, 4), data=st.data(), interval=st.integers(1, 3),
       steps=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_property_frozen_zero_and_active_changes_only_at_boundaries(num_layers, data, interval,
                                                                    steps, seed):
    gamma = data.draw(st.integers(1, num_layers))
    params = {"embed": jnp.ones((2, 2)), "layers": {"w": jnp.ones((num_layers, 2))}}
    tx = lisa(optax.adam(0.1), n_active=gamma, interval=interval, key=seed)
    state = tx.init(params)
    prev = state.active.tolist()
    for t in range(steps):
        g = {"embed": jnp.ones((2, 2)), "layers": {"w": jnp.full((num_layers, 2), t + 1.0)}}
        u, state = tx.update(g, state, params)
        act = state.active.tolist()
        assert len(act) == gamma and act == sorted(set(act))
        if t % interval:
            assert act == prev
        w = np.asarray(u["layers"]["w"])
        assert np.all(w[[l for l in range(num_layers) if l not in act]] == 0)
        assert np.all(w[act] != 0) and np.all(np.asarray(u["embed"]) != 0)
        prev = act


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("kwargs, params, match", [
    (dict(), {"embed": jnp.ones(3)}, "no parameter leaf matches"),
    (dict(), {"layers": {"a": jnp.ones((4, 2)), "b": jnp.ones((5, 2))}},
     "different leading sizes"),
    (dict(n_active=0), None, "n_active"),
    (dict(n_active=7), {"layers": jnp.ones((6, 2))}, "exceeds the number of layers"),
    (dict(interval=0), None, "interval"),
    (dict(probs=[0.5] * 3), {"layers": jnp.ones((6, 2))}, "length 3"),
    (dict(probs=[0.5, 1.5]), None, r"\[0, 1\]"),
    (dict(probs=[0.0, 0.0]), None, "all zero"),
    (dict(n_active=2, probs=[0.5, 0.5]), None, "not both"),
    (dict(reset="some"), None, "unknown reset"),
])
def test_bad_input_raises_one_line_value_error(kwargs, params, match):
    with pytest.raises(ValueError, match=match) as err:
        tx = lisa(optax.adam(0.1), **kwargs)
        tx.init(params)
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------- samplers

from lisa_jax import sampling  # noqa: E402


@pytest.mark.parametrize("order", sampling.ORDERS)
def test_ordered_sampler_follows_its_windows_under_jit_without_recompiling(order):
    params = toy_params()  # 6 layers, 2 at a time: cycles of 3 periods
    tx = lisa(optax.adamw(0.05), sampler=sampling.Ordered(2, order), interval=2, key=5)
    _, state, actives, _ = run_lisa(tx, params, 14, jit=True)
    want = [sampling.ordered_window(jax.random.key(5), t // 2, L, 2, order).tolist()
            for t in range(14)]
    assert actives == want
    for cycle in (actives[0:6:2], actives[6:12:2]):
        assert sorted(sum(cycle, [])) == list(range(L))  # every layer once a cycle
    np.testing.assert_array_equal(jax.random.key_data(jax.random.key(5)), state.key)
    traces = []

    def step(g, s, p):
        traces.append(1)
        return tx.update(g, s, p)
    jstep, state = jax.jit(step), tx.init(params)
    for t in range(8):
        _, state = jstep(toy_grads(t, params), state, params)
    assert len(traces) == 1 and jstep._cache_size() == 1


def test_ordered_sampler_resumes_exactly_in_the_middle_of_a_cycle():
    params = toy_params(num_layers=8)
    make = lambda: lisa(optax.adamw(0.05), sampler=sampling.Ordered(2, "reshuffle"),  # noqa
                        interval=3, key=4)
    full, _, full_act, _ = run_lisa(make(), params, 30, jit=True)
    # step 13: period 4 (cycle 1, its first window), one step into it
    mid, state, first_act, _ = run_lisa(make(), params, 13, jit=True)
    restored = jax.tree.map(jnp.asarray, jax.tree.map(np.asarray, state))
    end, _, rest_act, _ = run_lisa(make(), mid, 17, state=restored, start=13, jit=True)
    assert first_act + rest_act == full_act
    assert_trees_close(end, full)
    assert len({tuple(a) for a in full_act[12:24:3]}) == 4  # a new cycle, a new order


def test_weighted_sampler_keeps_the_count_and_draws_only_weighted_layers():
    params = toy_params()
    w = np.array([0.0, 0.5, 0.0, 0.3, 0.2, 0.0])
    tx = lisa(optax.adamw(0.05), sampler=sampling.Weighted(2, w), interval=1, key=0)
    opt = optax.adamw(0.05)
    new, _, actives, _ = run_lisa(tx, params, 10, jit=True)
    assert all(len(a) == 2 and set(a) <= {1, 3, 4} for a in actives)
    assert len({tuple(a) for a in actives}) > 1
    assert_trees_close(new, reference_run(opt, params, actives, 1), rtol=1e-5, atol=1e-6)


def test_sampler_and_n_active_together_is_an_error():
    with pytest.raises(ValueError, match="not both"):
        lisa(optax.adam(0.1), n_active=2, sampler=sampling.Uniform(2))
    with pytest.raises(ValueError, match="Sampler"):
        lisa(optax.adam(0.1), sampler="uniform")


# ----------------------------------------------------------------------------- frozen leaves


def test_frozen_leaves_stay_bit_unchanged_and_hold_no_optimizer_state():
    params = toy_params()
    tx = lisa(optax.adamw(0.1, weight_decay=0.1), n_active=2, interval=2, key=3,
              frozen=("embed", "lm_head"))
    state = tx.init(params)
    adam = state.rest_state[0]
    assert adam.mu["embed"] is None and adam.mu["lm_head"] is None
    assert adam.mu["final_norm"].shape == (D,)
    assert tree_bytes(state) < tree_bytes(lisa(optax.adamw(0.1), n_active=2).init(params))
    view = tx.view(params, state)
    assert view["embed"] is None and view["lm_head"] is None
    new, _, actives, updates = run_lisa(tx, params, 6, jit=True)
    for name in ("embed", "lm_head"):
        np.testing.assert_array_equal(new[name], params[name])
        assert all(np.all(np.asarray(u[name]) == 0) for u in updates)
    assert np.all(new["final_norm"] != params["final_norm"])
    # The same run as one that trains those leaves with their updates set to zero (their
    # AdamW state kept, the rest of the model unaffected by it).
    zeroed = optax.chain(optax.adamw(0.1, weight_decay=0.1), optax.masked(
        optax.set_to_zero(), lambda p: {k: k in ("embed", "lm_head") for k in p}))
    assert_trees_close(new, reference_run(zeroed, params, actives, 2), rtol=1e-5, atol=1e-6)


def test_frozen_must_match_a_leaf_outside_the_layers():
    with pytest.raises(ValueError, match="no leaf outside the layers matches frozen"):
        lisa(optax.adam(0.1), n_active=1, frozen="embedding").init(toy_params())


# ----------------------------------------------------------------------------- per-leaf inner

PER_LEAF_INNERS = {
    "adafactor": lambda: optax.adafactor(0.05, min_dim_size_to_factor=2),  # factored moments
    "lion": lambda: optax.lion(0.01, weight_decay=0.1),
    "muon": lambda: optax.contrib.muon(0.02),  # Newton-Schulz on each 2-D slice
}


def per_layer_tree(params):
    """``params`` with the stacked layers as one tree per layer: the model as a per-layer
    optimizer sees it."""
    n = params["layers"]["wq"].shape[0]
    return dict(rest_of(params), layers=tuple(layer_slice(params, l) for l in range(n)))


@pytest.mark.parametrize("name", sorted(PER_LEAF_INNERS))
def test_every_layer_sampled_equals_inner_on_the_whole_model(name):
    """γ = L and no resample: lisa(inner) is inner itself, for any transformation without
    statistics across leaves (Adafactor's factored second moments, Lion, Muon)."""
    params, steps = toy_params(), 4
    inner = PER_LEAF_INNERS[name]()
    tx = lisa(inner, n_active=L, interval=100, key=0)
    got, _, _, _ = run_lisa(tx, params, steps, jit=True)
    p = per_layer_tree(params)
    state, update = inner.init(p), jax.jit(inner.update)
    for t in range(steps):
        u, state = update(per_layer_tree(toy_grads(t, params)), state, p)
        p = optax.apply_updates(p, u)
    assert_trees_close(per_layer_tree(got), p, rtol=1e-5, atol=1e-6)
    moved = jax.tree.map(lambda a, b: bool(np.any(a != b)), got, params)
    assert all(jax.tree.leaves(moved))


@pytest.mark.parametrize("name", sorted(PER_LEAF_INNERS))
def test_per_leaf_inner_trajectory_matches_a_fresh_inner_per_sampled_layer(name):
    params = toy_params()
    inner = PER_LEAF_INNERS[name]()
    tx = lisa(inner, n_active=2, interval=2, key=1)
    new, _, actives, _ = run_lisa(tx, params, 8, jit=True)
    assert len({tuple(a) for a in actives}) > 1
    assert_trees_close(new, reference_run(inner, params, actives, 2), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("inner", [
    optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3)),
    optax.masked(optax.clip_by_global_norm(1.0), lambda p: jax.tree.map(lambda _: True, p)),
    optax.inject_hyperparams(optax.clip_by_global_norm)(1.0),
    lisa_jax.master_weights(optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3))),
])
def test_global_norm_clipping_inside_inner_is_refused_naming_clip_norm(inner):
    with pytest.raises(ValueError, match="clip_by_global_norm.*clip_norm") as err:
        lisa(inner, n_active=2)
    assert "\n" not in str(err.value)


def test_other_cross_leaf_transformations_are_refused_and_per_leaf_ones_pass():
    for inner in (optax.lbfgs(), optax.contrib.dog(), optax.contrib.prodigy(),
                  optax.normalize_by_update_norm()):
        with pytest.raises(ValueError, match="statistic over several leaves"):
            lisa(inner, n_active=2)
    for inner in list(PER_LEAF_INNERS.values()):
        lisa(inner(), n_active=2)
    lisa(optax.chain(optax.clip(1.0), optax.adaptive_grad_clip(0.1), optax.adamw(1e-3)),
         n_active=2)
