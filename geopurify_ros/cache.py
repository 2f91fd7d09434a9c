"""Where built artefacts (text embeddings, extracted furniture, generated demo data) are cached."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """$GEOPURIFY_CACHE/<parts> (scripts/setup.sh sets it to build/cache), else ~/.cache/geopurify/<parts>.

    An empty GEOPURIFY_CACHE counts as unset, so nothing is ever cached relative to the working directory.
    """
    root = os.environ.get("GEOPURIFY_CACHE") or str(Path.home() / ".cache" / "geopurify")
    return Path(root).expanduser().joinpath(*parts)
