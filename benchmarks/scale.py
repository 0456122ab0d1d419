"""Scale-out benchmark: worker nodes sharing one PostgreSQL job store, and the queue's cost.

Two measurements, printed side by side:

1. **Queue overhead per job** on each backend (SQLite in a state folder, PostgreSQL on
   loopback): for ``--overhead-jobs`` one-image jobs already grouped, the median and p95 of
   the claim (``claim_jobs``, one transaction that locks the job) and of the commit of its
   results (``record_results`` of an SR and an SC with a delivery each, then ``finish_job``,
   both checking the worker still holds the lease). Nothing else runs meanwhile.
2. **Inference throughput with 1, 2 and 4 worker processes** (``--workers``): for each count K,
   K ``dicom-covid serve --role worker`` nodes (one worker process each, one torch thread each,
   batches of ``--batch-size``) on a new database of the same PostgreSQL cluster and a shared
   storage root. Once every node has loaded the model, ``--images`` single-image studies
   (``sample_dicoms/chest_cr_mono1.dcm`` shrunk to every 2nd row and column, distinct UIDs) are
   queued at once, as listeners would; throughput is images / (last job finished - first job
   started), with how many jobs each node did.

The PostgreSQL server is a throw-away cluster (``tests/postgres.py``: ``initdb`` + ``pg_ctl``
on a free loopback port) with ``fsync=on`` as in production, and SQLite runs as ``serve`` runs
it (WAL, ``synchronous=FULL``): both figures include flushing each commit to this disk.
On a 2-core machine the throughput curve flattens at 2 workers: every worker process needs a
core.

Usage::

    .venv/bin/python benchmarks/scale.py [--workers 1,2,4] [--images 64] [--batch-size 4]
        [--overhead-jobs 300] [--bundle FOLDER]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _pacs
import pydicom

from pacs_listener.jobs import JobStore, ResultFile


def _ms(values: list[float], q: float) -> float:
    return _pacs.percentile(values, q / 100.0) * 1000.0


def queue_overhead(store: JobStore, n: int, folder: Path) -> dict[str, float]:
    """Median/p95 milliseconds of a claim and of a result commit on ``store``."""
    for i in range(n):
        store.add_instance(f"1.2.826.0.1.3680043.10.9.{i}", f"1.2.9.{i}", path=folder / f"{i}.dcm")
    store.group_stable_studies(0.0)
    claim, commit = [], []
    for _ in range(n):
        t0 = time.perf_counter()
        (job,) = store.claim_jobs("bench/worker-1", 1)
        t1 = time.perf_counter()
        (inst,) = store.job_instances(job.id)
        files = [
            ResultFile(k, f"{inst.sop_instance_uid}.{k}", job.study_instance_uid, folder / k)
            for k in ("sr", "sc")
        ]
        t2 = time.perf_counter()
        store.record_results(
            job.id, inst.sop_instance_uid, files, ["PACS@127.0.0.1:4242"], worker="bench/worker-1"
        )
        store.finish_job(job.id, worker="bench/worker-1")
        t3 = time.perf_counter()
        claim.append(t1 - t0)
        commit.append(t3 - t2)
    return {
        "claim_median_ms": _ms(claim, 50),
        "claim_p95_ms": _ms(claim, 95),
        "commit_median_ms": _ms(commit, 50),
        "commit_p95_ms": _ms(commit, 95),
        "per_job_median_ms": _ms([a + b for a, b in zip(claim, commit, strict=True)], 50),
    }


def _images(folder: Path, n: int) -> tuple[list[pydicom.Dataset], list[Path]]:
    """``n`` single-image studies: the sample CR, every 2nd row and column, fresh UIDs."""
    paths = _pacs.make_copies(folder, n, shrink=2, prefix="scale")
    return [pydicom.dcmread(p, stop_before_pixels=True) for p in paths], paths


def throughput(
    url: str, k: int, images: int, batch: int, bundle: Path, folder: Path
) -> dict[str, float]:
    """Images/s through inference with ``k`` worker nodes on the store at ``url``."""
    storage = folder / "storage"
    config = folder / "worker.toml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text("[worker]\nthreads = 1\n")
    nodes: list[tuple[subprocess.Popen, Path]] = []
    try:
        for i in range(k):
            log = folder / f"node{i + 1}.log"
            cmd = [
                *_pacs.cli(),
                "serve",
                "--config",
                str(config),
                "--role",
                "worker",
                "--job-store",
                url,
                "--storage-root",
                str(storage),
                "--state-dir",
                str(folder / f"node{i + 1}"),
                "--node-id",
                f"node{i + 1}",
                "--bundle",
                str(bundle),
                "--workers",
                "1",
                "--batch-size",
                str(batch),
                "--output-dir",
                str(folder / "out"),
                "--min-free-mb",
                "0",
            ]
            with log.open("wb") as out:
                nodes.append((subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT), log))
        deadline = time.monotonic() + 600
        for proc, log in nodes:
            while "service running" not in log.read_text(errors="replace"):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise _pacs.BenchmarkError(f"worker node not ready:\n{log.read_text()[-3000:]}")
                time.sleep(0.2)
        datasets, paths = _images(storage / "spool" / "bench", images)
        with JobStore(url, root=storage) as store:
            for ds, path in zip(datasets, paths, strict=True):
                store.add_instance(
                    str(ds.SOPInstanceUID),
                    str(ds.StudyInstanceUID),
                    series_instance_uid=str(ds.SeriesInstanceUID),
                    sop_class_uid=str(ds.SOPClassUID),
                    path=path,
                )
            store.group_stable_studies(0.0)
            while True:
                c = store.counts()["jobs"]
                if c["grouped"] + c["running"] + c["waiting_for_disk"] == 0:
                    break
                if time.monotonic() > deadline + 1800:
                    raise _pacs.BenchmarkError(f"jobs left unfinished: {c}")
                time.sleep(0.5)
            con = store._con()
            first, last, failed = con.execute(
                "SELECT MIN(started_at), MAX(finished_at), "
                "SUM(CASE WHEN state = 'failed' THEN 1 ELSE 0 END) FROM jobs"
            ).fetchone()
            per_node = dict(
                con.execute(
                    "SELECT split_part(claimed_by, '/', 1), COUNT(*) FROM jobs GROUP BY 1 "
                    "ORDER BY 1"
                ).fetchall()
            )
    finally:
        for proc, _ in nodes:
            proc.terminate()
        for proc, _ in nodes:
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                proc.kill()
    return {
        "images_per_s": images / (last - first),
        "seconds": last - first,
        "failed": int(failed or 0),
        "per_node": per_node,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", default="1,2,4", help="worker process counts (default 1,2,4)")
    parser.add_argument("--images", type=int, default=64, help="images per run (default 64)")
    parser.add_argument("--batch-size", type=int, default=4, help="serve --batch-size (4)")
    parser.add_argument("--overhead-jobs", type=int, default=300, help="jobs timed per backend")
    parser.add_argument("--bundle", type=Path, default=None, help="MONAI bundle (default: ours)")
    args = parser.parse_args(argv)
    counts = [int(k) for k in args.workers.split(",")]
    bundle = _pacs.resolve_bundle(args.bundle)
    postgres = _pacs.tests_module("postgres")  # throw-away PostgreSQL clusters
    print(f"# {_pacs.machine()}")
    with (
        tempfile.TemporaryDirectory(prefix="dicom-covid-scale-") as tmp,
        postgres.running_postgres(fsync=True) as pg,
    ):
        root = Path(tmp)
        print("\nqueue overhead per job (claim; results commit = record_results + finish_job)")
        print(f"{'backend':<12}{'claim ms':>10}{'p95':>8}{'commit ms':>11}{'p95':>8}{'per job':>9}")
        overhead = {}
        for name in ("sqlite", "postgresql"):
            location = root / "q" / "jobs.sqlite" if name == "sqlite" else pg.new_database()
            with JobStore(location, root=root / "q") as store:
                o = overhead[name] = queue_overhead(store, args.overhead_jobs, root / "q")
            print(
                f"{name:<12}{o['claim_median_ms']:>10.2f}{o['claim_p95_ms']:>8.2f}"
                f"{o['commit_median_ms']:>11.2f}{o['commit_p95_ms']:>8.2f}"
                f"{o['per_job_median_ms']:>9.2f}"
            )
        ratio = (
            overhead["postgresql"]["per_job_median_ms"] / overhead["sqlite"]["per_job_median_ms"]
        )
        print(f"PostgreSQL / SQLite per job: {ratio:.2f}x")
        print(
            f"\ninference throughput, {args.images} images (416x392), worker nodes of one "
            f"process and one torch thread each, batch {args.batch_size}, one PostgreSQL"
        )
        print(f"{'workers':>8}{'images/s':>10}{'x 1':>7}{'seconds':>9}  jobs per node")
        base = None
        for k in counts:
            r = throughput(
                pg.new_database(), k, args.images, args.batch_size, bundle, root / f"w{k}"
            )
            base = base or r["images_per_s"]
            nodes = ", ".join(f"{n} {c}" for n, c in r["per_node"].items())
            print(
                f"{k:>8}{r['images_per_s']:>10.2f}{r['images_per_s'] / base:>7.2f}"
                f"{r['seconds']:>9.1f}  {nodes}"
                + (f"  ({r['failed']} failed)" if r["failed"] else "")
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
