"""The notebooks: paired and stripped in git, and each runs top to bottom.

Each notebook is read from its percent-format ``.py`` (jupytext), executed
by nbclient in a ``python3`` kernel (ipykernel's, found in the venv) with the
repository root as working directory, and then checked by one extra cell
that asserts on the variables the notebook left behind.

The model: the cached toy Countdown base model when ``runs/toy_models``
holds it, else a micro model built in about a minute and passed as
``ERPO_JAX_NOTEBOOK_CHECKPOINT``, so that a fresh clone does not spend tens
of minutes building the toy model.
``training_curves`` is pointed at an empty directory, so it always takes its
fallback path (two tiny training runs) and never depends on ``runs/study``.
Executing all three takes a few minutes on 2 CPU cores: marked slow.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

jupytext = pytest.importorskip("jupytext")
nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ("entropy_dynamics", "erpo_components", "training_curves")
CELL_TIMEOUT_S = 600
MARKER = "NOTEBOOK_CHECK "

# Appended to each notebook; runs in its kernel after the last cell.
CHECKS = {
    "entropy_dynamics": """
import json
import numpy as np
B = NUM_CANDIDATES * G
assert tuple(out.entropy.shape) == tuple(out.logp.shape) == (B, MAX_NEW_TOKENS)
assert entropy.shape == logp.shape == tokens.shape == mask.shape == (G, MAX_NEW_TOKENS)
assert np.isfinite(entropy).all() and (entropy[mask] >= 0).all() and (logp[mask] <= 0).all()
assert np.array_equal(mask.sum(axis=1), lengths)
assert gate.shape == (G, MAX_NEW_TOKENS)
assert ((gate[mask] >= 0) & (gate[mask] <= 1)).all() and (gate[~mask] == 0).all()
# W > 0.5 exactly on tokens above the group's mean entropy.
assert np.array_equal(gate > 0.5, mask & (entropy > entropy[mask].mean()))
assert ((branch >= 0) & (branch <= lengths)).all()
# Siblings that share a prefix drew different tokens at the branch point from
# the same distribution, so the sampler's entropy there cannot be 0.
for g in np.nonzero(has_branch)[0]:
    assert entropy[g, branch[g]] > 0, (g, branch[g])
assert len(fig.axes) == G
print("NOTEBOOK_CHECK " + json.dumps({"tokens": int(mask.sum()), "branches": int(has_branch.sum())}))
""",
    "erpo_components": """
import json
import numpy as np
B = P_SHOW * G
assert rewards.shape == (P_SHOW, G) and mask.shape == (B, MAX_NEW_TOKENS)
assert set(terms) == {"gate", "progress", "progress_hat", "psi", "omega", "adv_tok"}
for name, value in terms.items():
    assert value.shape == (B, MAX_NEW_TOKENS), name
    assert np.isfinite(value).all() and (value[~mask] == 0).all(), name
assert ((terms["gate"][mask] >= 0) & (terms["gate"][mask] <= 1)).all()
assert (terms["omega"][mask] > 0).all()
# redistribute keeps each row's mean credit weight at 1
assert np.allclose(terms["omega"].sum(axis=1) / mask.sum(axis=1), 1.0, atol=1e-4)
# GRPO's advantage is one value per row
assert np.allclose(grpo_adv, np.where(mask, grpo_adv[:, :1], 0.0))
# the drift moved the rollout policy away from the reference
assert np.abs(old_logp - ref_logp)[mask].max() > 0
assert len(grid) == len(GAMMAS) * len(ETAS)
for gamma in GAMMAS:
    assert float(table[gamma, 0.0].sign_flip_frac) == 0.0
    assert float(table[gamma, 0.0].cdp_frac) == float(table[GAMMAS[0], 0.0].cdp_frac)
assert float(table[20.0, 0.0].eff_token_frac) < float(table[1.0, 0.0].eff_token_frac)
print("NOTEBOOK_CHECK " + json.dumps({"mixed_groups": len(mixed)}))
""",
    "training_curves": """
import json
import math
assert fallback_dir is not None, "the test points RUN_GLOBS at an empty directory"
assert set(groups) == {"GRPO", "ERPO"}
for label, runs in groups.items():
    assert len(runs) == 1 and runs[0].finished, label
    assert len(runs[0].steps) == FALLBACK_STEPS, label
    evals = sorted(runs[0].evals)  # before, every 4 steps, after
    assert len(evals) == 4 and evals[0] == 0 and evals[-1] == FALLBACK_STEPS, (label, evals)
    mean = table[label]["pass@1 sampled"][0]
    assert 0.0 <= mean <= 1.0, (label, mean)
assert "cdp_frac" in groups["ERPO"][0].steps[0] and "cdp_frac" not in groups["GRPO"][0].steps[0]
mean, low, high, n = table["ERPO"]["Δ pass@1 vs GRPO"]
assert n == 1 and math.isnan(low)
assert len([ax for ax in fig.axes if ax.axison]) == len(KEYS) + 1
print("NOTEBOOK_CHECK " + json.dumps({"fallback_dir": str(fallback_dir)}))
""",
}


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_paired_and_stripped(name):
    py, ipynb = ROOT / "notebooks" / f"{name}.py", ROOT / "notebooks" / f"{name}.ipynb"
    assert py.is_file() and ipynb.is_file()
    from_py, stored = jupytext.read(py), nbformat.read(ipynb, as_version=4)
    assert stored.metadata["jupytext"]["formats"] == "ipynb,py:percent"
    assert [(c.cell_type, c.source) for c in stored.cells] == [
        (c.cell_type, c.source) for c in from_py.cells
    ], f"notebooks/{name}.ipynb is out of sync: run `jupytext --sync notebooks/{name}.py`"
    for cell in stored.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, (
                f"notebooks/{name}.ipynb has outputs; commit it stripped"
            )


@pytest.fixture(scope="module")
def notebook_checkpoint(tmp_path_factory):
    """None (the notebooks' default, the cached toy model), or a micro model's directory."""
    from toy_micro import MICRO

    from erpo_jax.train import build_toy_base_model, toy_base_model_dir

    if toy_base_model_dir(ROOT / "runs" / "toy_models", seed=0).is_dir():
        return None
    return build_toy_base_model(tmp_path_factory.mktemp("toy"), seed=0, recipe=MICRO)


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, notebook_checkpoint, tmp_path, monkeypatch):
    from nbclient import NotebookClient

    # The kernel inherits this process's environment.
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    if notebook_checkpoint is not None:
        monkeypatch.setenv("ERPO_JAX_NOTEBOOK_CHECKPOINT", str(notebook_checkpoint))
    else:
        monkeypatch.delenv("ERPO_JAX_NOTEBOOK_CHECKPOINT", raising=False)
    empty = tmp_path / "no_runs"
    empty.mkdir()
    monkeypatch.setenv("ERPO_JAX_NOTEBOOK_RUN_GLOBS", json.dumps({"none": str(empty / "*")}))

    nb = jupytext.read(ROOT / "notebooks" / f"{name}.py")
    nb.cells.append(nbformat.v4.new_code_cell(CHECKS[name]))
    client = NotebookClient(
        nb,
        kernel_name="python3",
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(ROOT)}},
    )
    client.execute()

    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert images, f"{name} produced no figure"
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    lines = [line for line in text.splitlines() if line.startswith(MARKER)]
    assert len(lines) == 1, text[-2000:]
    result = json.loads(lines[0][len(MARKER) :])
    if name == "training_curves":
        shutil.rmtree(result["fallback_dir"], ignore_errors=True)
