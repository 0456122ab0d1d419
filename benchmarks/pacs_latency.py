"""End-to-end latency of the PACS loop: storescu → Orthanc → dicom-covid serve → Orthanc.

A real Orthanc runs on loopback with ``deploy/orthanc/`` (``orthanc.json`` + ``forward.lua``,
started by ``tests/orthanc.py``) and a real ``dicom-covid serve`` subprocess sends its results
back to it. N single-image studies (distinct-UID copies of ``sample_dicoms/chest_cr_mono1.dcm``)
are sent one at a time with dcmtk ``storescu``. For each study the clock runs from storescu's
exit to the moment Orthanc's REST API lists both the SR and the Secondary Capture in the study
(polled every 100 ms); the next study is sent only then, so studies never queue behind each
other.

The latency is mostly waiting that is configuration, not work: Orthanc's ``StableAge`` (and its
once-a-second stability check), the service's ``--quiet-period`` and the polling intervals of
the service's grouper, worker (0.5 s) and sender (1 s). The job store (``jobs.sqlite`` in the
state folder) keeps a timestamp per stage, so the latency is split into::

    storescu exit ─► received by serve   StableAge, Orthanc's stability check, Lua forward
      ─► grouped                         quiet period (+ grouper poll)
      ─► inference started               worker poll (0.5 s)
      ─► results written                 analysis: read, inference, Grad-CAM, SR + SC
      ─► delivered                       sender poll (1 s) + C-STORE to Orthanc
      ─► listed by Orthanc's REST API    indexing + our 100 ms poll

Usage::

    .venv/bin/python benchmarks/pacs_latency.py [--n 20] [--quiet-period 1] [--stable-age 1]
        [--bundle FOLDER]

Prints the median and p95 of the end-to-end latency and of each stage, in seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path

import _pacs

STAGES = [
    ("exit", "received", "storescu exit -> received (StableAge + Lua forward)"),
    ("received", "grouped", "received -> grouped (quiet period)"),
    ("grouped", "started", "grouped -> inference started (worker poll)"),
    ("started", "finished", "inference started -> results written (analysis)"),
    ("finished", "delivered", "results written -> delivered (sender poll + C-STORE)"),
    ("delivered", "listed", "delivered -> listed by Orthanc REST (poll 0.1 s)"),
]


def _results_listed(pacs, study_id: str) -> bool:
    """True when the study holds an SR series and a further non-CR/DX series (the SC)."""
    series = pacs.get(f"/studies/{study_id}/series")
    modalities = [str(s.get("MainDicomTags", {}).get("Modality", "")) for s in series]
    others = [m for m in modalities if m not in ("CR", "DX", "SR")]
    return "SR" in modalities and len(others) >= 1


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the figures; return the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20, help="timed studies (at least 20)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed studies sent first")
    parser.add_argument("--quiet-period", type=float, default=1.0, help="serve --quiet-period")
    parser.add_argument("--stable-age", type=int, default=1, help="Orthanc StableAge, seconds")
    parser.add_argument("--sample", type=Path, default=_pacs.SAMPLE, help="image to copy")
    parser.add_argument("--bundle", type=Path, default=None, help="MONAI bundle for serve")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds per study")
    parser.add_argument("--workdir", type=Path, default=None, help="keep files here")
    parser.add_argument(
        "--smoke", action="store_true", help="allow --n below 20 (a test run, not a figure)"
    )
    args = parser.parse_args(argv)
    if args.n < 1 or (args.n < 20 and not args.smoke):
        parser.error("--n must be at least 20 for a median/p95 worth reporting (or pass --smoke)")
    try:
        bundle = _pacs.resolve_bundle(args.bundle)
        _pacs.require_tool("storescu")
        orthanc = _pacs.orthanc_module()
        if not orthanc.available():
            raise _pacs.BenchmarkError("Orthanc is not installed (apt install orthanc)")
    except _pacs.BenchmarkError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    import pydicom

    _pacs.exit_on_sigterm()
    latencies: list[float] = []
    marks: dict[str, dict[str, float]] = {}
    with contextlib.ExitStack() as stack:
        if args.workdir is None:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="latency-")))
        else:
            work = args.workdir
            work.mkdir(parents=True, exist_ok=True)
        print(_pacs.machine())
        files = _pacs.make_copies(work / "files", args.warmup + args.n, args.sample)
        studies = [str(pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID) for f in files]
        serve_port = _pacs.free_port()
        pacs = stack.enter_context(
            orthanc.running_orthanc(
                work / "orthanc", dicomcovid_port=serve_port, stable_age=args.stable_age
            )
        )
        serve = _pacs.Serve(
            work / "serve",
            bundle,
            quiet_period=args.quiet_period,
            destinations=[f"ORTHANC@127.0.0.1:{pacs.dicom_port}"],
            port=serve_port,
            extra=["--allow-ae", "ORTHANC@127.0.0.1"],
            calling="ORTHANC",
        )
        stack.enter_context(serve)
        print(
            f"Orthanc {pacs.get('/system')['Version']} (StableAge {args.stable_age} s) and "
            f"dicom-covid serve (quiet period {args.quiet_period:g} s) ready; serve started in "
            f"{serve.ready_s:.1f} s"
        )
        for i, (path, study) in enumerate(zip(files, studies, strict=True)):
            _pacs.storescu([path], pacs.dicom_port, "ORTHANC", calling="MODALITY")
            t_exit = time.time()
            study_id = pacs.study_id(study)
            if study_id is None:
                print(f"error: Orthanc does not list study {study}", file=sys.stderr)
                return 1
            deadline = time.monotonic() + args.timeout
            while not _results_listed(pacs, study_id):
                if time.monotonic() > deadline:
                    print(
                        f"error: no SR + SC for study {study} after {args.timeout} s\n"
                        f"--- serve log ---\n{serve.log()[-3000:]}\n"
                        f"--- Orthanc log ---\n{pacs.log()[-2000:]}",
                        file=sys.stderr,
                    )
                    return 1
                time.sleep(0.1)
            t_seen = time.time()
            if i < args.warmup:
                continue
            latencies.append(t_seen - t_exit)
            marks[study] = {"exit": t_exit, "listed": t_seen}
        # Orthanc may list a result a moment before serve records the confirmation
        deadline = time.monotonic() + 30
        while True:
            stages = _pacs.job_stages(serve.db_path)
            done = [stages.get(s, {}).get("delivered") is not None for s in marks]
            if all(done) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        code = serve.stop()

    print()
    print(f"end-to-end latency over {len(latencies)} studies (storescu exit -> SR+SC in Orthanc)")
    med, p95 = _pacs.median(latencies), _pacs.percentile(latencies, 0.95)
    print(
        f"  median {med:6.2f} s   p95 {p95:6.2f} s   "
        f"min {min(latencies):.2f} s   max {max(latencies):.2f} s"
    )
    rows = []
    for study, m in marks.items():
        s = stages.get(study)
        if s is None or any(
            s[k] is None for k in ("received", "grouped", "started", "finished", "delivered")
        ):
            continue
        rows.append(
            {
                **m,
                **{
                    k: float(s[k])
                    for k in ("received", "grouped", "started", "finished", "delivered")
                },
            }
        )
    print(f"per stage, from the job store ({len(rows)} studies):")
    print(f"  {'stage':<58}{'median s':>9}{'p95 s':>8}")
    for a, b, label in STAGES:
        vals = [r[b] - r[a] for r in rows]
        print(f"  {label:<58}{_pacs.median(vals):>9.2f}{_pacs.percentile(vals, 0.95):>8.2f}")
    config_s = args.stable_age + args.quiet_period
    print(
        f"configuration in the latency: StableAge {args.stable_age} s + quiet period "
        f"{args.quiet_period:g} s = {config_s:g} s, plus polling: Orthanc's stability check "
        f"(~1 s), grouper ({_pacs.GROUPER_INTERVAL}), worker {_pacs.WORKER_POLL_S} s, "
        f"sender {_pacs.SENDER_POLL_S} s"
    )
    work_s = [r["finished"] - r["started"] for r in rows]
    print(
        f"work (analysis) median {_pacs.median(work_s):.2f} s = "
        f"{_pacs.median(work_s) / _pacs.median(latencies):.0%} of the median latency"
    )
    if args.smoke:
        print("SMOKE RUN: fewer than 20 studies, p95 is not meaningful")
    if code not in (0, None):
        print(f"error: dicom-covid serve exited with {code}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
