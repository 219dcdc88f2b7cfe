"""Properties of the setdiff library: symmetry, padding, schedules, the bound, and learning."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from setdiff import VDM, ScoreNet, make_schedule, vdm_loss
from setdiff.sampling import sample as setdiff_sample, time_grid
from setdiff.schedules import SCHEDULES
from setdiff.training import create_train_state, init_params, make_optimizer, train_step

N_MAX, DIM = 7, 3


def small_model(schedule="learned_linear", n_inducing=0, timesteps=0, latent_dim=0, n_classes=3, conditioning="additive",
                pair_bias_width=0, context_mlp=False, class_mlp=False, cond_drop="class_and_context", self_condition=False):
    net = ScoreNet(d_model=32, n_layers=2, n_heads=4, mlp_ratio=4, n_classes=n_classes, n_inducing=n_inducing,
                   conditioning=conditioning, pair_bias_width=pair_bias_width, context_mlp=context_mlp,
                   class_mlp=class_mlp, cond_drop=cond_drop, self_condition=self_condition)
    return VDM(net, make_schedule(schedule), data_dim=DIM, parameterization="eps", timesteps=timesteps, latent_dim=latent_dim)


@pytest.fixture
def batch():
    rng = np.random.default_rng(0)
    sizes = np.array([7, 5, 1, 3])
    mask = np.arange(N_MAX)[None, :] < sizes[:, None]
    x = rng.normal(size=(4, N_MAX, DIM)).astype(np.float32) * mask[..., None]
    return {
        "x": jnp.asarray(x),
        "mask": jnp.asarray(mask),
        "labels": jnp.asarray([0, 1, 2, 1], jnp.int32),
        "context": jnp.asarray(rng.normal(size=(4, 2)), jnp.float32),
    }


def perturbed(params, scale=0.1, seed=0):
    """Parameters pushed away from their initial values, so zero-initialised layers matter."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [p + scale * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])


def eps_hat(model, params, batch, x=None, labels=None, context=None):
    t = jnp.linspace(0.1, 0.9, batch["x"].shape[0])
    z = model.apply(params, batch["x"] if x is None else x, method=VDM.encode)  # the diffused variable
    return model.apply(
        params,
        z,
        t,
        batch["mask"],
        batch["labels"] if labels is None else labels,
        batch["context"] if context is None else context,
        method=VDM.eps_hat,
    )


# The score networks the shape tests run on: small_model's arguments, each an option of ScoreNet.
NETWORKS = [
    pytest.param({"conditioning": "additive"}, id="additive"),
    pytest.param({"conditioning": "additive", "n_inducing": 4}, id="additive-isab"),
    pytest.param({"conditioning": "adaln"}, id="adaln"),
    pytest.param({"conditioning": "adaln", "pair_bias_width": 8}, id="adaln-pair-bias"),
    pytest.param({"conditioning": "adaln", "context_mlp": True}, id="adaln-context-mlp"),
    pytest.param({"conditioning": "adaln", "context_mlp": True, "class_mlp": True}, id="adaln-context-and-class-mlp"),
    pytest.param({"conditioning": "adaln", "self_condition": True, "schedule": "fixed_linear"}, id="adaln-self-conditioning"),
]


def conditioned_output(batch, **network):
    """The noise prediction of a perturbed adaLN network as a function of (labels, context, keep),
    and a different class and context for every set of ``batch``."""
    model = small_model(conditioning="adaln", **network)
    params = perturbed(init_params(model, jax.random.key(0), batch))
    z = model.apply(params, batch["x"], method=VDM.encode)
    t = jnp.linspace(0.1, 0.9, 4)

    def output(labels, context, keep):
        return model.apply(params, z, t, batch["mask"], labels, context, jnp.full((4,), keep), method=VDM.eps_hat)

    return output, (batch["labels"] + 1) % 3, batch["context"] + 1.5


MLP_OPTIONS = [
    pytest.param({"context_mlp": False}, id="linear-context"),
    pytest.param({"context_mlp": True}, id="context-mlp"),
    pytest.param({"context_mlp": True, "class_mlp": True}, id="context-and-class-mlp"),
]


