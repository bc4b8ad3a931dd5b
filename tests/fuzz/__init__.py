"""Fuzz targets for every parser of bytes from a disk or from the main kernel (A).

Each target (``tests.fuzz.targets.TARGETS``) takes one input of bytes, hands it to a parser the
way kjumpd does, and checks the parser's contract: only the documented ``KjumpError``
subclasses escape (any other exception, or a hang, is a finding), and for an image, memory is
never written wrong: every byte a restore writes is the byte that was saved, and a restore that
succeeds wrote all of it.

``make fuzz`` (``python -m tests.fuzz``) runs every target with coverage guidance (atheris, the
``[fuzz]`` extra) for ``FUZZ_RUNS`` inputs each; tests/unit/test_fuzz_sample.py runs a small
seeded sample of the same targets (``tests.fuzz.mutate``, no atheris needed) in ``make test``.
"""
