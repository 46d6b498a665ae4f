"""DReSD: dense retrieval drafting over the target's own contextual embeddings."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from hf_decoding_ext.core.dense_index import DenseIndex, PCAProjection
from hf_decoding_ext.core.suffix_index import continuation_trie
from hf_decoding_ext.core.tree import DraftTree
from hf_decoding_ext.speculative.drafters.base import Draft, Drafter, VerifyResult
from hf_decoding_ext.speculative.policies.tree_policy import NodeBudget

DATASTORE_NAME = ("dresd", "datastore.safetensors")
"""Where the shipped datastore lives under ``hf_decoding_ext/data`` (built by ``scripts/build_dresd_datastore.py``
from the default model's greedy responses to the distillation prompts)."""


class DReSDDatastore:
    """Contextual-embedding keys and the token continuations they lead to.

    ``keys`` ``(n, dim)`` are the target's last-layer hidden states (the lm_head's input) at ``n`` positions of its
    own generations, PCA-reduced (``projection``) and L2-normalised; key ``i`` is the state that predicts
    ``tokens[starts[i]]``, and its continuation is ``tokens[starts[i] : min(starts[i] + stored, ends[i])]``.
    ``meta`` records the model (hidden size, vocabulary size, name) and the source text.
    """

    def __init__(self, keys: torch.Tensor, projection: PCAProjection, tokens: torch.Tensor, starts: torch.Tensor,
                 ends: torch.Tensor, stored: int = 20, meta: dict | None = None, backend: str = "torch"):
        if keys.shape[0] != starts.shape[0] or starts.shape != ends.shape:
            raise ValueError("keys, starts and ends must have one row per stored position")
        self.keys, self.projection = keys.float(), projection
        self.tokens, self.starts, self.ends = tokens.long(), starts.long(), ends.long()
        self.stored = int(stored)
        self.meta = dict(meta or {})
        self.index = DenseIndex(self.keys, backend=backend)

    def __len__(self) -> int:
        return self.keys.shape[0]

    @classmethod
    @torch.no_grad()
    def build(cls, model, sequences: Iterable[tuple[Sequence[int], Sequence[int]]], pca_dim: int = 64,
              stored: int = 20, progress: bool = True, meta: dict | None = None) -> DReSDDatastore:
        """Embed the response positions of ``(prompt_ids, response_ids)`` pairs with ``model`` (one forward per
        pair, last-layer hidden states after the final norm), fit the PCA on all of them and keep, for each
        response position, its key and continuation (the paper's datastore of the target's own generations)."""
        from tqdm.auto import tqdm

        hidden, tokens, starts, ends = [], [], [], []
        pairs = list(sequences)
        device = next(model.parameters()).device
        for prompt, response in tqdm(pairs, desc="DReSD datastore", disable=not progress):
            prompt, response = [int(t) for t in prompt], [int(t) for t in response]
            if not prompt or not response:
                continue
            ids = torch.tensor([prompt + response], device=device)
            out = model(input_ids=ids, output_hidden_states=True, return_dict=True)
            h = out.hidden_states[-1][0, len(prompt) - 1: len(prompt) - 1 + len(response)]  # predicts response[j]
            start = len(tokens)
            tokens += response
            hidden.append(h.float().cpu())
            starts += range(start, start + len(response))
            ends += [start + len(response)] * len(response)
        if not hidden:
            raise ValueError("no (prompt, response) pair with tokens to embed")
        hidden = torch.cat(hidden)
        projection = PCAProjection.fit(hidden, min(pca_dim, hidden.shape[1], hidden.shape[0]))
        meta = {"hidden_size": int(hidden.shape[1]), "vocab_size": int(model.get_output_embeddings().weight.shape[0]),
                "model": getattr(model.config, "_name_or_path", ""), **(meta or {})}
        return cls(projection(hidden), projection, torch.tensor(tokens), torch.tensor(starts), torch.tensor(ends),
                   stored, meta)

    def save(self, path: str | os.PathLike) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"keys": self.keys.half().contiguous(), "pca_mean": self.projection.mean.contiguous(),
                   "pca_components": self.projection.components.contiguous(),
                   "tokens": self.tokens.int().contiguous(), "starts": self.starts.int().contiguous(),
                   "ends": self.ends.int().contiguous()},
                  str(path), metadata={"stored": str(self.stored), "meta": json.dumps(self.meta)})
        return path

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, backend: str = "torch") -> DReSDDatastore:
        """The datastore at ``path`` (default: the shipped one, :data:`DATASTORE_NAME`)."""
        from safetensors import safe_open

        from hf_decoding_ext.core.resources import data_path

        path = Path(path) if path is not None else data_path(*DATASTORE_NAME)
        if not path.exists():
            raise ValueError(f"no DReSD datastore at {path}: build one with scripts/build_dresd_datastore.py")
        with safe_open(str(path), framework="pt") as f:
            t = {k: f.get_tensor(k) for k in f.keys()}
            info = f.metadata() or {}
        return cls(t["keys"].float(), PCAProjection(t["pca_mean"], t["pca_components"]), t["tokens"], t["starts"],
                   t["ends"], int(info.get("stored", 20)), json.loads(info.get("meta", "{}")), backend)

    def check(self, model) -> None:
        """``ValueError`` unless the datastore was built for a model of ``model``'s hidden and vocabulary size."""
        hidden = model.get_output_embeddings().weight.shape[1]
        vocab = model.get_output_embeddings().weight.shape[0]
        if self.meta.get("hidden_size") != hidden or self.meta.get("vocab_size") != vocab:
            raise ValueError(f"this DReSD datastore was built for hidden size {self.meta.get('hidden_size')} and "
                             f"vocabulary {self.meta.get('vocab_size')} ({self.meta.get('model', '?')}); the model "
                             f"has {hidden} and {vocab}: build one for it with DReSDDatastore.build")

    def neighbours(self, hidden: torch.Tensor, k: int) -> tuple[list[list[int]], list[float]]:
        """Continuations and cosine similarities of the ``k`` keys nearest to the hidden state ``hidden``."""
        idx, sims = self.index.search(self.projection(hidden.reshape(1, -1))[0], k)
        conts = [self.tokens[int(self.starts[i]): int(min(self.starts[i] + self.stored, self.ends[i]))].tolist()
                 for i in idx]
        return conts, sims


