"""Long fuzzing of the reader and of the listener's receive path (the CI tests run a short pass).

Same seeds, mutations and properties as ``tests/test_fuzz.py`` (``tests/fuzzing.py``): the reader
must return a finite image in [0, 1] or raise ``InputRejected`` with a documented reason; the
C-STORE handler must answer 0x0000, 0xA900 or 0xC210, record what it acknowledges with a known
skip reason or spool and queue it, and the worker's reading of a spooled image may raise nothing
but ``InputRejected``.

Engines: `atheris <https://github.com/google/atheris>`_ (coverage-guided libFuzzer, used when it
is installed: ``pip install atheris``) or hypothesis with a large budget. Every finding (an input
that breaks a property) is written to ``--findings`` and counted; fuzzing goes on.

Examples::

    .venv/bin/python benchmarks/fuzz.py --seconds 600            # atheris when installed
    .venv/bin/python benchmarks/fuzz.py --engine hypothesis --runs 20000 --target reader

Prints the engine, executions, findings and the outcomes seen.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

OPS = ("flip", "flip", "flip", "flip", "overwrite", "overwrite", "overwrite", "truncate",
       "insert", "delete")  # fmt: skip


class Campaign:
    """Counts executions and outcomes, and stores findings."""

    def __init__(self, target: str, findings: Path) -> None:
        self.target = target
        self.findings = findings
        self.executions = 0
        self.failures = 0
        self.outcomes: Counter = Counter()
        self.kinds: Counter = Counter()
        self.started = time.monotonic()
        self._receive = None

    def receive_path(self):
        if self._receive is None:
            from fuzzing import ReceivePath

            self._receive = ReceivePath(Path(tempfile.mkdtemp(prefix="fuzz-receive-")))
        return self._receive

    def run(self, mutation) -> None:
        """One execution of the chosen properties on one mutation."""
        from fuzzing import apply, check_reader, check_receive

        mutated = apply(mutation)
        for target in ("reader", "receive") if self.target == "both" else (self.target,):
            self.executions += 1
            try:
                if target == "reader":
                    outcome = check_reader(mutated.data)
                else:
                    outcome = check_receive(self.receive_path(), mutated).split(":")[0]
                self.outcomes[f"{target}: {outcome}"] += 1
            except Exception as exc:  # a property broke: keep the input, go on
                self.failures += 1
                kind = f"{target}: {type(exc).__name__}: {str(exc)[:120]}"
                self.kinds[kind] += 1
                digest = hashlib.sha1(mutated.data).hexdigest()[:16]
                self.findings.mkdir(parents=True, exist_ok=True)
                (self.findings / f"{target}-{digest}.dcm").write_bytes(mutated.data)
                (self.findings / f"{target}-{digest}.txt").write_text(
                    f"{mutation!r}\n\n{traceback.format_exc()}"
                )

    def report(self) -> None:
        elapsed = time.monotonic() - self.started
        print(f"\nexecutions: {self.executions} in {elapsed:.0f} s "
              f"({self.executions / max(elapsed, 1e-9):.0f}/s)")  # fmt: skip
        print(f"findings: {self.failures} ({len(self.kinds)} distinct)")
        for kind, n in self.kinds.most_common():
            print(f"  {n:6d}  {kind}")
        if self.failures:
            print(f"inputs and tracebacks in {self.findings}")
        print("outcomes:")
        for outcome, n in sorted(self.outcomes.items()):
            print(f"  {n:6d}  {outcome}")


def mutation_from_bytes(data: bytes):
    """Decode libFuzzer's bytes into a :class:`fuzzing.Mutation` (atheris engine)."""
    import atheris
    from fuzzing import HEADER_FIELDS, Mutation, seeds

    fdp = atheris.FuzzedDataProvider(data)
    names = seeds()
    seed = names[fdp.ConsumeIntInRange(0, len(names) - 1)]
    header = []
    for _ in range(fdp.ConsumeIntInRange(0, 2)):
        value = fdp.ConsumeIntInRange(-1, 40)
        header.append(
            (fdp.ConsumeIntInRange(0, len(HEADER_FIELDS) - 1), None if value < 0 else value)
        )
    ops = []
    for _ in range(fdp.ConsumeIntInRange(0, 4)):
        op = OPS[fdp.ConsumeIntInRange(0, len(OPS) - 1)]
        pos = fdp.ConsumeIntInRange(0, 2048 if fdp.ConsumeBool() else 2**20)
        n = fdp.ConsumeIntInRange(1, 64)
        ops.append((op, pos, n, fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 16)) or b"\xff"))
    return Mutation(seed, tuple(header), tuple(ops))