@pytest.mark.parametrize("mlp_options", MLP_OPTIONS)
def test_dropping_the_conditioning_removes_class_and_context_and_only_them(batch, mlp_options):
    """Classifier-free guidance needs an unconditional model: with ``cond_keep`` False the output is
    the same whatever the class and the context, and with it True both change the output."""
    output, other_labels, other_context = conditioned_output(batch, **mlp_options)
    np.testing.assert_allclose(output(other_labels, other_context, False), output(batch["labels"], batch["context"], False), atol=1e-6)
    kept = output(batch["labels"], batch["context"], True)
    for labels, context in ((other_labels, batch["context"]), (batch["labels"], other_context)):
        assert float(jnp.abs(output(labels, context, True) - kept).max()) > 1e-3


@pytest.mark.parametrize("mlp_options", MLP_OPTIONS)
def test_dropping_only_the_context_keeps_the_class(batch, mlp_options):
    """With ``cond_drop="context"`` guidance contrasts a jet with and without its features, within its
    class: with ``cond_keep`` False the output no longer depends on the context and still depends on the class."""
    output, other_labels, other_context = conditioned_output(batch, **mlp_options, cond_drop="context")
    dropped = output(batch["labels"], batch["context"], False)
    np.testing.assert_allclose(output(batch["labels"], other_context, False), dropped, atol=1e-6)
    assert float(jnp.abs(output(other_labels, batch["context"], False) - dropped).max()) > 1e-3
    kept = output(batch["labels"], batch["context"], True)
    assert float(jnp.abs(output(batch["labels"], other_context, True) - kept).max()) > 1e-3


@pytest.mark.parametrize("class_mlp", [False, True])
def test_the_class_enters_the_conditioning_mlp_only_with_class_mlp(batch, class_mlp):
    """``class_mlp`` lets the conditioning depend on time, size and context differently per class: the
    output of the MLP that embeds them (before the class embedding is added, without the option)
    changes with the class only when the option is on."""
    model = small_model(conditioning="adaln", context_mlp=True, class_mlp=class_mlp)
    params = perturbed(init_params(model, jax.random.key(0), batch))
    z = model.apply(params, batch["x"], method=VDM.encode)
    t = jnp.linspace(0.1, 0.9, 4)

    def mlp_output(labels):
        _, state = model.apply(params, z, t, batch["mask"], labels, batch["context"], method=VDM.eps_hat,
                               capture_intermediates=lambda module, _: module.name == "Dense_1"
                               and isinstance(module.parent, ScoreNet))
        (output,) = state["intermediates"]["score_net"]["Dense_1"]["__call__"]
        return output

    change = float(jnp.abs(mlp_output((batch["labels"] + 1) % 3) - mlp_output(batch["labels"])).max())
    assert change > 1e-3 if class_mlp else change == 0.0


def test_an_unknown_cond_drop_is_refused(batch):
    with pytest.raises(ValueError, match="unknown cond_drop"):
        init_params(small_model(cond_drop="class"), jax.random.key(0), batch)


@pytest.mark.parametrize("network", NETWORKS)
def test_score_network_sees_the_size_of_a_set(batch, network):
    """Attention averages over elements, so a set and the same set with every element duplicated look
    alike to it; only the size conditioning tells them apart (a jet of 3 particles and one of 6
    carry different momentum fractions)."""
    model = small_model(**network)
    params = perturbed(init_params(model, jax.random.key(0), batch))
    elements = batch["x"][2:3, :3]  # three elements of one set
    single = jnp.zeros((1, N_MAX, DIM)).at[:, :3].set(elements)
    doubled = jnp.zeros((1, N_MAX, DIM)).at[:, :3].set(elements).at[:, 3:6].set(elements)
    outputs = []
    for x, size in ((single, 3), (doubled, 6)):
        mask = jnp.arange(N_MAX)[None, :] < size
        outputs.append(model.apply(params, x, jnp.array([0.5]), mask, batch["labels"][:1], batch["context"][:1],
                                   method=VDM.eps_hat)[0, :3])
    assert float(jnp.max(jnp.abs(outputs[0] - outputs[1]))) > 1e-3


@pytest.mark.parametrize("network", NETWORKS)
def test_score_network_is_permutation_equivariant(batch, network):
    model = small_model(**network)
    params = perturbed(init_params(model, jax.random.key(0), batch))
    permutation = np.random.default_rng(1).permutation(N_MAX)
    permuted = {**batch, "x": batch["x"][:, permutation], "mask": batch["mask"][:, permutation]}
    out = eps_hat(model, params, batch)
    out_of_permuted = eps_hat(model, params, permuted)
    assert float(jnp.abs(out).max()) > 1e-3, "outputs are trivially zero; the test would prove nothing"
    np.testing.assert_allclose(out_of_permuted, out[:, permutation], atol=1e-5)


