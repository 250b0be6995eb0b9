"""What the documentation says about the losses is what the code does.

Issue 8, problem 5: the docs numbered ERPO's equations wrongly, claimed that
redistribution keeps a row's total credit equal to GRPO's without saying
that this holds only at eta = 0, and called a float32 rule "invisible in
exact arithmetic". The claims themselves are tested in
test_erpo_numerics.py (row totals at eta = 0 and eta > 0) and
test_reference_parity.py (the degenerate-set rule); this file pins the text.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from erpo_jax import losses as L

METHOD_DOC = (Path(__file__).resolve().parents[2] / "docs" / "method.md").read_text()

# The public re-implementation's numbering (METHOD.md section 2).
EQUATIONS = {
    "progress_signal": "Eq. 7",
    "entropy_gate": "Eq. 8",
    "bucket_normalize": "Eq. 9",
    "result_anchored_synthesis": "Eq. 10",
}


@pytest.mark.parametrize(("name", "eq"), sorted(EQUATIONS.items()))
def test_equation_numbers_in_docstrings_and_method_doc(name, eq):
    doc = getattr(L, name).__doc__
    assert f"ERPO {eq}" in doc.splitlines()[0], doc.splitlines()[0]
    others = [e for e in EQUATIONS.values() if e != eq]
    # The method table's rows for the function cite its equation (the final
    # assembly row cites none: it is not published), never another one.
    rows = [
        line for line in METHOD_DOC.splitlines() if line.startswith("|") and f"`{name}`" in line
    ]
    assert any(re.search(rf"\b{eq}\b", row) for row in rows), name
    for row in rows:
        assert not any(re.search(rf"\b{o}\b", row) for o in others), row


def test_total_credit_claim_is_limited_to_eta_zero():
    for text in (METHOD_DOC, L.result_anchored_synthesis.__doc__):
        flat = " ".join(text.split())
        for sentence in re.split(r"(?<=[.;:])\s", flat):
            if "GRPO's" in sentence and "credit" in sentence and "equal" in sentence:
                assert "eta = 0" in sentence or "eta=0" in sentence, sentence


def test_no_float32_rule_is_called_invisible():
    assert "invisible in exact arithmetic" not in METHOD_DOC
    assert "Numerical rules" in METHOD_DOC and "Degenerate sets" in METHOD_DOC
