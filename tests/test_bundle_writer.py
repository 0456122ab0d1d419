"""BundleWriter: atomic writes into a bundle, one place that changes ``metadata.json``.

Two kinds of test: writes that are interrupted (an exception from inside the write after the
temporary file exists, a replace that fails) leave the previous file and no temporary file; and a
structural check over the package source that every write call outside
:mod:`dicom_covid.bundle_writer` is a known report or run-folder writer, none of them aimed at a
bundle.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
from pathlib import Path

import pytest
from helpers import ROOT

from dicom_covid.bundle import Bundle
from dicom_covid.bundle_writer import BundleWriter, atomic_write, fp16_state_dict, save_weights
from dicom_covid.errors import BundleError

PACKAGE = ROOT / "dicom_covid"
META = ROOT / "monai_bundle" / "configs" / "metadata.json"
SCHEMA = ROOT.parent / "shared" / "monai" / "meta_schema_20240725.json"


@pytest.fixture
def bundle_dir(tmp_path: Path) -> Path:
    """A bundle folder holding a copy of the project's metadata and one facts file."""
    root = tmp_path / "bundle"
    (root / "configs").mkdir(parents=True)
    (root / "models").mkdir()
    shutil.copyfile(META, root / "configs" / "metadata.json")
    return root


def _temp_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.name.endswith(".tmp"))


# --------------------------------------------------------------------------------------------
# atomic writes
# --------------------------------------------------------------------------------------------


def test_write_json_reads_back_in_the_bundle_format(bundle_dir: Path) -> None:
    writer = BundleWriter(bundle_dir)
    obj = {"name": "x", "labels": ["covid", "normal"], "covid_threshold": 0.25, "nested": {}}
    path = writer.write_json("models/x.json", obj)
    assert path == bundle_dir / "models" / "x.json"
    assert path.read_text() == json.dumps(obj, indent=2) + "\n"  # what the code wrote before
    assert json.loads(path.read_text()) == obj
    assert writer.written == [path]
    assert _temp_files(path.parent) == []


def test_files_get_the_umask_permissions(bundle_dir: Path) -> None:
    old = os.umask(0o022)
    try:
        path = BundleWriter(bundle_dir).write_json("models/y.json", {"a": 1})
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644