def test_a_self_conditioning_network_reads_the_estimate_it_is_given_on_real_elements_only(batch):
    """The estimate of the clean data changes the prediction of a self-conditioning network, its
    padded rows never do, and a network without self-conditioning ignores it."""
    mask = batch["mask"]
    t = jnp.linspace(0.1, 0.9, 4)
    estimate = jax.random.normal(jax.random.key(5), batch["x"].shape)
    junk_padding = jnp.where(mask[..., None], estimate, 100.0 * jax.random.normal(jax.random.key(6), estimate.shape))
    for self_condition in (True, False):
        model = small_model("fixed_linear", conditioning="adaln", self_condition=self_condition)
        params = perturbed(init_params(model, jax.random.key(0), batch))

        def predict(x_self):
            return model.apply(params, batch["x"], t, mask, batch["labels"], batch["context"], None, x_self, method=VDM.eps_hat)
        given, junk, none = predict(estimate), predict(junk_padding), predict(None)
        np.testing.assert_allclose(junk, given, atol=1e-5)
        if self_condition:
            assert float(jnp.abs(given - none)[mask].max()) > 1e-3
        else:
            np.testing.assert_array_equal(given, none)


@pytest.mark.parametrize("network", [
    *NETWORKS,
    pytest.param({"conditioning": "additive", "latent_dim": 4}, id="additive-latent"),
    pytest.param({"conditioning": "additive", "latent_dim": 4, "n_inducing": 4}, id="additive-isab-latent"),
])
def test_padding_never_changes_valid_outputs_or_loss(batch, network):
    model = small_model(**network)
    params = perturbed(init_params(model, jax.random.key(0), batch))
    mask = batch["mask"]
    junk = jax.random.normal(jax.random.key(7), batch["x"].shape) * 100.0
    x_junk_padding = jnp.where(mask[..., None], batch["x"], junk)
    # A fully padded extra set with arbitrary conditioning must not change anything either.
    padded_set = {
        "x": jnp.concatenate([batch["x"], junk[:1]]),
        "mask": jnp.concatenate([mask, jnp.zeros((1, N_MAX), bool)]),
        "labels": jnp.concatenate([batch["labels"], jnp.asarray([2], jnp.int32)]),
        "context": jnp.concatenate([batch["context"], jnp.asarray([[50.0, -50.0]])]),
    }
    other_conditioning = {**padded_set, "labels": padded_set["labels"].at[-1].set(0), "context": padded_set["context"].at[-1].set(-3.0)}

    out = eps_hat(model, params, batch)
    out_junk = eps_hat(model, params, batch, x=x_junk_padding)
    np.testing.assert_allclose(out_junk, out, atol=1e-5)
    assert float(jnp.abs(out[~mask]).max()) == 0.0

    def loss(b):
        return vdm_loss(model, params, jax.random.key(3), b["x"], b["mask"], b["labels"], b["context"])[0]

    reference = loss(batch)
    np.testing.assert_allclose(loss({**batch, "x": x_junk_padding}), reference, rtol=1e-5)
    np.testing.assert_allclose(loss(padded_set), loss(other_conditioning), rtol=1e-6)
    # The padded set changes antithetic times of the others, so compare at fixed times instead.
    t = jnp.linspace(0.05, 0.95, 5)
    terms = model.apply(params, padded_set["x"], padded_set["mask"], padded_set["labels"], padded_set["context"],
                        t=t, rngs={"diffusion": jax.random.key(4)})
    terms_other = model.apply(params, other_conditioning["x"], other_conditioning["mask"], other_conditioning["labels"],
                              other_conditioning["context"], t=t, rngs={"diffusion": jax.random.key(4)})
    np.testing.assert_allclose(terms.total[:4], terms_other.total[:4], rtol=1e-6)
    assert float(terms.total[4]) == 0.0 and int(terms.n_dims[4]) == 0


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_schedules_are_monotone_with_the_requested_endpoints(name):
    schedule = make_schedule(name)
    t = jnp.linspace(0.0, 1.0, 1001)
    variables = schedule.init(jax.random.key(0), t)
    for params in (variables, perturbed(variables, scale=1.0, seed=3)):
        gamma = schedule.apply(params, t)
        assert bool(jnp.all(jnp.diff(gamma) > 0)), f"{name} is not strictly increasing"
    gamma = schedule.apply(variables, t)
    np.testing.assert_allclose([gamma[0], gamma[-1]], [-13.3, 5.0], rtol=1e-5)


