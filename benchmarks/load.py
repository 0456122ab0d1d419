"""Load test of ``dicom-covid serve``: concurrent associations, nothing lost, every result once.

A associations (default 8) each send P instances (default 50) at the same time, from A SCU
processes (pynetdicom, files sent byte for byte). Each instance is a cheap distinct-UID copy of
``sample_dicoms/chest_cr_mono1.dcm`` shrunk to every 2nd row and column (416x392, 0.33 MB), its
own single-image study. The service delivers its results to a pynetdicom sink SCP in this
process that counts what it receives.

Measured:

* ingest: acknowledged instances per second (from the start signal to the last C-STORE response)
  and the median/p95/max C-STORE response time seen by the SCUs (send start to response);
* nothing lost: every acknowledged instance is in the job store;
* with ``--wait`` (default): once every job is finished (or ``--deadline`` passed), every
  candidate has exactly one SR and one SC in the job store and the sink received each result
  exactly once (and nothing else);
* processing: images/s through inference (first job start to last job end) and end to end
  (first instance received to last result delivered).

``--configs`` runs the whole test once per worker/batch configuration (``serve --workers N
--batch-size B``, written ``NxB``; default ``1x1,1x8,2x1,2x8``), each on a fresh service with
the same files, and prints a table of the figures side by side with each configuration's
inference throughput as a ratio to the first one's.

A result the sink received twice is a failure, except with ``--allow-resends`` when the job store
shows that its delivery was retried after a failed try (the sender re-sends a result whose C-STORE
response it did not get: at-least-once delivery; the serve log lines are printed).

Usage::

    .venv/bin/python benchmarks/load.py [--associations 8] [--per-association 50]
        [--quiet-period 1] [--no-wait] [--deadline 1800] [--bundle FOLDER]
        [--configs 1x1,1x8,2x1,2x8]
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import multiprocessing
import queue
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import _pacs

CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
TERMINAL = ("delivered", "failed", "dead", "skipped")


def _scu(
    index: int, files: list[str], port: int, called: str, ready, start, out
) -> None:  # pragma: no cover - runs in a child process
    """Child process: one association sending ``files``; puts its measurements on ``out``."""
    from pynetdicom import AE, _config

    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
    _config.STORE_SEND_CHUNKED_DATASET = True  # files go out byte for byte
    ae = AE(ae_title=f"LOAD{index}")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 120
    ae.add_requested_context(CR_IMAGE_STORAGE, [_pacs.EXPLICIT_LE])
    ready.put(index)
    start.wait()
    records: list[tuple[str, int, float, float]] = []
    error = ""
    t_assoc = time.time()
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    if not assoc.is_established:
        out.put((index, t_assoc, records, "association not established"))
        return
    try:
        for f in files:
            t0 = time.time()
            try:
                status = assoc.send_c_store(Path(f))
                code = int(status.Status) if status else -1
            except Exception as exc:
                code, error = -1, f"{type(exc).__name__}: {exc}"
            records.append((Path(f).stem, code, t0, time.time() - t0))
            if not assoc.is_established:
                error = error or "association lost"
                break
    finally:
        if assoc.is_established:
            assoc.release()
    out.put((index, t_assoc, records, error))


class Sink:
    """A pynetdicom storage SCP that counts the SOP Instance UIDs it receives."""

    def __init__(self) -> None:
        from pynetdicom import AE, AllStoragePresentationContexts

        self.port = _pacs.free_port()
        self.received: Counter[str] = Counter()
        self.classes: dict[str, str] = {}
        self.last = 0.0
        self._lock = threading.Lock()
        self.ae = AE(ae_title="SINK")
        self.ae.maximum_pdu_size = _pacs.MAX_PDU
        for cx in AllStoragePresentationContexts:
            self.ae.add_supported_context(
                cx.abstract_syntax, [_pacs.EXPLICIT_LE, _pacs.IMPLICIT_LE]
            )
        self._server = None

    def _on_store(self, event) -> int:
        sop = str(event.request.AffectedSOPInstanceUID)
        with self._lock:
            self.received[sop] += 1
            self.classes[sop] = str(event.request.AffectedSOPClassUID)
            self.last = time.time()
        return 0x0000

    def __enter__(self) -> Sink:
        from pynetdicom import evt

        self._server = self.ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._on_store)],
        )
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.shutdown()

    @property
    def address(self) -> str:
        return f"SINK@127.0.0.1:{self.port}"


def _store_progress(db_path: Path) -> dict[str, int]:
    with _pacs.read_store(db_path) as con:
        inst = dict(con.execute("SELECT state, COUNT(*) FROM instances GROUP BY state").fetchall())
        jobs = dict(con.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall())
    return {"instances_open": sum(n for s, n in inst.items() if s not in TERMINAL), **jobs}


def main(argv: list[str] | None = None) -> int:
    """Run the load test and print the figures; return the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--associations", type=int, default=8, help="concurrent associations")
    parser.add_argument("--per-association", type=int, default=50, help="instances each")
    parser.add_argument("--shrink", type=int, default=2, help="keep every n-th row/column")
    parser.add_argument("--per-study", type=int, default=1, help="images per study")
    parser.add_argument("--quiet-period", type=float, default=1.0, help="serve --quiet-period")
    parser.add_argument("--sample", type=Path, default=_pacs.SAMPLE, help="image to copy")
    parser.add_argument("--bundle", type=Path, default=None, help="MONAI bundle for serve")
    parser.add_argument(
        "--wait",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="wait for processing and check every result (default: on)",
    )
    parser.add_argument("--deadline", type=float, default=1800.0, help="seconds to wait")
    parser.add_argument(
        "--allow-resends",
        action="store_true",
        help="do not fail on results delivered twice after a failed try (at-least-once)",
    )
    parser.add_argument("--workdir", type=Path, default=None, help="keep files here")
    parser.add_argument(
        "--configs",
        default="1x1,1x8,2x1,2x8",
        help="comma-separated WORKERSxBATCH configurations of serve (default 1x1,1x8,2x1,2x8)",
    )
    args = parser.parse_args(argv)
    try:
        configs = [tuple(int(v) for v in c.split("x")) for c in args.configs.split(",")]
        if any(len(c) != 2 or min(c) < 1 for c in configs):
            raise ValueError
    except ValueError:
        parser.error("--configs takes WORKERSxBATCH pairs such as 1x1,2x8")
    if min(args.associations, args.per_association, args.shrink, args.per_study) < 1:
        parser.error("counts must be at least 1")
    try:
        bundle = _pacs.resolve_bundle(args.bundle)
    except _pacs.BenchmarkError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
    n_assoc, per = args.associations, args.per_association
    total = n_assoc * per
    problems: list[str] = []

    _pacs.exit_on_sigterm()
    with contextlib.ExitStack() as stack:
        if args.workdir is None:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="load-")))
        else:
            work = args.workdir
            work.mkdir(parents=True, exist_ok=True)
        print(_pacs.machine())
        files = _pacs.make_copies(
            work / "files", total, args.sample, shrink=args.shrink, per_study=args.per_study
        )
        nbytes = _pacs.warm_page_cache(files)
        sop_of = {f.stem: _sop_uid(f) for f in files}
        print(
            f"data: {total} instances ({nbytes / total / 1e6:.2f} MB each, shrink {args.shrink}), "
            f"{args.per_study} per study, {n_assoc} associations x {per}"
        )
        table = []
        for workers, batch in configs:
            print(f"\n== serve --workers {workers} --batch-size {batch}")
            figures, found = _run_config(
                args,
                bundle,
                work / f"serve-{workers}x{batch}",
                files,
                sop_of,
                nbytes,
                workers,
                batch,
            )
            problems += [f"{workers}x{batch}: {p}" for p in found]
            table.append((workers, batch, figures))
        _print_table(table)

    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    return 1 if problems else 0


