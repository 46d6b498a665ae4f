"""Dense nearest-neighbour search over fixed vectors (brute-force cosine, optional faiss) and a PCA projection.

Used by retrieval drafters that key a datastore by contextual embeddings (DReSD): the keys are PCA-reduced,
L2-normalised target hidden states; a query is projected the same way and its nearest keys are found by inner
product. At the sizes this library ships (tens of thousands of keys) a matrix product is fast enough; with
``backend="faiss"`` (faiss installed) an exact ``IndexFlatIP`` is used instead.
"""

from __future__ import annotations

import torch


class PCAProjection:
    """``x -> normalize((x - mean) @ components.T)``: a PCA reduction followed by L2 normalisation.

    Args:
        mean: ``(d,)`` mean of the fitted vectors.
        components: ``(k, d)`` principal directions (rows, orthonormal).

    Example:
        >>> import torch
        >>> x = torch.randn(200, 8) @ torch.diag(torch.tensor([5.0, 3.0, 1.0, 0.1, 0.1, 0.1, 0.1, 0.1]))
        >>> pca = PCAProjection.fit(x, 2)
        >>> pca(x).shape, bool(torch.allclose(pca(x).norm(dim=-1), torch.ones(200)))
        (torch.Size([200, 2]), True)
    """

    def __init__(self, mean: torch.Tensor, components: torch.Tensor):
        if mean.dim() != 1 or components.dim() != 2 or components.shape[1] != mean.shape[0]:
            raise ValueError(f"mean must be (d,) and components (k, d), got {tuple(mean.shape)} and "
                             f"{tuple(components.shape)}")
        self.mean = mean.float()
        self.components = components.float()

    @classmethod
    def fit(cls, x: torch.Tensor, dim: int, max_rows: int | None = 200_000, seed: int = 0) -> PCAProjection:
        """Fit on the rows of ``x`` ``(n, d)`` (a random subset of ``max_rows`` when larger), keeping ``dim``
        components."""
        if isinstance(dim, bool) or not isinstance(dim, int) or not 1 <= dim <= min(x.shape):
            raise ValueError(f"dim must be an int in [1, {min(x.shape)}], got {dim!r}")
        x = x.float()
        if max_rows is not None and x.shape[0] > max_rows:
            g = torch.Generator().manual_seed(seed)
            x = x[torch.randperm(x.shape[0], generator=g)[:max_rows]]
        mean = x.mean(0)
        _, _, vh = torch.linalg.svd(x - mean, full_matrices=False)
        return cls(mean, vh[:dim])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        z = (x.float().to(self.mean.device) - self.mean) @ self.components.T
        return torch.nn.functional.normalize(z, dim=-1)


class DenseIndex:
    """Exact inner-product search over ``keys`` ``(n, d)`` (cosine when keys and queries are normalised).

    Args:
        keys: the stored vectors.
        backend: ``"torch"`` (a matrix product, default) or ``"faiss"`` (``faiss.IndexFlatIP``; needs faiss).

    Example:
        >>> import torch
        >>> index = DenseIndex(torch.eye(3))
        >>> index.search(torch.tensor([0.1, 0.9, 0.2]), 2)
        ([1, 2], [0.8999999761581421, 0.20000000298023224])
    """

    BACKENDS = ("torch", "faiss")

    def __init__(self, keys: torch.Tensor, backend: str = "torch"):
        if keys.dim() != 2:
            raise ValueError(f"keys must be (n, d), got {tuple(keys.shape)}")
        if backend not in self.BACKENDS:
            raise ValueError(f"backend must be one of {self.BACKENDS}, got {backend!r}")
        self.keys = keys.float().contiguous()
        self.backend = backend
        self._faiss = None
        if backend == "faiss":
            try:
                import faiss
            except ImportError as e:  # optional dependency
                raise ValueError("backend='faiss' needs the faiss package (pip install faiss-cpu)") from e
            self._faiss = faiss.IndexFlatIP(self.keys.shape[1])
            self._faiss.add(self.keys.numpy())

    def __len__(self) -> int:
        return self.keys.shape[0]

    def search(self, query: torch.Tensor, k: int) -> tuple[list[int], list[float]]:
        """Indices and scores of the ``k`` keys with the largest inner product with ``query`` ``(d,)``, best
        first."""
        k = min(int(k), len(self))
        if k <= 0:
            return [], []
        q = query.float().reshape(1, -1).to(self.keys.device)
        if self._faiss is not None:
            scores, idx = self._faiss.search(q.cpu().numpy(), k)
            return idx[0].tolist(), scores[0].tolist()
        top = (self.keys @ q[0]).topk(k)
        return top.indices.tolist(), top.values.tolist()
