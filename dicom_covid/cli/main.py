"""Entry point of the ``dicom-covid`` command; each command lives in its own module."""

from __future__ import annotations

# Importing a command module registers its command on ``app``.
from . import abstention as _abstention  # noqa: F401
from . import compare as _compare  # noqa: F401
from . import conformance as _conformance  # noqa: F401
from . import crossval as _crossval  # noqa: F401
from . import demo as _demo  # noqa: F401
from . import ensemble as _ensemble  # noqa: F401
from . import evaluate as _evaluate  # noqa: F401
from . import heatmap as _heatmap  # noqa: F401
from . import lungs as _lungs  # noqa: F401
from . import predict as _predict  # noqa: F401
from . import retry as _retry  # noqa: F401
from . import serve as _serve  # noqa: F401
from . import status as _status  # noqa: F401
from . import train as _train  # noqa: F401
from . import tsne as _tsne  # noqa: F401
from ._app import app

# --- commands added by other modules go above this line ---

__all__ = ["app"]


def main() -> None:  # pragma: no cover - console script
    """Run the CLI."""
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