def _run_config(
    args: argparse.Namespace,
    bundle: Path,
    folder: Path,
    files: list[Path],
    sop_of: dict[str, str],
    nbytes: int,
    workers: int,
    batch: int,
) -> tuple[dict[str, float], list[str]]:
    """One load run against a fresh ``serve --workers workers --batch-size batch``.

    Returns
    -------
    tuple
        The figures (``ingest``, ``inference``, ``end_to_end`` in images/s) and the problems.
    """
    n_assoc, per = args.associations, args.per_association
    total = n_assoc * per
    problems: list[str] = []
    figures: dict[str, float] = {}
    with contextlib.ExitStack() as stack:
        sink = stack.enter_context(Sink())
        serve = _pacs.Serve(
            folder,
            bundle,
            quiet_period=args.quiet_period,
            destinations=[sink.address],
            extra=[
                "--max-associations",
                str(max(8, n_assoc)),
                "--workers",
                str(workers),
                "--batch-size",
                str(batch),
            ],
        )
        stack.enter_context(serve)
        print(f"serve ready in {serve.ready_s:.1f} s (quiet period {args.quiet_period:g} s)")

        ctx = multiprocessing.get_context("spawn")
        ready, start, out = ctx.Queue(), ctx.Event(), ctx.Queue()
        procs = [
            ctx.Process(
                target=_scu,
                args=(
                    i,
                    [str(f) for f in files[i * per : (i + 1) * per]],
                    serve.port,
                    serve.ae_title,
                    ready,
                    start,
                    out,
                ),
                daemon=True,
            )
            for i in range(n_assoc)
        ]
        for p in procs:
            p.start()
        for _ in procs:
            ready.get(timeout=300)
        t_start = time.time()
        start.set()
        outcomes = []
        for _ in procs:
            try:
                outcomes.append(out.get(timeout=1800))
            except queue.Empty:
                problems.append("an SCU process did not report")
                break
        for p in procs:
            p.join(30)

        records = [r for _, _, recs, _ in outcomes for r in recs]
        for index, _, recs, error in outcomes:
            if error:
                problems.append(f"association {index}: {error} after {len(recs)} instance(s)")
        statuses = Counter(code for _, code, _, _ in records)
        acked = [stem for stem, code, _, _ in records if code == 0]
        t_last = max((t0 + dt for _, _, t0, dt in records), default=t_start)
        window = t_last - t_start
        lat_ms = [dt * 1000 for _, _, _, dt in records]
        figures["ingest"] = len(acked) / window if window > 0 else float("nan")
        print()
        print(
            f"ingest: {len(acked)}/{total} instances acknowledged over {n_assoc} concurrent "
            f"associations in {window:.2f} s: {len(acked) / window:.1f} instances/s "
            f"({len(acked) * nbytes / total / 1e6 / window:.1f} MB/s)"
        )
        print(
            f"C-STORE response time: median {_pacs.median(lat_ms):.0f} ms, "
            f"p95 {_pacs.percentile(lat_ms, 0.95):.0f} ms, max {max(lat_ms, default=0):.0f} ms; "
            f"statuses {', '.join(f'0x{c:04X}: {n}' for c, n in sorted(statuses.items()))}"
        )

        acked_uids = {sop_of[s] for s in acked}
        with _pacs.read_store(serve.db_path) as con:
            stored = {r[0] for r in con.execute("SELECT sop_instance_uid FROM instances")}
        lost = acked_uids - stored
        print(f"lost: {len(lost)} acknowledged instance(s) missing from the job store")
        if lost:
            problems.append(f"{len(lost)} acknowledged instance(s) not in the job store")

        if args.wait:
            problems += _wait_and_check(
                serve, sink, acked_uids, args.deadline, args.allow_resends, figures
            )
        code = serve.stop()
        if code not in (0, None):
            problems.append(f"dicom-covid serve exited with {code}")
    return figures, problems