def test_churn_moves_the_samples_on_real_elements_only_and_the_ancestral_sampler_refuses_it(batch):
    """EDM's stochastic sampler: against the deterministic Heun sampler from the same starting noise
    the samples move, the same key gives the same samples, padded elements stay zero, and the
    ancestral sampler, already stochastic, refuses churn."""
    model = small_model()
    params = perturbed(init_params(model, jax.random.key(0), batch))
    mask = batch["mask"]

    def draw(key, churn=0.0, sampler="heun"):
        return np.asarray(setdiff_sample(model, params, jax.random.key(key), mask, batch["labels"], steps=4, sampler=sampler,
                                         churn=churn))

    deterministic, churned = draw(1), draw(1, churn=0.5)
    np.testing.assert_array_equal(churned, draw(1, churn=0.5))
    assert not np.allclose(churned, deterministic, atol=1e-3)  # the added noise moved the samples
    assert np.all(churned[~np.asarray(mask)] == 0.0) and np.isfinite(churned).all()
    with pytest.raises(ValueError, match=r"churn=0\.5: give 0, or a positive fraction with the ddim or heun sampler"):
        draw(1, churn=0.5, sampler="ancestral")


def test_sampler_time_grids_run_from_noise_to_data_with_the_asked_spacing():
    gamma_0, gamma_1, steps = -13.3, 5.0, 25
    np.testing.assert_allclose(time_grid(gamma_0, gamma_1, steps), 1.0 - np.arange(steps + 1) / steps, atol=1e-7)
    times = np.asarray(time_grid(gamma_0, gamma_1, steps, rho=7.0), np.float64)
    assert times[0] == 1.0 and times[-1] == 0.0 and np.all(np.diff(times) < 0)
    # EDM's eq. 5: sigma^(1/rho) falls in equal steps, with sigma = exp(gamma / 2) on a linear schedule
    root_sigma = np.exp((gamma_0 + (gamma_1 - gamma_0) * times) / (2 * 7.0))
    np.testing.assert_allclose(np.diff(root_sigma), np.full(steps, (root_sigma[-1] - root_sigma[0]) / steps), rtol=1e-3)
    # against equal steps of log sigma: shorter steps at high noise, longer ones near the data
    assert -np.diff(times)[0] < 1 / steps < -np.diff(times)[-1]
    # a very large rho is equal steps of log sigma again
    np.testing.assert_allclose(time_grid(gamma_0, gamma_1, steps, rho=1e4), 1.0 - np.arange(steps + 1) / steps, atol=1e-3)


def test_a_learned_gamma_0_stays_above_its_floor_so_the_bound_stays_finite(batch):
    """Data on a surface (here every set's features equal) rewards a vanishing decoder width
    exp(gamma(0) / 2) without bound; the schedule's floor keeps the NELBO bounded below."""
    model = small_model("learned_linear")
    params = init_params(model, jax.random.key(0), batch)
    pushed = jax.tree_util.tree_map_with_path(
        lambda path, leaf: leaf - 50.0 if "gamma_0" in jax.tree_util.keystr(path) else leaf, params)
    assert float(model.apply(pushed, jnp.zeros(()), method=VDM.gamma)) == pytest.approx(-13.3)
    flat = {**batch, "x": jnp.ones_like(batch["x"]) * batch["mask"][..., None]}
    terms = model.apply(pushed, flat["x"], flat["mask"], flat["labels"], flat["context"], rngs={"diffusion": jax.random.key(1)})
    floor_per_dim = 0.5 * (np.log(2 * np.pi) - 13.3)
    assert np.all(np.asarray(terms.reconstruction) >= floor_per_dim * np.asarray(terms.n_dims) - 1e-3)


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
@pytest.mark.parametrize("timesteps", [0, 50])
@pytest.mark.parametrize("latent_dim", [0, 4])
def test_loss_and_gradients_are_finite(batch, schedule, timesteps, latent_dim):
    model = small_model(schedule, timesteps=timesteps, latent_dim=latent_dim)
    params = init_params(model, jax.random.key(0), batch)
    (loss, terms), grads = jax.value_and_grad(
        lambda p: vdm_loss(model, p, jax.random.key(1), batch["x"], batch["mask"], batch["labels"], batch["context"]),
        has_aux=True,
    )(params)
    assert np.isfinite(float(loss)) and all(np.isfinite(float(v)) for v in terms.values())
    leaves = jax.tree.leaves(grads)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    assert any(float(jnp.abs(g).max()) > 0 for g in leaves)


