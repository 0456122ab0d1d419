"""Every change to a bundle folder (``monai_bundle/``) goes through :class:`BundleWriter`.

A bundle is read by running services while it is changed (a model installed, an ensemble made,
abstention facts fitted, the lung U-Net installed), so each file is replaced atomically: written
to a temporary file in the same folder, flushed and fsynced, then moved over the old one with
:func:`os.replace` (and the folder fsynced). A reader sees the old file or the new one, never
half of one; a write that fails leaves the old file and no temporary file behind.

Who writes what:

* ``configs/metadata.json``: only :meth:`BundleWriter.update_metadata` (re-reads the file, applies
  one change, writes it back): :meth:`~BundleWriter.register_model` (the ``dicom_covid.models``
  list and ``default_model``) and :meth:`~BundleWriter.register_lung_segmenter`.
* ``models/<name>.json`` (facts): :meth:`~BundleWriter.write_json`,
  :meth:`~BundleWriter.update_facts`.
* ``models/*.safetensors`` (weights, statistics): :meth:`~BundleWriter.install_file` (a file made
  elsewhere, e.g. a training run) or :meth:`~BundleWriter.write_bytes`.

The bundle's ``version`` and ``changelog`` are edited by hand at release time, not by this code.

fp16 weight files (what a training run exports and the bundle ships) are made in one place too:
:func:`fp16_state_dict` and :func:`save_weights`. RESEARCH USE ONLY.
"""

from __future__ import annotations

import io
import json
import logging
import os
import secrets
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from .bundle import Bundle
from .errors import BundleError

__all__ = [
    "BundleWriter",
    "atomic_write",
    "fp16_state_dict",
    "save_weights",
]

logger = logging.getLogger(__name__)

#: Relative path of the bundle metadata inside a bundle folder.
METADATA = "configs/metadata.json"


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some file systems refuse fsync on folders
        pass
    finally:
        os.close(fd)


