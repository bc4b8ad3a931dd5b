"""A bounded, seeded sample of the fuzz targets (tests/fuzz): every parser of bytes from a
disk or from A keeps its contract over a few hundred to 2000 mutated inputs: only its named
errors escape, and a restore never writes a byte that was not saved. ``make fuzz`` runs the
same targets for 100,000 inputs each, coverage-guided."""

from __future__ import annotations

import pytest

from tests.fuzz import mutate, targets

#: inputs per target: the slow ones (a file or a restore per input) fewer
SAMPLE = {"image": 500, "linux": 1000, "config": 1000, "fsstamp": 1500, "freepages": 1000}


@pytest.mark.parametrize("name", list(targets.TARGETS))
def test_seeds_parse_and_mutants_keep_the_contract(name: str) -> None:
    t = targets.TARGETS[name]
    for seed in t.seeds():  # a valid input is accepted as it is (the contract is not vacuous)
        if name != "freepages" or seed:
            t.run(seed)
    found: dict[str, int] = {}
    for data in mutate.inputs(t, SAMPLE.get(name, 2000)):
        sig = targets.check(t, data)
        if sig is not None:
            found[sig] = found.get(sig, 0) + 1
    assert found == {}