def test_discrete_time_loss_approaches_continuous_time_loss(batch):
    continuous = small_model("learned_linear")
    params = perturbed(init_params(continuous, jax.random.key(0), batch))
    t = jnp.asarray([0.13, 0.37, 0.61, 0.89])

    def diffusion_term(timesteps):
        model = small_model("learned_linear", timesteps=timesteps)
        terms = model.apply(params, batch["x"], batch["mask"], batch["labels"], batch["context"], t=t,
                            rngs={"diffusion": jax.random.key(5)})
        return np.asarray(terms.diffusion)

    reference = diffusion_term(0)
    gaps = [np.abs(diffusion_term(T) - reference).max() / np.abs(reference).max() for T in (10, 100, 1000, 10000)]
    assert all(later < earlier for earlier, later in zip(gaps, gaps[1:])), gaps
    assert gaps[-1] < 1e-2, gaps


def test_a_fixed_normaliser_weighs_every_element_the_same_however_sets_are_batched(batch):
    """Two batches, one of the small sets and one of the large (as grouping by multiplicity makes
    them), must step along the gradient of the whole batch: with the expected count of dimensions
    per batch as the normaliser their mean gradient is the whole batch's; dividing each batch by
    its own count would weigh an element of a small set more."""
    model = small_model()
    optimizer = make_optimizer(1e-3, 10)  # the update is not compared, only the gradients it starts from
    state = create_train_state(model, jax.random.key(0), batch, optimizer)
    n_dims = int(jnp.sum(batch["mask"])) * DIM

    @jax.jit  # one compilation per number of rows, instead of the op-by-op gradient's hundreds of dispatches
    def loss_gradient(params, part, set_ids, dims_per_batch):
        loss = lambda p: vdm_loss(model, p, jax.random.key(1), part["x"], part["mask"], part["labels"], part["context"],  # noqa: E731
                                  n_dims_total=dims_per_batch, set_ids=set_ids, n_sets=4)[0]
        return jax.grad(loss)(params)

    def gradient(rows, dims_per_batch):
        part = {name: value[rows] for name, value in batch.items()}
        leaves = jax.tree.leaves(loss_gradient(state.params, part, jnp.asarray(rows), jnp.float32(dims_per_batch)))
        return np.concatenate([np.ravel(leaf) for leaf in leaves])

    whole = gradient(np.arange(4), n_dims)
    small, large = np.array([2, 3]), np.array([0, 1])  # sizes 1 and 3, then 7 and 5
    halves = [gradient(rows, n_dims / 2) for rows in (small, large)]
    np.testing.assert_allclose((halves[0] + halves[1]) / 2, whole, rtol=1e-4, atol=1e-7)
    own_counts = [gradient(rows, int(jnp.sum(batch["mask"][rows])) * DIM) for rows in (small, large)]
    assert not np.allclose((own_counts[0] + own_counts[1]) / 2, whole, rtol=1e-2)
    # train_step divides by the normaliser it is given, else by the batch's own count
    _, fixed = train_step(state, batch, jax.random.key(1), model=model, optimizer=optimizer, dims_per_batch=2.0 * n_dims)
    _, own = train_step(state, batch, jax.random.key(1), model=model, optimizer=optimizer)
    assert float(fixed["loss_bpd"]) == pytest.approx(float(own["loss_bpd"]) / 2, rel=1e-5)


