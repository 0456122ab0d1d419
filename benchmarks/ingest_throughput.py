"""Ingest throughput of ``dicom-covid serve``'s SCP against dcmtk storescp and a bare SCP.

The same M files (distinct-UID copies of ``sample_dicoms/chest_cr_mono1.dcm``, Explicit VR Little
Endian) are sent by one dcmtk ``storescu`` call (one association, M C-STOREs) to each of three
SCPs running side by side in this run:

* ``storescp``: dcmtk's storage SCP writing the received data sets byte for byte (``+B``) into a
  temporary folder, without fsync (its default), run with ``TCP_NODELAY=1``;
* ``storescp-nagle`` (for information): the same with dcmtk's default socket option. Debian's
  dcmtk 3.6.7 leaves Nagle's algorithm on, so each C-STORE response waits for the sender's
  delayed ACK (~40 ms on loopback): this row measures that artefact, not storage work;
* ``bare``: a pynetdicom SCP whose handler only spools durably (tmp file, fsync, rename, fsync
  folder; see ``_pacs.run_bare_scp``), the floor for the service's design;
* ``bare-nofsync`` (for information): the same without the two fsyncs, which separates
  pynetdicom's own cost from the disk's;
* ``serve``: ``dicom-covid serve`` with a quiet period of a day, so no job is grouped and the
  worker stays idle: only the listener (header parse, triage, spool, SQLite record) is measured.

All three run with a 64 KiB maximum PDU and store Explicit VR Little Endian (checked on one stored
file of each). Time is storescu's wall time (association set-up, M C-STOREs, release; the
process start, a few ms, is the same for all). Each round sends a fresh set of files to every SCP,
in rotating order; the figure per SCP is the median over rounds.

Usage::

    .venv/bin/python benchmarks/ingest_throughput.py [--instances 100] [--rounds 3]
        [--bundle FOLDER] [--sample FILE]

Prints instances/s and MB/s per SCP and the ratios serve/storescp and serve/bare.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from pathlib import Path

import _pacs


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the figures; return the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=100, help="instances per send (M)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (fresh files each)")
    parser.add_argument("--sample", type=Path, default=_pacs.SAMPLE, help="image to copy")
    parser.add_argument("--bundle", type=Path, default=None, help="MONAI bundle for serve")
    parser.add_argument("--workdir", type=Path, default=None, help="keep files here")
    args = parser.parse_args(argv)
    if args.instances < 1 or args.rounds < 1:
        parser.error("--instances and --rounds must be at least 1")
    try:
        bundle = _pacs.resolve_bundle(args.bundle)
        _pacs.require_tool("storescu")
        _pacs.require_tool("storescp")
    except _pacs.BenchmarkError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    _pacs.exit_on_sigterm()
    with contextlib.ExitStack() as stack:
        if args.workdir is None:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ingest-")))
        else:
            work = args.workdir
            work.mkdir(parents=True, exist_ok=True)
        print(_pacs.machine())
        sets = [
            _pacs.make_copies(work / f"files{r}", args.instances, args.sample, prefix=f"r{r}-")
            for r in range(args.rounds)
        ]
        nbytes = _pacs.warm_page_cache(sets[0])
        mb_per_send = nbytes / 1e6
        print(
            f"data: {args.instances} x {args.sample.name} ({mb_per_send / args.instances:.2f} MB "
            f"each, {mb_per_send:.1f} MB per send), {args.rounds} round(s)"
        )
        for files in sets[1:]:
            _pacs.warm_page_cache(files)

        storescp_port = stack.enter_context(_pacs.dcmtk_storescp(work / "storescp"))
        nagle_port = stack.enter_context(
            _pacs.dcmtk_storescp(work / "storescp-nagle", nodelay=False)
        )
        bare_port = stack.enter_context(_pacs.bare_scp(work / "bare"))
        nofsync_port = stack.enter_context(_pacs.bare_scp(work / "bare-nofsync", fsync=False))
        serve = _pacs.Serve(work / "serve", bundle, quiet_period=86400.0)
        stack.enter_context(serve)
        print(f"serve ready in {serve.ready_s:.1f} s (model loaded, worker idle)")
        scps = {
            "storescp": (storescp_port, "STORESCP"),
            "storescp-nagle": (nagle_port, "STORESCP"),
            "bare": (bare_port, "BARE"),
            "bare-nofsync": (nofsync_port, "BARE"),
            "serve": (serve.port, serve.ae_title),
        }
        names = list(scps)
        times: dict[str, list[float]] = {n: [] for n in names}
        for r, files in enumerate(sets):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                port, ae = scps[name]
                times[name].append(_pacs.storescu(files, port, ae))
            print(
                f"round {r + 1}: "
                + ", ".join(f"{n} {args.instances / times[n][-1]:.1f}/s" for n in order)
            )

        # everything arrived, in the same transfer syntax
        total = args.instances * args.rounds
        got_storescp = [p for p in (work / "storescp").iterdir() if p.is_file()]
        got_nagle = [p for p in (work / "storescp-nagle").iterdir() if p.is_file()]
        got_bare = sorted((work / "bare").glob("*.dcm"))
        got_nofsync = sorted((work / "bare-nofsync").glob("*.dcm"))
        with _pacs.read_store(serve.db_path) as con:
            got_serve = dict(
                con.execute("SELECT state, COUNT(*) FROM instances GROUP BY state").fetchall()
            )
        spooled = sorted((serve.state_dir / "spool").rglob("*.dcm"))
        counts = {
            "storescp": len(got_storescp),
            "storescp-nagle": len(got_nagle),
            "bare": len(got_bare),
            "bare-nofsync": len(got_nofsync),
            "serve": got_serve.get("received", 0),
        }
        syntaxes = {
            "storescp": _pacs.transfer_syntax(got_storescp[0]) if got_storescp else "-",
            "storescp-nagle": _pacs.transfer_syntax(got_nagle[0]) if got_nagle else "-",
            "bare": _pacs.transfer_syntax(got_bare[0]) if got_bare else "-",
            "bare-nofsync": _pacs.transfer_syntax(got_nofsync[0]) if got_nofsync else "-",
            "serve": _pacs.transfer_syntax(spooled[0]) if spooled else "-",
        }
        code = serve.stop()

    rates = {n: [args.instances / t for t in times[n]] for n in names}
    med = {n: _pacs.median(rates[n]) for n in names}
    print()
    print(f"{'SCP':<16}{'inst/s':>9}{'MB/s':>8}{'min':>8}{'max':>8}  stored  transfer syntax")
    for n in names:
        print(
            f"{n:<16}{med[n]:>9.1f}{med[n] * mb_per_send / args.instances:>8.1f}"
            f"{min(rates[n]):>8.1f}{max(rates[n]):>8.1f}  {counts[n]:>4}/{total}  {syntaxes[n]}"
        )
    print(f"ratio serve/storescp: {med['serve'] / med['storescp']:.2f}")
    print(f"ratio serve/bare:     {med['serve'] / med['bare']:.2f}")
    ok = all(counts[n] == total for n in names) and len(set(syntaxes.values())) == 1
    if code not in (0, None):
        print(f"error: dicom-covid serve exited with {code}", file=sys.stderr)
        ok = False
    if not ok:
        print("error: not every instance was stored, or transfer syntaxes differ", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
