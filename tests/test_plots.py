import matplotlib.image
import numpy as np
import pytest

from pipeline.plots import QUANTITIES, format_metric, plot_comparison, plotted_values
from pipeline.files import PipelineError

CLASS_NAMES = ["g", "q", "t"]
EXPECTED_FILES = (
    [f"{quantity.name}.png" for quantity in QUANTITIES]
    + [f"{quantity.name}_by_class.png" for quantity in QUANTITIES]
    + ["jet_images.png"]
)


def random_sets(seed: int, n_jets: int = 200, n_max: int = 30, classes=(0, 1, 2)) -> dict:
    """Sets as ``read_sets`` returns them: random multiplicities, pt_rel sorted, padded rows zero."""
    rng = np.random.default_rng(seed)
    multiplicity = rng.integers(1, n_max + 1, n_jets)
    mask = np.arange(n_max) < multiplicity[:, None]
    pt_rel = -np.sort(-rng.exponential(1.0, (n_jets, n_max)), axis=1)
    pt_rel /= (pt_rel * mask).sum(axis=1, keepdims=True)
    particles = np.stack([rng.normal(0, 0.2, (n_jets, n_max)), rng.normal(0, 0.2, (n_jets, n_max)), pt_rel], axis=-1)
    return {
        "particles": (particles * mask[..., None]).astype(np.float32), "mask": mask,
        "jets": np.zeros((n_jets, 4), np.float32), "labels": rng.choice(classes, n_jets).astype(np.int32),
        "feature_names": ["eta_rel", "phi_rel", "pt_rel"], "class_names": CLASS_NAMES,
    }


def with_garbage_in_padding(sets: dict) -> dict:
    particles = sets["particles"].copy()
    particles[~sets["mask"]] = 1e6
    return {**sets, "particles": particles}


METRICS = {"sample.all.w1m": 1.23e-3, "sample.all.w1m_std": 5e-5, "sample.q.w1p_pt_rel": 0.02}


@pytest.fixture(scope="module")
def figures(tmp_path_factory) -> list:
    """Every figure for 200 real and 200 generated random jets (made once: plotting takes seconds)."""
    return plot_comparison(random_sets(0), random_sets(1), tmp_path_factory.mktemp("figures"), metrics=METRICS)


def test_every_figure_is_written_as_a_png(figures):
    paths = figures
    assert paths == [paths[0].parent / name for name in EXPECTED_FILES]
    for path in paths:
        image = matplotlib.image.imread(path)
        assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 300, path.name


def test_every_figure_shows_the_generated_jets(figures, tmp_path):
    """Other generated jets, same real ones: every figure changes (none is blank or real-only)."""
    others = plot_comparison(random_sets(0), random_sets(2), tmp_path, metrics=METRICS)
    for path, other in zip(figures, others, strict=True):
        assert not np.array_equal(matplotlib.image.imread(path), matplotlib.image.imread(other)), path.name


def test_padded_rows_never_reach_a_histogram(figures, tmp_path):
    clean, dirty = random_sets(1), with_garbage_in_padding(random_sets(1))
    clean_values, dirty_values = plotted_values(clean), plotted_values(dirty)
    assert clean_values.keys() == dirty_values.keys() == {quantity.name for quantity in QUANTITIES}
    for name, values in clean_values.items():
        assert np.all(np.isfinite(values)), name
        np.testing.assert_array_equal(dirty_values[name], values, err_msg=name)
    assert len(clean_values["pt_rel"]) == clean["mask"].sum()
    np.testing.assert_allclose(clean_values["jet_pt"], 1.0, rtol=0.5)  # the pt_rel of a jet's particles sum to 1

    dirty_paths = plot_comparison(random_sets(0), dirty, tmp_path, metrics=METRICS)
    for clean_path, dirty_path in zip(figures, dirty_paths, strict=True):
        np.testing.assert_array_equal(matplotlib.image.imread(dirty_path), matplotlib.image.imread(clean_path),
                                      err_msg=clean_path.name)


def test_a_class_missing_from_the_generated_jets_is_left_out(figures, tmp_path):
    partial = plot_comparison(random_sets(0), random_sets(1, classes=(0, 1)), tmp_path)
    assert [path.name for path in partial] == [path.name for path in figures]
    for three_classes, two_classes in zip(figures, partial):
        if three_classes.name.endswith("_by_class.png") or three_classes.name == "jet_images.png":
            width = matplotlib.image.imread(three_classes).shape[1]
            assert matplotlib.image.imread(two_classes).shape[1] < width, three_classes.name


@pytest.mark.parametrize("side", ["real", "generated"])
def test_no_jets_on_either_side_is_a_clear_error(tmp_path, side):
    sets = {"real": random_sets(0), "generated": random_sets(1)}
    sets[side] = random_sets(1, n_jets=0)
    with pytest.raises(PipelineError, match="has no jets"):
        plot_comparison(sets["real"], sets["generated"], tmp_path)
    assert not any(tmp_path.glob("*.png"))


def test_metric_titles_share_one_power_of_ten():
    assert format_metric("$W_1^M$", 1.23e-3, 5e-5) == r"$W_1^M$ = (1.23 $\pm$ 0.05) $\times 10^{-3}$"
    assert format_metric("$W$", 0.5) == r"$W$ = 5.00 $\times 10^{-1}$"
    assert format_metric("$W$", 2.5) == "$W$ = 2.50"