def _print_table(table: list[tuple[int, int, dict[str, float]]]) -> None:
    """The configurations side by side, inference throughput as a ratio to the first."""
    if not table:
        return
    base = table[0][2].get("inference") or float("nan")
    print()
    print("workers  batch  ingest inst/s  inference images/s  end-to-end images/s  vs first")
    for workers, batch, f in table:
        inf = f.get("inference", float("nan"))
        print(
            f"{workers:>7}  {batch:>5}  {f.get('ingest', float('nan')):>13.1f}  {inf:>18.2f}  "
            f"{f.get('end_to_end', float('nan')):>19.2f}  {inf / base:>7.2f}x"
        )


def _sop_uid(path: Path) -> str:
    import pydicom

    return str(pydicom.filereader.read_file_meta_info(path).MediaStorageSOPInstanceUID)


def _wait_and_check(
    serve: _pacs.Serve,
    sink: Sink,
    acked: set[str],
    deadline_s: float,
    allow_resends: bool,
    figures: dict[str, float],
) -> list[str]:
    """Wait for every job to finish, then check results and deliveries; return problems.

    Puts the ``inference`` and ``end_to_end`` throughputs (images/s) in ``figures``.
    """
    problems: list[str] = []
    deadline = time.monotonic() + deadline_s
    t0 = time.monotonic()
    while True:
        progress = _store_progress(serve.db_path)
        open_jobs = progress.get("grouped", 0) + progress.get("running", 0)
        pending_jobs = progress.get("results_written", 0)
        if progress["instances_open"] == 0 and open_jobs == 0 and pending_jobs == 0:
            break
        if time.monotonic() > deadline:
            problems.append(f"processing not finished after {deadline_s:.0f} s: {progress}")
            break
        time.sleep(0.5)
    waited = time.monotonic() - t0
    with _pacs.read_store(serve.db_path) as con:
        inst = {
            r["sop_instance_uid"]: r["state"]
            for r in con.execute("SELECT sop_instance_uid, state FROM instances")
        }
        results = con.execute("SELECT source_sop_instance_uid, kind, sop_instance_uid FROM results")
        kinds: dict[str, Counter[str]] = {}
        result_uids: set[str] = set()
        for src, kind, uid in results:
            kinds.setdefault(src, Counter())[kind] += 1
            result_uids.add(uid)
        span = con.execute(
            "SELECT MIN(started_at), MAX(finished_at) FROM jobs WHERE finished_at IS NOT NULL"
        ).fetchone()
        per_job = [
            r[0]
            for r in con.execute(
                "SELECT finished_at - started_at FROM jobs WHERE finished_at IS NOT NULL"
            )
        ]
        tries = dict(
            con.execute(
                "SELECT r.sop_instance_uid, MAX(d.tries) FROM deliveries d "
                "JOIN results r ON r.id = d.result_id GROUP BY r.sop_instance_uid"
            ).fetchall()
        )
        first_rx = con.execute("SELECT MIN(received_at) FROM instances").fetchone()[0]
        last_dl = con.execute("SELECT MAX(delivered_at) FROM jobs").fetchone()[0]
    candidates = [u for u in acked if inst.get(u) not in ("skipped", None)]
    failed = [u for u in candidates if inst[u] == "failed"]
    bad = [u for u in candidates if kinds.get(u, Counter()) != Counter({"sr": 1, "sc": 1})]
    dup = [u for u, n in sink.received.items() if n > 1]
    resent = [u for u in dup if (tries.get(u) or 0) > 1]  # retried after a failed try
    missing = result_uids - set(sink.received)
    extra = set(sink.received) - result_uids
    analysed = len(candidates) - len(failed)
    print(f"processing finished {waited:.1f} s after the last C-STORE response")
    if span[0] is not None and span[1] > span[0]:
        figures["inference"] = analysed / (span[1] - span[0])
        print(
            f"inference: {analysed} image(s) in {span[1] - span[0]:.1f} s (first job start to last "
            f"job end): {analysed / (span[1] - span[0]):.2f} images/s; per job (claim to "
            f"every image's SR + SC written and recorded, batches included) median "
            f"{_pacs.median(per_job):.2f} s, p95 {_pacs.percentile(per_job, 0.95):.2f} s"
        )
    if first_rx is not None and last_dl is not None and last_dl > first_rx:
        figures["end_to_end"] = analysed / (last_dl - first_rx)
        print(
            f"end to end: {analysed} image(s) from first received to last delivered in "
            f"{last_dl - first_rx:.1f} s: {analysed / (last_dl - first_rx):.2f} images/s"
        )
    print(
        f"results: {len(candidates)} candidate(s), {len(failed)} failed, "
        f"{len(candidates) - len(bad)} with exactly one SR + one SC; sink received "
        f"{sum(sink.received.values())} object(s): {len(dup)} more than once, "
        f"{len(missing)} missing, {len(extra)} unexpected"
    )
    retried = sum(1 for n in tries.values() if (n or 0) > 1)
    print(
        f"deliveries retried: {retried}; duplicates that follow a failed try (at-least-once "
        f"re-send): {len(resent)}; duplicates without one: {len(dup) - len(resent)}"
    )
    for line in serve.log().splitlines():
        if "not delivered" in line or "unexpected" in line.lower() or " ERROR " in line:
            print(f"  serve log: {line[:240]}")
    if failed:
        problems.append(f"{len(failed)} image(s) failed in the worker")
    if bad:
        problems.append(f"{len(bad)} candidate(s) without exactly one SR + one SC")
    if missing or extra or len(dup) > len(resent):
        problems.append("the sink did not receive every result exactly once")
    elif resent and not allow_resends:
        problems.append(
            f"{len(resent)} result(s) reached the sink twice: re-sent after a C-STORE whose "
            "response was lost (see the serve log lines above; --allow-resends accepts this)"
        )
    return problems


if __name__ == "__main__":
    sys.exit(main())