def run_atheris(campaign: Campaign, runs: int, seconds: float) -> None:
    import atheris

    with atheris.instrument_imports(include=["dicom_covid", "pacs_listener", "pydicom"]):
        import fuzzing  # noqa: F401  (imports and instruments the code under test)

        import dicom_covid.reader  # noqa: F401
        import pacs_listener.scp  # noqa: F401

    deadline = time.monotonic() + seconds

    def one_input(data: bytes) -> None:
        campaign.run(mutation_from_bytes(data))
        # libFuzzer ends the process without running Python's exit hooks: stop here instead
        if time.monotonic() > deadline or (runs and campaign.executions >= runs):
            campaign.report()
            sys.stdout.flush()
            os._exit(1 if campaign.failures else 0)

    argv = [
        sys.argv[0],
        "-rss_limit_mb=4096",
        "-max_len=256",
        "-len_control=0",
        f"-max_total_time={int(seconds) + 60}",
    ]
    atheris.Setup(argv, one_input)
    atheris.Fuzz()


def run_hypothesis(campaign: Campaign, runs: int, seconds: float) -> None:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    sys.modules.setdefault("pytest", None)  # test_fuzz's pytest marks are not needed here
    from fuzzing import HEADER_FIELDS, Mutation, seeds

    deadline = time.monotonic() + seconds

    @st.composite
    def mutations(draw):
        seed = draw(st.sampled_from(seeds()))
        header = draw(
            st.lists(
                st.tuples(
                    st.integers(0, len(HEADER_FIELDS) - 1),
                    st.integers(-1, 40).map(lambda v: None if v < 0 else v),
                ),
                max_size=2,
            )
        )
        ops = draw(
            st.lists(
                st.tuples(
                    st.sampled_from(OPS),
                    st.one_of(st.integers(0, 2048), st.integers(0, 2**20)),
                    st.integers(1, 64),
                    st.binary(min_size=1, max_size=16),
                ),
                max_size=4,
            )
        )
        return Mutation(seed, tuple(header), tuple(ops))

    class Done(Exception):
        pass

    @settings(
        max_examples=runs or 10**9,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(m=mutations())
    def fuzz(m) -> None:
        if time.monotonic() > deadline:
            raise Done
        campaign.run(m)

    with contextlib.suppress(Done):
        fuzz()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", choices=("auto", "atheris", "hypothesis"), default="auto")
    parser.add_argument("--target", choices=("reader", "receive", "both"), default="both")
    parser.add_argument("--runs", type=int, default=0, help="executions (0: until --seconds)")
    parser.add_argument("--seconds", type=float, default=300.0, help="time budget")
    parser.add_argument("--findings", type=Path, default=Path("fuzz-findings"))
    args = parser.parse_args()

    import logging
    import warnings

    logging.disable(logging.CRITICAL)  # the listener logs every refusal; not wanted here
    warnings.simplefilter("ignore")

    engine = args.engine
    if engine == "auto":
        try:
            import atheris  # noqa: F401

            engine = "atheris"
        except ImportError:
            engine = "hypothesis"
    print(f"engine: {engine}, target: {args.target}, budget: "
          f"{args.runs or 'unlimited'} runs / {args.seconds:.0f} s")  # fmt: skip
    campaign = Campaign(args.target, args.findings)
    if engine == "atheris":
        run_atheris(campaign, args.runs, args.seconds)  # exits the process
    run_hypothesis(campaign, args.runs, args.seconds)
    campaign.report()
    return 1 if campaign.failures else 0


if __name__ == "__main__":
    sys.exit(main())