@pytest.mark.parametrize("n_shards, self_condition", [(2, False), (4, False), (4, True)])
def test_data_parallel_step_matches_single_device(n_shards, self_condition):
    """A batch split over shards with collectives gives the update of the whole batch on one device
    (with self-conditioning: every shard tosses the batch's one coin)."""
    rng = np.random.default_rng(0)
    mask = np.arange(N_MAX)[None, :] < rng.integers(1, N_MAX + 1, size=8)[:, None]
    batch = {
        "x": jnp.asarray(rng.normal(size=(8, N_MAX, DIM)) * mask[..., None], jnp.float32),
        "mask": jnp.asarray(mask),
        "labels": jnp.asarray(rng.integers(0, 3, size=8), jnp.int32),
    }
    net = ScoreNet(d_model=16, n_layers=1, n_heads=2, mlp_ratio=4, conditioning="additive", n_classes=3,
                   self_condition=self_condition)
    schedule = make_schedule("fixed_linear" if self_condition else "learned_linear")
    model = VDM(net, schedule, data_dim=DIM, parameterization="eps", cond_drop_prob=0.5)
    optimizer = make_optimizer(1e-2, total_steps=10)
    state = create_train_state(model, jax.random.key(0), batch, optimizer)
    step_rng = jax.random.key(1)
    whole, whole_metrics = jax.jit(lambda s, b: train_step(s, b, step_rng, model=model, optimizer=optimizer))(state, batch)

    # vmap with an axis name runs the same collectives as pmap (pmap itself is tested with several
    # devices by the training stage's tests).
    shards = jax.tree.map(lambda a: a.reshape((n_shards, -1) + a.shape[1:]), batch)
    sharded_step = jax.jit(jax.vmap(
        lambda s, b: train_step(s, b, step_rng, model=model, optimizer=optimizer, axis_name="devices"),
        in_axes=(None, 0), axis_name="devices",
    ))
    split, split_metrics = sharded_step(state, shards)
    np.testing.assert_allclose(split_metrics["loss_bpd"], whole_metrics["loss_bpd"], rtol=1e-5)
    moved = jax.tree.map(lambda new, old: float(jnp.abs(new - old).max()), whole.params, state.params)
    assert max(jax.tree.leaves(moved)) > 1e-3
    for split_leaf, whole_leaf in zip(jax.tree.leaves(split.params), jax.tree.leaves(whole.params)):
        for shard in range(n_shards):
            np.testing.assert_allclose(split_leaf[shard], whole_leaf, atol=2e-5)


def test_v_prediction_gives_the_noise_of_pure_noise_and_keeps_padding_at_zero(batch):
    """With v-prediction ``eps_hat = sigma_t z + alpha_t v_hat``: at initialisation (``v_hat = 0``)
    the noise prediction is ``sigma_t z``, exact at t -> 1 where z is all noise; padded elements stay
    zero, and the bound is the same kind of number as with eps-prediction."""
    net = ScoreNet(d_model=32, n_layers=2, n_heads=4, mlp_ratio=4, conditioning="additive", n_classes=3)
    model = VDM(net, make_schedule("fixed_linear"), data_dim=DIM, parameterization="v")
    params = init_params(model, jax.random.key(0), batch)
    z = jnp.asarray(np.random.default_rng(1).normal(size=batch["x"].shape), jnp.float32) * batch["mask"][..., None]
    t = jnp.asarray([0.2, 0.5, 0.8, 1.0])
    predicted = model.apply(params, z, t, batch["mask"], batch["labels"], method=VDM.eps_hat)
    sigma = np.sqrt(1 / (1 + np.exp(-np.asarray(model.apply(params, t, method=VDM.gamma)))))
    np.testing.assert_allclose(predicted, sigma[:, None, None] * np.asarray(z), rtol=1e-5, atol=1e-6)
    assert float(sigma[-1]) > 0.99
    trained = perturbed(params)
    predicted = model.apply(trained, z, t, batch["mask"], batch["labels"], method=VDM.eps_hat)
    assert float(jnp.abs(predicted * ~batch["mask"][..., None]).max()) == 0.0
    loss, aux = vdm_loss(model, trained, jax.random.key(2), batch["x"], batch["mask"], batch["labels"])
    assert np.isfinite(float(loss)) and float(loss) == pytest.approx(float(aux["nelbo_bpd"]), rel=1e-6)


def test_sigmoid_weighting_moves_the_loss_to_noisy_times_and_still_reports_the_elbo(batch):
    """The weighted diffusion term is the ELBO's times sigmoid(b - log SNR): at a very noisy time
    the two agree, at an almost clean one the weighted term is tiny; with the ELBO added it is the
    ELBO's times 1 + sigmoid(b - log SNR). The unweighted term (what validation reports) does not
    depend on the weighting."""
    def terms(weighting, t):
        net = ScoreNet(d_model=32, n_layers=2, n_heads=4, mlp_ratio=4, conditioning="additive", n_classes=3)
        model = VDM(net, make_schedule("fixed_linear"), data_dim=DIM, parameterization="eps", loss_weighting=weighting, sigmoid_bias=0.0)
        params = perturbed(init_params(model, jax.random.key(0), batch))
        return model.apply(params, batch["x"], batch["mask"], batch["labels"], t=jnp.full((4,), t),
                           rngs={"diffusion": jax.random.key(3)})

    for t in (0.02, 0.98):
        elbo, weighted, both = terms("elbo", t), terms("sigmoid", t), terms("elbo_plus_sigmoid", t)
        np.testing.assert_allclose(weighted.diffusion, elbo.diffusion, rtol=1e-6)
        np.testing.assert_allclose(both.diffusion, elbo.diffusion, rtol=1e-6)
        np.testing.assert_allclose(elbo.weighted_diffusion, elbo.diffusion, rtol=1e-6)
        log_snr = -(-13.3 + 18.3 * t)
        np.testing.assert_allclose(weighted.weighted_diffusion, elbo.diffusion / (1 + np.exp(log_snr)), rtol=1e-4)
        np.testing.assert_allclose(both.weighted_diffusion, elbo.diffusion * (1 + 1 / (1 + np.exp(log_snr))), rtol=1e-4)
    assert float(jnp.sum(terms("sigmoid", 0.02).weighted_diffusion)) < 1e-4 * float(jnp.sum(terms("elbo", 0.02).diffusion))


