"""2-D layouts of a run's image and caption embeddings for the Embeddings page.

Images and their first captions are projected together (one 2N×D matrix), so the distance between an
image and its caption in the picture means something. Two methods:

* PCA: instant, deterministic (component signs fixed), linear — it shows the dominant directions.
* UMAP (umap-learn, cosine metric, fixed seed): neighbourhoods and clusters, but 15 s of numba JIT
  on first use and 5-15 s a fit, so it is only computed on request.

Layouts are cached on disk in the run folder (`RunDir.save_projection` / `load_projection`, which own the
path: `runs/<name>/projections/<method>_epoch_NNN.npz`), written atomically and keyed by the sha256 of the
embeddings file they came from: a re-evaluated epoch is recomputed, an unchanged one is read back in
milliseconds. A run folder that cannot be written to still gets its layouts, only not cached.

Comparable across epochs: each epoch's layout is fitted on its own (so it is exactly what that
epoch's embeddings look like), then aligned to a reference epoch's layout with an orthogonal
Procrustes fit (rotation, reflection, uniform scale, translation — shapes are not distorted). This
works because every epoch embeds the same fixed evaluation set, so points correspond one to one.
AlignedUMAP was the alternative; it couples the epochs' fits, costs a joint fit over all epochs
every time one is added, and changes the picture of earlier epochs, which this method never does.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from blipcore.runs.rundir import RunDir, RunError, sha256_file

logger = logging.getLogger(__name__)

CACHE_VERSION = 1
UMAP_NEIGHBOURS = 15


def joint_embeddings(embeddings: dict[str, np.ndarray]) -> np.ndarray:
    """Image embeddings on top of their first captions' embeddings: rows 0..N-1 images, N..2N-1 texts."""
    return np.concatenate([embeddings["image_embeds"], embeddings["text_embeds"]]).astype(np.float64)


def split_layout(layout: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(image points, text points) of a joint layout."""
    n = len(layout) // 2
    return layout[:n], layout[n:]


def pca_2d(x: np.ndarray) -> np.ndarray:
    """The first two principal components; each component's largest loading is made positive, so the
    same data always gives the same picture."""
    centred = x - x.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    components = vt[:2]
    signs = np.sign(components[np.arange(len(components)), np.abs(components).argmax(axis=1)])
    coords = centred @ (components * signs[:, None]).T
    return np.pad(coords, ((0, 0), (0, 2 - coords.shape[1])))  # a rank-1 input still gives two columns


def umap_2d(x: np.ndarray, seed: int = 0) -> np.ndarray:
    """UMAP with the cosine metric (ITC compares directions); imported here because it costs seconds."""
    import umap

    reducer = umap.UMAP(n_components=2, n_neighbors=max(2, min(UMAP_NEIGHBOURS, len(x) - 1)), min_dist=0.1,
                        metric="cosine", random_state=seed, n_jobs=1)
    return np.asarray(reducer.fit_transform(x), dtype=np.float64)


PROJECTORS: dict[str, Callable[[np.ndarray], np.ndarray]] = {"pca": pca_2d, "umap": umap_2d}
METHOD_LABELS = {"umap": "UMAP", "pca": "PCA"}


def procrustes_align(layout: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """`layout` rotated/reflected, scaled and shifted to lie as close as possible (least squares) to
    `reference`, point i onto point i. Distances within the layout keep their ratios."""
    mean_l, mean_r = layout.mean(axis=0), reference.mean(axis=0)
    a, b = layout - mean_l, reference - mean_r
    norm = float((a**2).sum())
    if norm == 0.0:
        return np.broadcast_to(mean_r, layout.shape).copy()
    u, s, vt = np.linalg.svd(a.T @ b)
    return (s.sum() / norm) * a @ (u @ vt) + mean_r


# --- the disk cache (RunDir owns its files) ----------------------------------------------------
def _read_cache(run: RunDir, method: str, epoch: int, key: str) -> np.ndarray | None:
    """The cached layout when it was computed from the embeddings whose sha256 is `key`, else None (none
    cached, or damaged, or from other embeddings, or from another version of this module: recompute)."""
    data = run.load_projection(method, epoch)
    try:
        if data is not None and int(data["version"]) == CACHE_VERSION and str(data["key"]) == key:
            layout = np.asarray(data["layout"], dtype=np.float64)
            if layout.ndim == 2 and layout.shape[1] == 2:
                return layout
    except (KeyError, TypeError, ValueError):
        pass  # arrays missing or of the wrong kind: a damaged cache
    return None


def cached_layout(run: RunDir, epoch: int, method: str) -> np.ndarray | None:
    """The cached layout of an epoch if it matches the current embeddings file, else None."""
    embeddings = run.embeddings_path(epoch)
    if not embeddings.is_file():
        return None
    return _read_cache(run, method, epoch, sha256_file(embeddings))


def layout(run: RunDir, epoch: int, method: str) -> np.ndarray:
    """The (2N, 2) joint layout of an epoch's embeddings: from the disk cache, or computed and cached.

    A runs folder that cannot be written to still gets the layout, only not cached.
    """
    if method not in PROJECTORS:
        raise ValueError(f"unknown projection {method!r}; known: {', '.join(PROJECTORS)}")
    embeddings = run.embeddings_path(epoch)
    key = sha256_file(embeddings) if embeddings.is_file() else ""
    found = _read_cache(run, method, epoch, key) if key else None
    if found is not None:
        return found
    data = run.load_embeddings(epoch)  # raises RunError with the reason when missing or unreadable
    coords = PROJECTORS[method](joint_embeddings(data)).astype(np.float32)
    arrays = {"layout": coords, "key": np.array(key), "version": np.array(CACHE_VERSION),
              "image_ids": data["image_ids"]}
    try:
        run.save_projection(method, epoch, arrays)
    except RunError as err:  # a read-only or full runs folder: the page still gets the layout, uncached
        logger.warning("cannot cache the %s layout of %s epoch %d: %s", method, run.name, epoch, err)
    return coords.astype(np.float64)  # the cached precision, so cold and warm agree


def cached_epochs(run: RunDir, method: str) -> list[int]:
    """Epochs whose layout for `method` is cached and current."""
    return [e for e in run.embedding_epochs() if cached_layout(run, e, method) is not None]