def _temp_name(path: Path) -> Path:
    """A temporary file next to ``path``: same folder (same file system), hidden, unique."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any]) -> Path:
    """Replace ``path`` with what ``write`` writes to a binary file, atomically.

    ``write(fh)`` fills a temporary file in the same folder (created with the umask's
    permissions); it is flushed and fsynced, then :func:`os.replace` moves it over ``path`` and
    the folder is fsynced. When anything fails the temporary file is removed, ``path`` is left as
    it was, and the error is raised again.

    Parameters
    ----------
    path : path
        File to write; its folder must exist.
    write : callable
        Called once with the open binary file.

    Returns
    -------
    pathlib.Path
        ``path``.

    Raises
    ------
    OSError
        The folder is not writable, the disk is full, ``path`` is a folder, ...
    Exception
        Whatever ``write`` raises.
    """
    path = Path(path)
    tmp = _temp_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def _json_writer(obj: Any) -> Callable[[IO[bytes]], None]:
    """Write ``obj`` as indented JSON plus a newline (the bundle's format), streaming."""

    def write(fh: IO[bytes]) -> None:
        text = io.TextIOWrapper(fh, encoding="utf-8", write_through=True)
        try:
            json.dump(obj, text, indent=2)
            text.write("\n")
            text.flush()
        finally:
            text.detach()  # leave ``fh`` open for the fsync

    return write


def fp16_state_dict(state: Mapping[str, Any]) -> dict[str, Any]:
    """The state dict as shipped: floating-point tensors in fp16, others unchanged.

    Parameters
    ----------
    state : mapping of str to torch.Tensor
        A network's ``state_dict()``.

    Returns
    -------
    dict of str to torch.Tensor
        Same keys; half-precision floating tensors.
    """
    return {k: v.half() if v.is_floating_point() else v for k, v in state.items()}


def save_weights(state: Mapping[str, Any], path: str | Path, fp16: bool = True) -> Path:
    """Write a state dict as a safetensors file, atomically (fp16 unless told otherwise).

    This is the one place that makes the weight files the bundle ships: training runs
    (:func:`dicom_covid.training.train.export_run`,
    :func:`dicom_covid.lungs.training.train_segmenter`) write
    them into their run folder, and :meth:`BundleWriter.install_file` copies them into a bundle.

    Parameters
    ----------
    state : mapping of str to torch.Tensor
        Tensors to write (a ``state_dict()``).
    path : path
        The ``.safetensors`` file.
    fp16 : bool
        Convert floating-point tensors to fp16 first (:func:`fp16_state_dict`).

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    from safetensors.torch import save

    tensors = fp16_state_dict(state) if fp16 else dict(state)
    data = save({k: v.contiguous().cpu() for k, v in tensors.items()})
    return atomic_write(path, lambda fh: fh.write(data))


class BundleWriter:
    """The one writer of a bundle folder: facts, weights and ``configs/metadata.json``.

    Every write is atomic (see :func:`atomic_write`). Paths are relative to the bundle folder and
    must stay inside it. A failed write raises :class:`~dicom_covid.errors.BundleError` and leaves
    the previous file in place.

    Parameters
    ----------
    bundle : Bundle, path or None
        The bundle (its in-memory metadata is refreshed after each metadata change), or its folder
        (default: the project's bundle).

    Raises
    ------
    BundleError
        When the folder holds no bundle metadata.
    """

    def __init__(self, bundle: Bundle | str | Path | None = None) -> None:
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle(bundle)
        self.root = self.bundle.root
        from .config import PACKAGED_BUNDLE_DIR

        if self.root.resolve() == PACKAGED_BUNDLE_DIR.resolve():
            raise BundleError(
                f"{self.root} is the copy of the default model inside the installed package; "
                "it is not changed in place. Give a bundle folder of your own with --bundle "
                "(e.g. a copy of monai_bundle/ from the repository) or set $DICOM_COVID_BUNDLE."
            )
        #: Paths written by this writer, in order (what changed in the bundle).
        self.written: list[Path] = []

    def _target(self, relpath: str | Path) -> Path:
        rel = Path(relpath)
        target = (self.root / rel).resolve()
        if rel.is_absolute() or not target.is_relative_to(self.root.resolve()):
            raise BundleError(
                f"{relpath}: not a path inside the bundle {self.root}; give a path relative to "
                "the bundle folder (e.g. models/<name>.json)."
            )
        return self.root / rel

    @contextmanager
    def _writing(self, target: Path) -> Iterator[None]:
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            yield
        except OSError as exc:
            raise BundleError(
                f"could not write {target} ({exc.strerror or exc}); the previous file is "
                "unchanged. Check that the bundle folder is writable and the disk has space, "
                "then run the command again."
            ) from exc
        self.written.append(target)

    def write_bytes(self, relpath: str | Path, data: bytes) -> Path:
        """Write ``data`` to ``relpath`` atomically.

        Parameters
        ----------
        relpath : path
            File inside the bundle, e.g. ``models/x.ood.safetensors``.
        data : bytes
            The whole content.

        Returns
        -------
        pathlib.Path
            The file written.
        """
        target = self._target(relpath)
        with self._writing(target):
            atomic_write(target, lambda fh: fh.write(data))
        return target

    def write_json(self, relpath: str | Path, obj: Any) -> Path:
        """Write ``obj`` as JSON (2-space indent, final newline) to ``relpath`` atomically.

        Parameters
        ----------
        relpath : path
            File inside the bundle.
        obj : JSON-serialisable
            The content; a value JSON cannot hold raises ``TypeError`` and writes nothing.

        Returns
        -------
        pathlib.Path
            The file written.
        """
        target = self._target(relpath)
        with self._writing(target):
            atomic_write(target, _json_writer(obj))
        return target

    def install_file(self, source: str | Path, relpath: str | Path) -> Path:
        """Copy a file made elsewhere (a training run's weights) into the bundle atomically.

        Parameters
        ----------
        source : path
            The file to copy.
        relpath : path
            Its place in the bundle, e.g. ``models/<name>.safetensors``.

        Returns
        -------
        pathlib.Path
            The file written.

        Raises
        ------
        BundleError
            When ``source`` cannot be read or the copy cannot be written.
        """
        import shutil

        source = Path(source)
        target = self._target(relpath)
        with self._writing(target), source.open("rb") as src:
            atomic_write(target, lambda fh: shutil.copyfileobj(src, fh, 1 << 20))
        return target

    def update_metadata(self, change: Callable[[dict], None]) -> dict:
        """Apply ``change`` to ``configs/metadata.json`` and write it back atomically.

        The file is read again first (another command may have changed it since the bundle was
        opened); ``change`` edits the dict in place. The result must keep a
        ``dicom_covid.models`` mapping. The writer's :class:`Bundle` sees the new metadata.

        Parameters
        ----------
        change : callable
            ``change(meta) -> None``.

        Returns
        -------
        dict
            The metadata written.

        Raises
        ------
        BundleError
            The file is not valid JSON, the change removed ``dicom_covid.models``, or the write
            failed (the previous file is unchanged).
        """
        path = self._target(METADATA)
        try:
            meta = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise BundleError(
                f"{path}: cannot read the bundle metadata ({exc}); restore it from version "
                "control before changing the bundle."
            ) from exc
        change(meta)
        own = meta.get("dicom_covid") if isinstance(meta, dict) else None
        if not isinstance(own, dict) or not isinstance(own.get("models"), dict):
            raise BundleError(
                f"{path}: the change left no 'dicom_covid.models' mapping; nothing was written."
            )
        self.write_json(METADATA, meta)
        self.bundle.metadata, self.bundle._own = meta, own
        return meta

    def register_model(
        self, name: str, entry: Mapping[str, Any], make_default: bool = False
    ) -> dict:
        """Set the ``dicom_covid.models`` entry of ``name`` (and ``default_model``).

        Parameters
        ----------
        name : str
            Model name.
        entry : mapping
            ``{"weights": ..., "facts": ...}`` for a single model, ``{"members": [...],
            "facts": ...}`` for an ensemble.
        make_default : bool
            Also make it the bundle's default model.

        Returns
        -------
        dict
            The metadata written.
        """

        def change(meta: dict) -> None:
            meta["dicom_covid"]["models"][name] = dict(entry)
            if make_default:
                meta["dicom_covid"]["default_model"] = name

        return self.update_metadata(change)

    def register_lung_segmenter(self, entry: Mapping[str, Any]) -> dict:
        """Set ``dicom_covid.lung_segmenter`` (``{"weights": ..., "facts": ...}``).

        Parameters
        ----------
        entry : mapping
            Paths of the segmenter's weights and facts, relative to the bundle.

        Returns
        -------
        dict
            The metadata written.
        """

        def change(meta: dict) -> None:
            meta["dicom_covid"]["lung_segmenter"] = dict(entry)

        return self.update_metadata(change)

    def update_facts(self, name: str, entries: Mapping[str, Any]) -> Path:
        """Set top-level entries of a single model's facts JSON.

        Parameters
        ----------
        name : str
            A single model of the bundle.
        entries : mapping
            Keys to set (replacing what was there).

        Returns
        -------
        pathlib.Path
            The facts file.

        Raises
        ------
        BundleError
            Unknown model or an ensemble.
        """
        bundle = self.bundle
        entry = bundle._own["models"].get(name)
        if entry is None or "facts" not in entry or bundle.is_ensemble(name):
            raise BundleError(f"{name!r} is not a single model of the bundle {bundle.root}.")
        facts = json.loads((self.root / entry["facts"]).read_text())
        facts.update(entries)
        return self.write_json(entry["facts"], facts)
