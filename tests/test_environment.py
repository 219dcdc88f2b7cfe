"""The install: energyflow's EMD works beside NumPy 2, and environment.yml, README and CI agree."""

import re
import tomllib

import numpy as np
import yaml

from conftest import PROJECT_ROOT


def test_energyflow_computes_an_emd_beside_numpy_2():
    import energyflow

    assert int(np.__version__.split(".")[0]) >= 2
    # One unit-pt particle each, 0.5 apart in (y, phi): EMD = pt * distance / R.
    first = np.array([[1.0, 0.0, 0.0]])
    second = np.array([[1.0, 0.3, 0.4]])
    assert abs(energyflow.emd.emd(first, second, R=0.8) - 0.5 / 0.8) < 1e-9


def test_environment_yml_installs_this_package_with_pyproject_python():
    env = yaml.safe_load((PROJECT_ROOT / "environment.yml").read_text())
    project = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]
    conda = [d for d in env["dependencies"] if isinstance(d, str)]
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert "python=3.11" in conda and project["requires-python"] == ">=3.11,<3.12"
    assert any(line.startswith("-e .") for line in pip), "environment.yml must install this package"
    assert "--no-binary wasserstein" in pip
    # Conda only provides the build tools pip needs; any package it names is pinned as in pyproject.
    pinned = {re.split(r"[<>=!\[ ]", d)[0]: d for d in project["dependencies"]}
    for dependency in conda:
        name = re.split(r"[<>=!]", dependency)[0]
        if name in pinned:
            assert dependency.replace(" ", "") == pinned[name].replace(" ", ""), (dependency, pinned[name])


def test_ci_runs_the_readme_test_command():
    readme = (PROJECT_ROOT / "README.md").read_text()
    commands = re.findall(r"```bash\n(pip install .+?)\n```", readme)
    assert len(commands) == 2, "the Quickstart has exactly two commands"
    assert commands[1].endswith("python -m pytest") and "snakemake --cores" in commands[0]
    assert commands[1] in (PROJECT_ROOT / ".ci" / "run").read_text()