def test_edm_weighting_is_edms_loss_written_as_a_weighting_of_the_elbo(batch):
    """EDM's loss (Karras et al. 2022, table 1) with sigma_data = 1: log sigma ~ N(-1.2 + ln 2, 1.2^2),
    and the denoiser's squared error weighted by (sigma^2 + 1) / sigma^2, which is the squared error of
    eps times sigma^2 + 1. Over log-SNR lambda = -2 log sigma that is the ELBO's diffusion term (which
    weighs every lambda alike) times the density of lambda times (exp(-lambda) + 1), computed here
    from EDM's own variables; the reported diffusion term is the ELBO's."""
    net = ScoreNet(d_model=32, n_layers=2, n_heads=4, mlp_ratio=4, conditioning="additive", n_classes=3)
    def terms(weighting, t):
        model = VDM(net, make_schedule("fixed_linear"), data_dim=DIM, parameterization="v", loss_weighting=weighting)
        params = perturbed(init_params(model, jax.random.key(0), batch))
        return model.apply(params, batch["x"], batch["mask"], batch["labels"], t=jnp.full((4,), t),
                           rngs={"diffusion": jax.random.key(3)})

    p_mean, p_std = -1.2 + np.log(2.0), 1.2
    for t in (0.02, 0.3, 0.5, 0.98):
        elbo, edm = terms("elbo", t), terms("edm", t)
        np.testing.assert_allclose(edm.diffusion, elbo.diffusion, rtol=1e-6)
        sigma = np.exp(0.5 * (-13.3 + 18.3 * t))  # the fixed schedule's gamma(t) = -log SNR = 2 log sigma
        log_sigma_density = np.exp(-0.5 * ((np.log(sigma) - p_mean) / p_std) ** 2) / (p_std * np.sqrt(2 * np.pi))
        log_snr_density = log_sigma_density / 2.0  # d log sigma / d lambda = -1/2
        np.testing.assert_allclose(edm.weighted_diffusion, elbo.diffusion * log_snr_density * (sigma**2 + 1.0), rtol=1e-4)
    noisy, clean = float(jnp.sum(terms("edm", 0.98).weighted_diffusion)), float(jnp.sum(terms("edm", 0.02).weighted_diffusion))
    assert noisy > 0.5 * float(jnp.sum(terms("elbo", 0.98).diffusion))
    assert clean < 1e-5 * float(jnp.sum(terms("elbo", 0.02).diffusion))


@pytest.mark.parametrize("weighting", ["sigmoid", "elbo_plus_sigmoid", "edm"])
def test_a_weighted_loss_refuses_a_learned_schedule(batch, weighting):
    """A weighted loss is not the bound: a learned schedule trained on it drifts, so it is refused."""
    net = ScoreNet(d_model=16, n_layers=1, n_heads=2, mlp_ratio=4, conditioning="additive", n_classes=3)
    model = VDM(net, make_schedule("learned_linear"), data_dim=DIM, parameterization="v", loss_weighting=weighting)
    with pytest.raises(ValueError, match=f"loss weighting '{weighting}' would train a learned schedule"):
        init_params(model, jax.random.key(0), batch)
    fixed = VDM(net, make_schedule("fixed_linear"), data_dim=DIM, parameterization="v", loss_weighting=weighting)
    assert "schedule" not in init_params(fixed, jax.random.key(0), batch)["params"]


