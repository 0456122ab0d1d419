"""Property-based fuzzing (hypothesis) of the reader and of the receive path.

Random mutations of small chest radiographs in every accepted encoding (``tests/fuzzing.py``):
header field changes, byte flips, truncations, insertions, deletions and overwrites. Nothing may
escape but the documented rejections: ``InputRejected`` with a known reason from the reader, and
0xA900/0xC210 (never 0xC211, the "unexpected error" status) from the listener's C-STORE handler;
what the handler acknowledges is recorded as skipped with a known reason, or spooled and queued
as a job whose image the worker reads without any other exception. A few mutations go through a
live listener over the network, which must keep serving.

The budget is bounded for CI (fixed seed, ``derandomize``, about 400 + 300 + 20 examples);
``benchmarks/fuzz.py`` runs the same properties for longer (atheris or hypothesis).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from badinputs import send_exact
from fuzzing import (
    HEADER_FIELDS,
    RECEIVE_STATUSES,
    Mutation,
    ReceivePath,
    apply,
    check_reader,
    check_receive,
    seeds,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pacs_helpers import echo, free_port

pytestmark = [
    pytest.mark.timeout(240),
    # the fuzzed inputs are invalid on purpose: pydicom warns about each of them while reading
    # (bad UIDs, VR mismatches, odd RLE padding, unknown encodings); what the tests check is
    # that every input ends in a known rejection reason or status, not these warnings
    pytest.mark.filterwarnings("ignore::UserWarning:pydicom"),
]

OPS = ("flip",) * 4 + ("overwrite",) * 3 + ("truncate", "insert", "delete")
_SETTINGS = dict(
    deadline=None,
    derandomize=True,  # the same examples on every run: CI failures reproduce
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
STATS: dict[str, dict[str, int]] = {}


@st.composite
def mutations(draw, max_ops: int = 3) -> Mutation:
    """A seed, up to two header field changes, then up to ``max_ops`` byte operations.

    Length-preserving operations (flip, overwrite) are drawn more often than the ones that
    shift or cut the data (truncate, insert, delete), which nearly always end in "corrupt".
    """
    seed = draw(st.sampled_from(seeds()))
    header = draw(
        st.lists(
            st.tuples(
                st.integers(0, len(HEADER_FIELDS) - 1),
                st.integers(-1, 40).map(lambda v: None if v < 0 else v),  # None: delete it
            ),
            max_size=2,
        )
    )
    ops = draw(
        st.lists(
            st.tuples(
                st.sampled_from(OPS),
                # most headers end within 2 KiB: aim half of the operations there
                st.one_of(st.integers(0, 2048), st.integers(0, 2**20)),
                st.integers(1, 64),
                st.binary(min_size=1, max_size=16),
            ),
            max_size=max_ops,
        )
    )
    return Mutation(seed, tuple(header), tuple(ops))


def _count(kind: str, outcome: str) -> None:
    STATS.setdefault(kind, {})
    STATS[kind][outcome] = STATS[kind].get(outcome, 0) + 1


def test_seeds_are_valid() -> None:
    """Unmutated seeds are read as images (so mutations start from something valid)."""
    names = seeds()
    assert {"explicit_le", "implicit_le", "big_endian", "deflated", "rle"} <= set(names)
    for name in names:
        assert check_reader(apply(Mutation(name)).data) == "ok", name


@settings(max_examples=400, **_SETTINGS)
@given(m=mutations())
def test_reader_rejects_only_with_known_reasons(m: Mutation) -> None:
    _count("reader", check_reader(apply(m).data))


@pytest.fixture(scope="module")
def receive(tmp_path_factory):
    path = ReceivePath(tmp_path_factory.mktemp("receive"))
    yield path
    path.close()


@settings(max_examples=300, **_SETTINGS)
@given(m=mutations())
def test_receive_path_answers_only_documented_statuses(receive: ReceivePath, m: Mutation) -> None:
    _count("receive", check_receive(receive, apply(m)).split(":")[0])


@pytest.fixture(scope="module")
def live_listener(tmp_path_factory):
    from pacs_listener.config import ScpConfig
    from pacs_listener.jobs import JobStore
    from pacs_listener.scp import StorageSCP
    from pacs_listener.spool import Spool

    root = tmp_path_factory.mktemp("live")
    store = JobStore(root / "jobs.sqlite")
    scp = StorageSCP(ScpConfig(port=free_port(), min_free_bytes=0), store, Spool(root / "spool"))
    scp.start()
    yield scp, store, root
    scp.stop()
    store.close()


@settings(max_examples=20, **_SETTINGS)
@given(m=mutations(max_ops=2))
def test_live_listener_survives_mutations(live_listener, m: Mutation) -> None:
    scp, store, root = live_listener
    mutated = apply(m)
    sop = mutated.sop_instance
    path = root / "case.dcm"
    path.write_bytes(mutated.data)
    status = send_exact(path, scp.address[1])
    assert status is None or status in RECEIVE_STATUSES, status  # None: context not accepted
    assert (store.instance(sop) is not None) == (status == 0)
    _count("live", "none" if status is None else f"0x{status:04X}")
    assert echo(scp.address[1], calling="ANY")[:2] == (True, 0)


def test_report(record_property) -> None:
    """Print what the fuzzing above saw (runs last in this module)."""
    total = sum(sum(v.values()) for v in STATS.values())
    record_property("fuzz_executions", total)
    print(f"\nfuzz executions: {total}")
    for kind, outcomes in STATS.items():
        print(f"  {kind}: " + ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items())))
    assert total >= 300  # hypothesis ran the budget (shrinking aside)
    assert len(STATS.get("reader", {})) >= 5  # the mutations reach several outcomes
    _ = time, Path