class DReSDDrafter(Drafter):
    """DReSD, Dense Retrieval for Speculative Decoding (Gritta, Xue and Lampouras, arXiv 2502.15572, Findings of
    ACL 2025), on the speculative engine.

    The datastore (:class:`DReSDDatastore`) maps the target's contextual embeddings (last-layer hidden states,
    reduced by PCA to 64 dimensions and normalised) at positions of its own generations to the 20 tokens that
    followed. At each step the query is the hidden state the verification forward produced at the last accepted
    position (free: the engine's ``"last_hidden_state"``), which predicts the token just committed; its
    ``num_drafts`` nearest keys (cosine, brute force or faiss) give continuations whose first token is that
    prediction, and their next ``len_drafts`` tokens are the drafts, merged into a trie and verified in one
    forward. Deterministic drafts: token-identical to greedy decoding, lossless under sampling.

    Args:
        datastore: a :class:`DReSDDatastore`, a path to a saved one, or ``"shipped"`` (built from the default
            model's greedy responses to the 360 distillation prompts, never the benchmark prompts; for the default
            model only).
        num_drafts: neighbours whose continuations are drafted (the official README's ``num_drafts``, 10).
        len_drafts: draft tokens per continuation (``len_drafts``, 10).
        max_nodes: node budget of the merged trie, the most frequent prefixes first (an int, ``None``: the whole
            trie as in the paper, or ``"auto"`` (default): on CPU the size the packaged verify-cost curve allows
            for about one forward's cost (:class:`~hf_decoding_ext.speculative.policies.tree_policy.NodeBudget`),
            uncapped elsewhere).
        search_k: keys retrieved before keeping those whose continuation starts with the committed token (default
            ``4 * num_drafts``).
        backend: ``"torch"`` or ``"faiss"`` nearest-neighbour search.

    Deviations: the paper fits the PCA on ~1M embeddings of a large in-domain corpus; the shipped datastore holds the
    default model's ~40k response positions. The query/continuation alignment (a key predicts the first token of
    its continuation; drafts start after the token the query predicted, kept only when the neighbour predicted the
    same token) is this library's reading: the official code was not available offline.

    Example:
        >>> from hf_decoding_ext.speculative import SpeculativeDecoding
        >>> from hf_decoding_ext.speculative.drafters.dresd import DReSDDrafter
        >>> loop = SpeculativeDecoding(DReSDDrafter())
        >>> out = model.generate(**inputs, max_new_tokens=128, do_sample=False, custom_generate=loop)  # doctest: +SKIP
    """

    needs = frozenset({"last_hidden_state"})

    def __init__(self, datastore: DReSDDatastore | str | os.PathLike = "shipped", num_drafts: int = 10,
                 len_drafts: int = 10, max_nodes: int | str | None = "auto", search_k: int | None = None,
                 backend: str = "torch"):
        for name, value in (("num_drafts", num_drafts), ("len_drafts", len_drafts)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if search_k is not None and (isinstance(search_k, bool) or not isinstance(search_k, int)
                                     or search_k < num_drafts):
            raise ValueError(f"search_k must be None or an int >= num_drafts, got {search_k!r}")
        if backend not in DenseIndex.BACKENDS:
            raise ValueError(f"backend must be one of {DenseIndex.BACKENDS}, got {backend!r}")
        self.budget = NodeBudget(max_nodes, cpu=None, accelerator=None)
        self._datastore_arg = datastore
        self.datastore: DReSDDatastore | None = datastore if isinstance(datastore, DReSDDatastore) else None
        self.num_drafts, self.len_drafts = num_drafts, len_drafts
        self.search_k = 4 * num_drafts if search_k is None else search_k
        self.backend = backend
        self.max_nodes: int | None = None
        self._query: torch.Tensor | None = None

    def begin(self, state) -> None:
        if state.input_ids.shape[0] != 1:
            raise ValueError("DReSDDrafter supports batch size 1 only")
        if self.datastore is None:
            arg = self._datastore_arg
            self.datastore = DReSDDatastore.load(None if arg == "shipped" else arg, backend=self.backend)
        self.datastore.check(state.model)
        self.max_nodes = self.budget.resolve(state.model.device, model=state.model)
        self._query = None

    def drafts(self, hidden: torch.Tensor, predicted: int) -> list[list[int]]:
        """The continuations drafted from ``hidden`` (the state that predicted the committed token
        ``predicted``): after ``predicted`` in the neighbours that predicted it too, nearest first."""
        conts, _ = self.datastore.neighbours(hidden, self.search_k)
        out = [c[1:1 + self.len_drafts] for c in conts if len(c) > 1 and c[0] == predicted]
        return out[: self.num_drafts]

    def propose(self, state) -> Draft:
        if self._query is None:
            return Draft(DraftTree.empty())
        drafts = self.drafts(self._query, int(state.input_ids[0, -1]))
        if not drafts:
            return Draft(DraftTree.empty())
        if self.max_nodes is None:
            return Draft(DraftTree.from_sequences(drafts))
        return Draft(continuation_trie(drafts, self.max_nodes))

    def observe(self, state, result: VerifyResult) -> None:
        h = result.hidden_states
        s = h.shape[0] - len(result.draft.tree)  # uncached committed tokens (the root is the last of them)
        row = s + result.accepted[-1] if result.accepted else s - 1
        self._query = h[row].detach().float().cpu()