def test_interrupted_write_keeps_the_previous_metadata(bundle_dir: Path) -> None:
    """An exception from inside the write, after the temporary file exists, changes nothing."""
    meta = bundle_dir / "configs" / "metadata.json"
    before = meta.read_bytes()
    seen: list[list[tuple[Path, int]]] = []

    def write_half_then_fail(fh) -> None:
        fh.write(before[: len(before) // 2])
        fh.flush()
        seen.append([(p, p.stat().st_size) for p in _temp_files(meta.parent)])
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        atomic_write(meta, write_half_then_fail)
    assert len(seen[0]) == 1 and seen[0][0][1] > 0  # the temp file was there, half written
    assert meta.read_bytes() == before
    assert _temp_files(meta.parent) == []


def test_metadata_change_that_cannot_be_written_keeps_the_file(bundle_dir: Path) -> None:
    """A value JSON cannot hold fails half-way through the streamed write: nothing changes."""
    meta = bundle_dir / "configs" / "metadata.json"
    before = meta.read_bytes()
    writer = BundleWriter(bundle_dir)
    models_before = dict(writer.bundle._own["models"])

    def change(m: dict) -> None:
        m["dicom_covid"]["models"]["zzz"] = {"facts": object()}  # sorts last: written late

    with pytest.raises(TypeError):
        writer.update_metadata(change)
    assert meta.read_bytes() == before
    assert _temp_files(meta.parent) == []
    assert writer.bundle._own["models"] == models_before
    assert writer.written == []


def test_failed_replace_leaves_no_temp_file(bundle_dir: Path) -> None:
    """os.replace fails (the target is a folder) after the temp file was written and fsynced."""
    blocker = bundle_dir / "models" / "x.json"
    blocker.mkdir()
    (blocker / "keep").write_text("keep")
    with pytest.raises(BundleError, match="previous file is unchanged"):
        BundleWriter(bundle_dir).write_json("models/x.json", {"a": 1})
    assert (blocker / "keep").read_text() == "keep"
    assert _temp_files(bundle_dir / "models") == []


def test_change_that_drops_the_model_list_is_refused(bundle_dir: Path) -> None:
    meta = bundle_dir / "configs" / "metadata.json"
    before = meta.read_bytes()
    with pytest.raises(BundleError, match=r"dicom_covid\.models"):
        BundleWriter(bundle_dir).update_metadata(lambda m: m["dicom_covid"].pop("models"))
    assert meta.read_bytes() == before


@pytest.mark.parametrize("relpath", ["../outside.json", "/tmp/outside.json", "models/../../x"])
def test_paths_outside_the_bundle_are_refused(bundle_dir: Path, relpath: str) -> None:
    with pytest.raises(BundleError, match="not a path inside the bundle"):
        BundleWriter(bundle_dir).write_json(relpath, {})
    assert not (bundle_dir.parent / "outside.json").exists()


def test_install_file_copies_atomically(bundle_dir: Path, tmp_path: Path) -> None:
    src = tmp_path / "w.bin"
    src.write_bytes(os.urandom(3 << 20))  # more than one copy chunk
    out = BundleWriter(bundle_dir).install_file(src, "models/w.safetensors")
    assert out.read_bytes() == src.read_bytes()
    with pytest.raises(BundleError, match="could not write"):
        BundleWriter(bundle_dir).install_file(tmp_path / "missing", "models/w.safetensors")
    assert out.read_bytes() == src.read_bytes()
    assert _temp_files(bundle_dir / "models") == []


# --------------------------------------------------------------------------------------------
# metadata and facts
# --------------------------------------------------------------------------------------------


def test_register_model_updates_the_bundle_it_was_given(bundle_dir: Path) -> None:
    bundle = Bundle(bundle_dir)
    writer = BundleWriter(bundle)
    writer.write_json("models/ens.json", {"kind": "ensemble"})
    # Another command changes metadata.json after the bundle was opened: the writer re-reads it.
    meta_path = bundle_dir / "configs" / "metadata.json"
    other = json.loads(meta_path.read_text())
    other["dicom_covid"]["models"]["other"] = {"weights": "models/o.safetensors", "facts": "o"}
    meta_path.write_text(json.dumps(other, indent=2) + "\n")
    writer.register_model("ens", {"members": ["a", "b"], "facts": "models/ens.json"}, True)
    on_disk = json.loads(meta_path.read_text())
    assert on_disk["dicom_covid"]["models"]["ens"] == {
        "members": ["a", "b"],
        "facts": "models/ens.json",
    }
    assert "other" in on_disk["dicom_covid"]["models"]  # the other change survived
    assert on_disk["dicom_covid"]["default_model"] == "ens"
    assert bundle.default_model == "ens" and bundle.is_ensemble("ens")
    assert Bundle(bundle_dir).metadata == on_disk


def test_update_facts_and_lung_segmenter(bundle_dir: Path) -> None:
    writer = BundleWriter(bundle_dir)
    writer.write_json("models/m.json", {"labels": ["covid"], "covid_threshold": 0.3})
    writer.register_model("m", {"weights": "models/m.safetensors", "facts": "models/m.json"})
    writer.update_facts("m", {"abstention": {"ood": None}})
    facts = json.loads((bundle_dir / "models" / "m.json").read_text())
    assert facts == {"labels": ["covid"], "covid_threshold": 0.3, "abstention": {"ood": None}}
    with pytest.raises(BundleError, match="not a single model"):
        writer.update_facts("no_such_model", {})
    writer.register_lung_segmenter({"weights": "models/l.safetensors", "facts": "models/l.json"})
    meta = json.loads((bundle_dir / "configs" / "metadata.json").read_text())
    assert meta["dicom_covid"]["lung_segmenter"]["facts"] == "models/l.json"


def test_metadata_written_by_the_writer_passes_the_monai_schema(
    bundle_dir: Path, tmp_path: Path
) -> None:
    if not SCHEMA.is_file():
        pytest.skip(f"MONAI metadata schema not found at {SCHEMA}")
    from monai.bundle import verify_metadata

    schema = tmp_path / SCHEMA.name
    shutil.copyfile(SCHEMA, schema)
    BundleWriter(bundle_dir).register_model(
        "m", {"weights": "models/m.safetensors", "facts": "models/m.json"}
    )
    verify_metadata(meta_file=str(bundle_dir / "configs" / "metadata.json"), filepath=str(schema))


def test_save_weights_is_fp16_and_reads_back(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file

    state = {"w": torch.randn(3, 4), "steps": torch.tensor([7]), "b": torch.randn(5).t()}
    path = save_weights(state, tmp_path / "m.safetensors")
    back = load_file(str(path))
    assert back["w"].dtype == torch.float16 and back["steps"].dtype == torch.int64
    assert torch.equal(back["w"], state["w"].half())
    assert torch.equal(back["steps"], state["steps"])
    assert fp16_state_dict(state)["b"].dtype == torch.float16
    assert _temp_files(tmp_path) == []


# --------------------------------------------------------------------------------------------
# every bundle write goes through the writer
# --------------------------------------------------------------------------------------------

#: Calls that write a file (method or function name).
WRITE_CALLS = {
    "write_text",
    "write_bytes",
    "save_file",
    "savefig",
    "save",
    "dump",
    "copyfile",
    "copy2",
    "copytree",
    "move",
    "rename",
    "to_csv",
    "dcmwrite",
    "save_as",
    "symlink_to",
}

#: Every function outside dicom_covid/bundle_writer.py that writes a file, and why that file is
#: not part of a bundle. A new write anywhere in the package fails the test until it is added
#: here (it writes a report or a run folder) or goes through BundleWriter (it changes a bundle).
NOT_BUNDLE_WRITES = {
    "abstention.py:FeatureDensity.save": "statistics to the path given (atomic_write)",
    "analysis/compare.py:write_markdown": "comparison report in --output-dir",
    "analysis/compare.py:plot_comparison": "comparison figure in --output-dir",
    "analysis/heat_study.py:write_heat_share_report": "heat-share report in --output-dir",
    "analysis/report.py:_save": "evaluation figures in --report-dir",
    "analysis/report.py:write_markdown": "evaluation report in --report-dir",
    "analysis/report.py:write_predictions_csv": "evaluation predictions in --report-dir",
    "analysis/tsne.py:plot_tsne": "t-SNE figure at --output",
    "analysis/tsne.py:write_coordinates": "t-SNE coordinates next to the figure",
    "cli/abstention.py:evaluate": "abstention report in --output",
    "cli/compare.py:compare": "comparison.json in --output-dir",
    "cli/conformance.py:conformance": "conformance statement at --output",
    "cli/crossval.py:report": "cross-validation tables in --output",
    "cli/evaluate.py:evaluate": "metrics JSON at --output-json",
    "cli/heatmap.py:_write_overlays": "overlay PNGs in --output-dir",
    "cli/heatmap.py:_write_gallery": "gallery PNG at --output",
    "cli/heatmap.py:_write_credits": "gallery credits next to the PNG",
    "cli/lungs.py:evaluate": "Dice report in --output-dir",
    "lungs/figures.py:contour_figure": "figure at the path given",
    "lungs/training.py:train_segmenter": "checkpoint and facts in the run folder",
    "monai_components.py:export_state_dict": "float32 .pt in the export folder",
    "monai_components.py:ClassificationRunner.run": "predictions in output_dir",
    "monai_components.py:write_evaluation": "metrics.json in the output folder",
    "training/abstention_fit.py:fit_abstention": "statistics to the path given (the CLI installs"
    " them with BundleWriter)",
    "training/crossval.py:crossval": "heldout.json in the run folder",
    "training/data.py:CachedImageDataset.__init__": "image cache in the cache folder",
    "training/engine.py:Engine._save": "checkpoints and history.json in the run folder",
    "training/train.py:export_run": "model.json in the run folder",
}


def _mode(call: ast.Call, position: int) -> str | None:
    for kw in call.keywords:
        if kw.arg == "mode" and isinstance(kw.value, ast.Constant):
            return kw.value.value
    if len(call.args) > position and isinstance(call.args[position], ast.Constant):
        return call.args[position].value
    return None


def _write_kind(call: ast.Call) -> str | None:
    """The kind of file write ``call`` is, or None."""
    f = call.func
    if isinstance(f, ast.Name) and f.id in ("atomic_write", "save_weights"):
        return f.id  # the writer's helpers for files outside a bundle
    if isinstance(f, ast.Name):
        mode = _mode(call, 1) if f.id == "open" else None
        return "open" if isinstance(mode, str) and set(mode) & set("wax+") else None
    if not isinstance(f, ast.Attribute):
        return None
    is_os = isinstance(f.value, ast.Name) and f.value.id == "os"
    if is_os and f.attr in ("replace", "rename", "open"):
        return f"os.{f.attr}"
    if f.attr == "open":  # Path.open(mode)
        mode = _mode(call, 0)
        return "open" if isinstance(mode, str) and set(mode) & set("wax+") else None
    return f.attr if f.attr in WRITE_CALLS else None


def _write_sites(source: str, rel: str) -> dict[str, list[ast.AST]]:
    """``{"rel:Qual.name": [outermost function nodes]}`` for every function that writes a file.

    A function nested in another counts as the outer one (``K.f`` for ``K.f.<locals>.inner``).
    """
    out: dict[str, list[ast.AST]] = {}

    def visit(node: ast.AST, stack: list[ast.AST]) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                visit(child, [*stack, child])
                continue
            if isinstance(child, ast.Call) and _write_kind(child):
                owner: list[ast.AST] = []
                for n in stack:
                    owner.append(n)
                    if not isinstance(n, ast.ClassDef):
                        break
                name = ".".join(n.name for n in owner) or "<module>"
                out.setdefault(f"{rel}:{name}", []).append(owner[-1] if owner else child)
            visit(child, stack)

    visit(ast.parse(source), [])
    return out


def _module_write_sites(module: str) -> dict[str, list[ast.AST]]:
    return _write_sites((PACKAGE / module).read_text(), module)


def _package_write_sites() -> dict[str, list[ast.AST]]:
    sites: dict[str, list[ast.AST]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel == "bundle_writer.py" or rel.startswith("results/"):
            continue
        sites.update(_module_write_sites(rel))
    return sites


def test_results_package_cannot_reach_a_bundle() -> None:
    """results/ is left out of the scan below: it never imports the bundle modules."""
    for path in (PACKAGE / "results").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert "bundle" not in (node.module or ""), f"{path} imports {node.module}"


def test_the_scan_finds_writes() -> None:
    """The scanner sees the kinds of write the package uses (else the next test proves nothing)."""
    src = (
        "import os, json, shutil\n"
        "def a(p):\n    p.write_text('x')\n"
        "def b(p):\n    with open(p, 'w') as fh:\n        json.dump({}, fh)\n"
        "def c(p):\n    with p.open('a') as fh:\n        pass\n"
        "def d(p, q):\n    shutil.copyfile(p, q)\n"
        "def e(p, q):\n    os.replace(p, q)\n"
        "def h(p):\n    atomic_write(p, print)\n"
        "class K:\n    def f(self, p):\n        def inner():\n            p.write_bytes(b'')\n"
        "def g(p):\n    p.read_text(); open(p); p.open()\n"
    )
    tree_sites = _write_sites(src, "_scan_probe.py")
    assert set(tree_sites) == {f"_scan_probe.py:{n}" for n in ("a", "b", "c", "d", "e", "h", "K.f")}


def test_every_bundle_write_goes_through_the_writer() -> None:
    sites = _package_write_sites()
    unknown = sorted(set(sites) - set(NOT_BUNDLE_WRITES))
    assert not unknown, (
        f"{unknown} write files outside dicom_covid/bundle_writer.py: write into a bundle only "
        "through BundleWriter; if it is a report or run-folder output, add it to "
        "NOT_BUNDLE_WRITES with the reason"
    )
    stale = sorted(set(NOT_BUNDLE_WRITES) - set(sites))
    assert not stale, f"{stale} no longer write files: remove them from NOT_BUNDLE_WRITES"
    # None of those writers reaches into a bundle: no bundle root, no metadata.json.
    for site, funcs in sites.items():
        for func in funcs:
            for node in ast.walk(func):
                assert not (isinstance(node, ast.Attribute) and node.attr == "root"), (
                    f"{site} writes files and uses a bundle's .root: use BundleWriter"
                )
                assert not (
                    isinstance(node, ast.Constant)
                    and isinstance(node.value, str)
                    and "metadata.json" in node.value
                ), f"{site} writes files and names metadata.json: use BundleWriter"


@pytest.mark.parametrize(
    "module",
    ["bundle.py", "lungs/install.py", "cli/train.py", "cli/ensemble.py", "training/ensemble.py"],
)
def test_installers_write_nothing_themselves(module: str) -> None:
    assert _module_write_sites(module) == {}


# --------------------------------------------------------------------------------------------
# an installer end to end: abstention fit --install (no test covered it before)
# --------------------------------------------------------------------------------------------


def _labelled_folder(root: Path, per_class: int = 3) -> Path:
    """train and val splits of random 64 px PNGs with a manifest (licence CC0)."""
    import csv

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    rows = []
    for split in ("train", "val"):
        for label in ("covid", "normal", "pneumonia"):
            for i in range(per_class):
                name = f"images/{split}_{label}_{i}.png"
                Image.fromarray((rng.random((64, 64)) * 255).astype(np.uint8)).save(root / name)
                rows.append({"path": name, "label": label, "source": "synthetic", "split": split})
    with (root / "manifest.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["path", "label", "source", "split"])
        writer.writeheader()
        writer.writerows(rows)
    return root


def test_abstention_fit_install_writes_the_bundle_atomically(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from helpers import make_throwaway_bundle
    from typer.testing import CliRunner

    from dicom_covid.cli.main import app

    bundle = make_throwaway_bundle(tmp_path / "bundle", backbone="alexnet", input_size=64)
    data = _labelled_folder(tmp_path / "data")
    monkeypatch.chdir(tmp_path)  # the command's default output folder (runs/) is relative
    before = {p: p.read_bytes() for p in bundle.rglob("*") if p.is_file()}
    args = ["abstention", "fit", "--bundle", str(bundle), "--model", "alexnet"]
    args += ["--data", str(data), "--max-train-per-class", "10", "--no-progress", "--install"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    ood = bundle / "models" / "alexnet.ood.safetensors"
    assert f"installed into {ood}" in result.output
    facts = json.loads((bundle / "models" / "alexnet.json").read_text())
    assert facts["abstention"]["ood"]["file"] == "models/alexnet.ood.safetensors"
    changed = {p for p in bundle.rglob("*") if p.is_file() and before.get(p) != p.read_bytes()}
    assert changed == {ood, bundle / "models" / "alexnet.json"}
    assert not [p for p in bundle.rglob("*") if p.name.endswith(".tmp")]
    assert not (tmp_path / "runs").exists()  # --install fits in a temporary folder


def test_the_installed_default_bundle_is_never_written_in_place(tmp_path, monkeypatch) -> None:
    """A wheel's copy of the default model lives in site-packages: installs into it are refused
    with what to do, and asking it for another model says how to reach the others."""
    from helpers import make_throwaway_bundle

    import dicom_covid.bundle as bundle_module
    import dicom_covid.config as config_module

    root = make_throwaway_bundle(tmp_path / "bundle")
    monkeypatch.setattr(config_module, "PACKAGED_BUNDLE_DIR", Path(root))
    monkeypatch.setattr(bundle_module, "PACKAGED_BUNDLE_DIR", Path(root))
    with pytest.raises(BundleError, match=r"not changed in place.*--bundle"):
        BundleWriter(Bundle(root))
    with pytest.raises(BundleError, match="ships only the default model: pass --bundle"):
        Bundle(root).facts("no_such_model")
    BundleWriter(Bundle(ROOT / "monai_bundle"))  # any other bundle is writable