def test_self_conditioning_refuses_a_learned_schedule(batch):
    """The estimate a self-conditioning network takes carries no gradient, so a learned schedule would
    get only part of the bound's gradient (and drifted): refused."""
    net = ScoreNet(d_model=16, n_layers=1, n_heads=2, mlp_ratio=4, conditioning="additive", n_classes=3, self_condition=True)
    with pytest.raises(ValueError, match="self-conditioning trains a learned schedule"):
        init_params(VDM(net, make_schedule("learned_linear"), data_dim=DIM, parameterization="v"), jax.random.key(0), batch)
    assert init_params(VDM(net, make_schedule("fixed_linear"), data_dim=DIM, parameterization="v"), jax.random.key(0), batch)


def test_weight_decay_shrinks_weight_matrices_only(batch):
    """AdamW with a zero gradient and a large decay moves the kernels and embeddings only; biases,
    LayerNorm scales and the schedule's endpoints keep their values."""
    model = small_model()
    params = perturbed(init_params(model, jax.random.key(0), batch))
    optimizer = make_optimizer(0.1, 10, weight_decay=1.0)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = optimizer.update(zeros, optimizer.init(params), params)
    moved = {jax.tree_util.keystr(path): float(jnp.abs(update).max())
             for path, update in jax.tree_util.tree_leaves_with_path(updates)}
    assert any("gamma_0" in name for name in moved) and any("bias" in name for name in moved)
    for name, size in moved.items():
        matrix = name.endswith("['kernel']") or name.endswith("['embedding']") or "inducing" in name
        assert (size > 0) == matrix, name


def test_attention_equals_flax_multi_head_attention_with_the_same_weights():
    """The network's attention against ``flax.linen.MultiHeadDotProductAttention`` given the same
    projections, padded keys hidden by the mask in both."""
    import flax.linen as nn

    from setdiff.networks import MultiHeadAttention

    batch, n, width, heads = 3, 7, 16, 4
    queries, keys_values = jax.random.normal(jax.random.PRNGKey(0), (2, batch, n, width))
    mask = jnp.arange(n)[None, :] < jnp.array([7, 4, 1])[:, None]
    ours = MultiHeadAttention(n_heads=heads)
    params = ours.init(jax.random.PRNGKey(1), queries, keys_values, mask)["params"]
    params = jax.tree.map(lambda leaf: leaf + 0.1 * jax.random.normal(jax.random.PRNGKey(2), leaf.shape), params)  # non-zero biases
    split = (heads, width // heads)
    key_kernel, value_kernel = jnp.split(params["key_value"]["kernel"], 2, axis=-1)
    key_bias, value_bias = jnp.split(params["key_value"]["bias"], 2)
    flax_params = {
        "query": {"kernel": params["query"]["kernel"].reshape(width, *split), "bias": params["query"]["bias"].reshape(split)},
        "key": {"kernel": key_kernel.reshape(width, *split), "bias": key_bias.reshape(split)},
        "value": {"kernel": value_kernel.reshape(width, *split), "bias": value_bias.reshape(split)},
        "out": {"kernel": params["out"]["kernel"].reshape(*split, width), "bias": params["out"]["bias"]},
    }
    reference = nn.MultiHeadDotProductAttention(num_heads=heads, qkv_features=width, out_features=width)
    expected = reference.apply({"params": flax_params}, queries, keys_values, mask=nn.make_attention_mask(jnp.ones((batch, n), bool), mask))
    got = ours.apply({"params": params}, queries, keys_values, mask)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert not np.allclose(got, ours.apply({"params": params}, queries, keys_values), atol=1e-3)  # the mask mattered

    # A per-pair, per-head bias of the logits (the pairwise attention bias) is flax's ``bias``.
    bias = jax.random.normal(jax.random.PRNGKey(3), (batch, heads, n, n))
    biased = nn.MultiHeadDotProductAttention(num_heads=heads, qkv_features=width, out_features=width,
                                             attention_fn=functools.partial(nn.dot_product_attention, bias=bias))
    expected = biased.apply({"params": flax_params}, queries, keys_values, mask=nn.make_attention_mask(jnp.ones((batch, n), bool), mask))
    got_biased = ours.apply({"params": params}, queries, keys_values, mask, bias)
    np.testing.assert_allclose(got_biased, expected, rtol=1e-5, atol=1e-5)
    assert not np.allclose(got_biased, got, atol=1e-3)


def test_a_pairwise_bias_needs_full_attention(batch):
    with pytest.raises(ValueError, match="pairwise attention bias needs full self-attention"):
        init_params(small_model(n_inducing=4, pair_bias_width=8), jax.random.key(0), batch)
