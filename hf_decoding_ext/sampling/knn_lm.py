"""kNN-LM (Khandelwal et al., 2020): a datastore of hidden states and a ``LogitsProcessor`` interpolating with it."""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from transformers import LogitsProcessor
from hf_decoding_ext.core.anatomy import final_norm, lm_head
from hf_decoding_ext.core.lifecycle import StatefulLogitsProcessor
from hf_decoding_ext.core.ngram_lm import shipped_docstrings

FORMAT_VERSION = "1"


def _final_representation_module(model) -> tuple[torch.nn.Module, str]:
    """The module whose output feeds the LM head: the decoder's final norm, else the LM head itself (pre-hook)."""
    try:
        return final_norm(model), "norm"
    except ValueError:
        pass
    try:
        return lm_head(model), "head"
    except ValueError:
        raise ValueError(f"cannot find the final norm or the LM head of {type(model).__name__}") from None


class HiddenStateCapture:
    """Keeps the last output of the model's final norm (the hidden states feeding the LM head).

    A forward hook on the final norm (``model.model.norm`` for Llama-like models, ``transformer.ln_f`` for GPT-2, ...)
    stores its output, shape ``(batch, seq, hidden)``, at each forward pass; when no final norm is found, a forward
    pre-hook on the LM head stores the LM head's input instead (only the positions whose logits are computed).
    ``version`` counts the captured forwards. Call :meth:`remove` to detach it.
    """

    def __init__(self, model):
        module, kind = _final_representation_module(model)
        self.kind = kind
        self.hidden: torch.Tensor | None = None
        self.version = 0
        if kind == "norm":
            self._handle = module.register_forward_hook(self._on_output)
        else:
            self._handle = module.register_forward_pre_hook(self._on_input)

    def _on_output(self, module, args, output):
        self.hidden = (output[0] if isinstance(output, (tuple, list)) else output).detach()
        self.version += 1

    def _on_input(self, module, args):
        self.hidden = args[0].detach()
        self.version += 1

    def remove(self):
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self.hidden = None

    @property
    def attached(self) -> bool:
        return self._handle is not None


def _token_windows(tokenizer, texts: Iterable[str], max_length: int) -> list[list[int]]:
    """Tokenise each text and cut it into consecutive windows of at most ``max_length`` tokens (length >= 2)."""
    windows = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        for start in range(0, len(ids), max_length):
            window = ids[start:start + max_length]
            if len(window) >= 2:
                windows.append(window)
    return windows


def _right_padded(windows: Sequence[Sequence[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(w) for w in windows)
    ids = torch.zeros((len(windows), width), dtype=torch.long)
    mask = torch.zeros((len(windows), width), dtype=torch.long)
    for i, w in enumerate(windows):
        ids[i, :len(w)] = torch.tensor(w, dtype=torch.long)
        mask[i, :len(w)] = 1
    return ids.to(device), mask.to(device)


def _forward_hidden(model, capture: HiddenStateCapture, ids, mask) -> torch.Tensor:
    """Run the model and return the captured final hidden states ``(batch, seq, hidden)``."""
    kwargs = {"logits_to_keep": 1} if capture.kind == "norm" else {}
    model(input_ids=ids, attention_mask=mask, use_cache=False, **kwargs)
    if capture.hidden is None or capture.hidden.shape[1] != ids.shape[1]:
        raise RuntimeError("the hidden-state hook did not capture the full sequence")
    return capture.hidden


def _model_name(model) -> str:
    return str(getattr(model, "name_or_path", "") or getattr(getattr(model, "config", None), "_name_or_path", "") or "")


class KNNDatastore:
    """Datastore of a kNN-LM: keys are the model's final hidden states, values the tokens that follow them.

    For each position ``i`` of each text the key is the representation feeding the LM head (the output of the final
    norm) at ``i`` and the value is token ``i + 1``, as in "Generalization through Memorization: Nearest Neighbor
    Language Models" (Khandelwal et al., 2020, arXiv:1911.00172). Search is exact (brute force) in torch on the squared
    L2 distance, which is what the paper's FAISS ``IndexFlatL2`` returns, with chunked matrix products (fast for
    ~50k entries on CPU; the paper's approximate FAISS index is unnecessary at this size).

    Args:
        keys (`torch.Tensor`): ``(N, hidden)``, float16 or float32.
        values (`torch.Tensor`): ``(N,)`` token ids (int64).
        metadata (`dict`, *optional*): string metadata (model name, hidden size, vocabulary size, ...).

    Examples:

    ```python
    >>> from hf_decoding_ext.core.models import load_model
    >>> from hf_decoding_ext.sampling.knn_lm import KNNDatastore
    >>> model, tokenizer = load_model()  # doctest: +SKIP
    >>> store = KNNDatastore.build(model, tokenizer, ["Some domain text.", "More text."])  # doctest: +SKIP
    >>> store.save("store.safetensors")  # doctest: +SKIP
    >>> store = KNNDatastore.load("store.safetensors")  # doctest: +SKIP
    >>> distances, tokens = store.search(store.keys[:3].float(), k=4)  # doctest: +SKIP
    ```
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, metadata: dict | None = None):
        if keys.dim() != 2:
            raise ValueError(f"keys must be (N, hidden), got shape {tuple(keys.shape)}")
        if keys.dtype not in (torch.float16, torch.float32):
            raise ValueError(f"keys must be float16 or float32, got {keys.dtype}")
        if values.dim() != 1 or values.shape[0] != keys.shape[0]:
            raise ValueError(f"values must be (N,) with N = {keys.shape[0]}, got shape {tuple(values.shape)}")
        if keys.shape[0] == 0:
            raise ValueError("a datastore needs at least one entry")
        self.keys = keys
        self.values = values.long()
        self.metadata = {str(k): str(v) for k, v in (metadata or {}).items()}
        self.metadata.setdefault("hidden_size", str(keys.shape[1]))
        self.metadata["num_entries"] = str(keys.shape[0])
        self.metadata["key_dtype"] = str(keys.dtype).replace("torch.", "")
        self._search_cache: tuple | None = None  # (device, float32 keys, squared norms)

    def __len__(self) -> int:
        return self.keys.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.keys.shape[1]

    @property
    def vocab_size(self) -> int | None:
        v = self.metadata.get("vocab_size")
        return int(v) if v and v.isdigit() else None

    def __repr__(self) -> str:
        return (f"KNNDatastore(entries={len(self)}, hidden_size={self.hidden_size}, "
                f"model={self.metadata.get('model', '?')!r}, key_dtype={self.metadata['key_dtype']})")

    @classmethod
    @torch.no_grad()
    def build(
        cls,
        model,
        tokenizer,
        texts: Iterable[str],
        batch_size: int = 8,
        max_length: int = 512,
        key_dtype: torch.dtype = torch.float16,
        progress: bool = True,
    ) -> KNNDatastore:
        """Run ``model`` over ``texts`` and store (final hidden state at ``i``, token ``i + 1``) for every position.

        Texts longer than ``max_length`` tokens are cut into consecutive windows (each window starts without the
        previous window as context; the pair across a cut is skipped). A tqdm bar counts the tokens.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}")
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"`max_length` must be an integer >= 2, got {max_length!r}")
        if key_dtype not in (torch.float16, torch.float32):
            raise ValueError(f"`key_dtype` must be torch.float16 or torch.float32, got {key_dtype}")
        if isinstance(texts, str):
            texts = [texts]
        windows = _token_windows(tokenizer, texts, max_length)
        if not windows:
            raise ValueError("no text with at least two tokens to build a datastore from")
        windows.sort(key=len, reverse=True)  # similar lengths per batch: little padding
        from tqdm.auto import tqdm

        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        capture = HiddenStateCapture(model)
        keys, values = [], []
        try:
            with tqdm(total=sum(len(w) for w in windows), desc="Building kNN-LM datastore", unit="tok",
                      disable=not progress) as bar:
                for start in range(0, len(windows), batch_size):
                    batch = windows[start:start + batch_size]
                    ids, mask = _right_padded(batch, device)
                    hidden = _forward_hidden(model, capture, ids, mask)
                    # position i -> token i + 1, for real (non-padded) positions only
                    keep = (mask[:, 1:] == 1)
                    keys.append(hidden[:, :-1][keep].to("cpu", key_dtype))
                    values.append(ids[:, 1:][keep].to("cpu"))
                    bar.update(sum(len(w) for w in batch))
        finally:
            capture.remove()
            model.train(was_training)
        config = getattr(model, "config", None)
        vocab = getattr(config, "vocab_size", None) or model.get_output_embeddings().weight.shape[0]
        metadata = {
            "format_version": FORMAT_VERSION,
            "model": _model_name(model),
            "hidden_size": str(keys[0].shape[-1]),
            "vocab_size": str(vocab),
            "max_length": str(max_length),
            "num_texts": str(len(texts) if hasattr(texts, "__len__") else -1),
        }
        return cls(torch.cat(keys), torch.cat(values), metadata)

    def save(self, path: str | Path) -> None:
        """Write the datastore as a safetensors file (``keys``, ``values`` and the metadata)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file({"keys": self.keys.contiguous().cpu(), "values": self.values.contiguous().cpu()}, str(tmp),
                  metadata=self.metadata)
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> KNNDatastore:
        """Read a datastore written by :meth:`save`."""
        from safetensors import safe_open

        path = Path(path)
        if not path.exists():
            raise ValueError(f"no datastore at {path}")
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            names = set(f.keys())
            if not {"keys", "values"} <= names:
                raise ValueError(f"{path} is not a kNN-LM datastore (tensors: {sorted(names)})")
            keys, values = f.get_tensor("keys"), f.get_tensor("values")
        return cls(keys, values, metadata)

    def _prepared(self, device: torch.device):
        if self._search_cache is None or self._search_cache[0] != device:
            keys = self.keys.to(device=device, dtype=torch.float32)
            self._search_cache = (device, keys, (keys * keys).sum(-1), self.values.to(device))
        return self._search_cache[1:]

    @torch.no_grad()
    def search(
        self, queries: torch.Tensor, k: int, query_chunk: int = 256, key_chunk: int = 65536
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact k nearest neighbours: ``(squared L2 distances, value tokens)``, both ``(Q, min(k, N))``, nearest first.

        ``queries`` is ``(Q, hidden)``; the search runs on the queries' device in float32.
        """
        if queries.dim() != 2 or queries.shape[1] != self.hidden_size:
            raise ValueError(f"queries must be (Q, {self.hidden_size}), got shape {tuple(queries.shape)}")
        keys, key_norms, values = self._prepared(queries.device)
        n = keys.shape[0]
        k = min(int(k), n)
        q_all = queries.float()
        out_d, out_i = [], []
        for qs in range(0, q_all.shape[0], query_chunk):
            q = q_all[qs:qs + query_chunk]
            q_norm = (q * q).sum(-1, keepdim=True)
            best_d = best_i = None
            for ks in range(0, n, key_chunk):
                kc = keys[ks:ks + key_chunk]
                d = torch.addmm(key_norms[ks:ks + key_chunk].unsqueeze(0) + q_norm, q, kc.T, alpha=-2.0)
                d.clamp_(min=0.0)
                dd, ii = torch.topk(d, min(k, kc.shape[0]), dim=-1, largest=False, sorted=True)
                ii = ii + ks
                if best_d is not None:
                    dd, order = torch.topk(torch.cat([best_d, dd], -1), k, dim=-1, largest=False, sorted=True)
                    ii = torch.cat([best_i, ii], -1).gather(-1, order)
                best_d, best_i = dd, ii
            out_d.append(best_d)
            out_i.append(best_i)
        idx = torch.cat(out_i)
        return torch.cat(out_d), values[idx]


def default_datastore_path(model) -> Path | None:
    """Cache file of the datastore built from the shipped ``stdlib_docs.jsonl`` for ``model`` (None if unnamed)."""
    from hf_decoding_ext.core.models import cache_dir

    name = _model_name(model)
    if not name:
        return None
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name).name or name)[:64]
    digest = hashlib.sha1(name.encode()).hexdigest()[:10]
    return cache_dir() / "knn_lm" / f"{slug}-{digest}-stdlib_docs.safetensors"


def stdlib_docs_texts() -> list[str]:
    """The texts of the shipped ``hf_decoding_ext/data/stdlib_docs.jsonl`` corpus."""
    return shipped_docstrings()


class KNNLMLogitsProcessor(StatefulLogitsProcessor, LogitsProcessor):
    r"""
    [`LogitsProcessor`] for the kNN-LM of "Generalization through Memorization: Nearest Neighbor Language Models"
    (Khandelwal, Levy, Jurafsky, Zettlemoyer and Lewis, ICLR 2020, arXiv:1911.00172), as evaluated for open-ended
    generation in "KNN-LM Does Not Improve Open-ended Text Generation" (Wang, Xu, Iyyer, 2023, arXiv:2305.14625).

    The next-token distribution is interpolated with a distribution read off the ``k`` nearest neighbours of the
    current context representation in a :class:`KNNDatastore`:

    .. math::

        p(y \mid x) = \lambda \, p_{kNN}(y \mid x) + (1 - \lambda) \, p_{LM}(y \mid x), \qquad
        p_{kNN}(y \mid x) \propto \sum_{(k_i, v_i) \in \mathcal{N}(x)} \mathbb{1}[y = v_i] \exp(-d(q, k_i) / T),

    with ``d`` the squared L2 distance between the query ``q`` (the hidden state feeding the LM head, i.e. the output
    of the final norm, at the last position) and the keys. The processor returns ``log p``.

    **How the query is obtained.** A ``LogitsProcessor`` only receives ``(input_ids, scores)``, so the processor
    registers a forward hook on the model's final norm (:class:`HiddenStateCapture`); every forward pass of the model
    stores the final hidden states and the processor reads the last position of the latest one. Build it with
    :meth:`for_model` (or pass ``model=``), and detach the hook with :meth:`remove` or by using the processor as a
    context manager. When the latest forward covers several positions or other rows than the scores (the
    speculative engine's tree verification, a branch of candidate rows, a superposed forward), the caller says where
    the query is with :meth:`locate` (the lifecycle of :class:`~hf_decoding_ext.core.lifecycle.StatefulLogitsProcessor`;
    forks share the hook and each keeps its own location), so each tree node reads the hidden state of its own
    position. :meth:`interpolate` is the vectorised interpolation shared by the processor and teacher-forced
    evaluation (:func:`evaluate_perplexity`).

    Defaults are the paper's: ``k=1024`` neighbours, ``lmbda=0.25`` (their WikiText-103 value) and temperature 1.
    Deviations: the search is exact (the paper uses an approximate FAISS index, here unnecessary for a small
    datastore), and the key is the final-norm output, which is the representation feeding the LM head (the paper's
    best key for its own architecture was the input of the last feed-forward layer, after layer norm; the task here
    fixes the LM-head input). Tokens already banned by an earlier processor (``-inf`` score) stay banned: their kNN
    mass is dropped and the distribution renormalised. Use greedy decoding (``do_sample=False``, the registry's
    default) or sampling over the returned log-probabilities.

    Wang et al. (2023) find that, although kNN-LM lowers perplexity, it does not improve open-ended generation
    quality (MAUVE and human judgements are on par with the base LM); that interpolation raises the loss of most
    tokens, the overall gain coming from a minority; and that the retrieval distribution becomes flatter (higher
    entropy) faster than the LM's as the generated text drifts away from the datastore. Measured here with
    ``scripts/bench_knn_lm_open_ended.py`` (``results/knn_lm_open_ended.json``; SmolLM2-135M, datastore of 80% of
    the shipped docstrings, the other 20% held out, nucleus sampling p=0.9, 146 prefixes x 40 tokens, 2 seeds,
    MAUVE of :mod:`hf_decoding_ext.bench.mauve` on this model's own features): held-out perplexity 30.46 ->
    25.17, but MAUVE 0.934 vs the base model's 0.959 (no gain on either seed), so the headline finding is
    reproduced; the loss rises on 71% of held-out tokens (reproduced); the third finding is not: with ``T=1`` on
    squared L2 distances ``p_kNN`` is nearly one-hot (0.03 nats) and its entropy grows more slowly than
    ``p_LM``'s along generations. On docstrings of other stdlib modules (outside the datastore's modules) the
    perplexity rises instead (36.76 -> 40.40, ``results/knn_lm_open_ended_other_modules.json``). No claim of
    better generations is made. :func:`token_scores` gives the per-token scores and entropies behind these figures.

    Args:
        datastore (`KNNDatastore`): the datastore built with the same model.
        lmbda (`float`, *optional*, defaults to 0.25): interpolation weight of the kNN distribution, in ``[0, 1]``.
        k (`int`, *optional*, defaults to 1024): number of neighbours (capped at the datastore size).
        temperature (`float`, *optional*, defaults to 1.0): softmax temperature over negative distances.
        model (*optional*): the model whose final norm is hooked; without it, attach later with :meth:`attach`.

    Examples:

    ```python
    >>> from hf_decoding_ext.core.models import load_model, encode_prompts
    >>> from hf_decoding_ext.sampling.knn_lm import KNNLMLogitsProcessor
    >>> model, tokenizer = load_model()  # doctest: +SKIP
    >>> inputs = encode_prompts(tokenizer, ["What does json.dumps do?"])  # doctest: +SKIP
    >>> with KNNLMLogitsProcessor.for_model(model, tokenizer) as knn:  # doctest: +SKIP
    ...     out = model.generate(**inputs, logits_processor=[knn], do_sample=False, max_new_tokens=40)
    ```
    """

    def __init__(
        self,
        datastore: KNNDatastore,
        lmbda: float = 0.25,
        k: int = 1024,
        temperature: float = 1.0,
        model=None,
    ):
        if not isinstance(datastore, KNNDatastore):
            raise ValueError(f"`datastore` must be a KNNDatastore, got {type(datastore).__name__}")
        if isinstance(lmbda, bool) or not isinstance(lmbda, (int, float)) or not 0.0 <= lmbda <= 1.0:
            raise ValueError(f"`lmbda` must be a number in [0, 1], got {lmbda!r}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"`k` must be a positive integer, got {k!r}")
        if (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
                or not math.isfinite(temperature) or temperature <= 0):
            raise ValueError(f"`temperature` must be a positive finite number, got {temperature!r}")
        self.datastore = datastore
        self.lmbda = float(lmbda)
        self.k = k
        self.temperature = float(temperature)
        self._capture: HiddenStateCapture | None = None
        self.reset()
        if model is not None:
            self.attach(model)

    # lifecycle ----------------------------------------------------------------------------------------------------
    state_attributes = ("_located",)

    def reset(self) -> None:
        """Forget a pending :meth:`locate` (the hook stays attached)."""
        self._located: tuple | None = None  # (capture version, rows, positions) for the next call

    def copy_state(self, value):
        return value  # an immutable tuple of tensors that are never modified in place

    def select_rows(self, indices: torch.LongTensor) -> None:
        """Nothing to carry: the query is read from the model's next forward (use :meth:`locate` when the scores
        come from rows of the latest forward other than its own)."""

    def locate(self, rows: torch.LongTensor | None = None, positions: torch.LongTensor | None = None) -> None:
        """Read the next query at rows ``rows`` and positions ``positions`` (``(batch,)``; negative positions count
        from the end) of the latest captured forward instead of its last position of every row."""
        version = None if self._capture is None else self._capture.version
        self._located = (version, rows, positions)

    @classmethod
    def for_model(
        cls,
        model,
        tokenizer=None,
        datastore: KNNDatastore | str | Path | None = None,
        lmbda: float = 0.25,
        k: int = 1024,
        temperature: float = 1.0,
    ) -> KNNLMLogitsProcessor:
        """Build the processor and hook it on ``model``.

        ``datastore`` may be a :class:`KNNDatastore`, a path to a saved one, or ``None``: then the datastore built
        from the shipped ``stdlib_docs.jsonl`` is loaded from the cache (``models.cache_dir()/knn_lm``, keyed by the
        model name), or built with a progress bar and cached (an unnamed model's datastore is not cached).
        """
        if datastore is None:
            if tokenizer is None:
                raise ValueError("building the default datastore needs the tokenizer")
            path = default_datastore_path(model)
            store = None
            if path is not None and path.exists():
                store = KNNDatastore.load(path)
                if store.hidden_size != model.config.hidden_size:
                    store = None  # stale cache entry: rebuild
            if store is None:
                store = KNNDatastore.build(model, tokenizer, stdlib_docs_texts())
                if path is not None:
                    store.save(path)
            datastore = store
        elif isinstance(datastore, (str, Path)):
            datastore = KNNDatastore.load(datastore)
        hidden = getattr(getattr(model, "config", None), "hidden_size", None)
        if hidden is not None and datastore.hidden_size != hidden:
            raise ValueError(
                f"the datastore's keys have size {datastore.hidden_size} but the model's hidden size is {hidden}; "
                "build the datastore with this model"
            )
        return cls(datastore, lmbda=lmbda, k=k, temperature=temperature, model=model)

    # hook management -------------------------------------------------------------------------------------------
    def attach(self, model) -> KNNLMLogitsProcessor:
        """Register the hidden-state hook on ``model`` (replacing a previous one)."""
        self.remove()
        self._capture = HiddenStateCapture(model)
        return self

    def remove(self) -> None:
        """Detach the hook from the model."""
        if self._capture is not None:
            self._capture.remove()
            self._capture = None

    def __enter__(self) -> KNNLMLogitsProcessor:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    @property
    def last_hidden(self) -> torch.Tensor | None:
        """Final hidden states of the latest forward pass, ``(batch, seq, hidden)``, or None."""
        return None if self._capture is None else self._capture.hidden

    # the interpolation ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def knn_log_probs(self, hidden: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """``log p_kNN`` over the vocabulary for queries ``(Q, hidden)``, float32 ``(Q, vocab_size)``."""
        dist, tokens = self.datastore.search(hidden, self.k)
        if int(tokens.max()) >= vocab_size:
            raise ValueError(f"the datastore holds token ids >= the vocabulary size {vocab_size}")
        weights = torch.softmax(-dist / self.temperature, dim=-1)
        p_knn = torch.zeros((hidden.shape[0], vocab_size), dtype=torch.float32, device=hidden.device)
        p_knn.scatter_add_(1, tokens, weights)
        return p_knn.log()

    @torch.no_grad()
    def interpolate(self, hidden: torch.Tensor, lm_logits: torch.Tensor,
                    log_knn: torch.Tensor | None = None) -> torch.Tensor:
        """``log(lmbda * p_kNN + (1 - lmbda) * p_LM)`` for hidden states ``(..., hidden)`` and logits ``(..., vocab)``.

        Vectorised over all leading dimensions; returns the logits' dtype and shape. ``log_knn`` ``(Q, vocab)``, the
        output of :meth:`knn_log_probs` for these queries, skips the search when the caller already has it.
        """
        if hidden.shape[:-1] != lm_logits.shape[:-1]:
            raise ValueError(f"hidden {tuple(hidden.shape)} and logits {tuple(lm_logits.shape)} do not match")
        vocab = lm_logits.shape[-1]
        logits = lm_logits.reshape(-1, vocab).float()
        queries = hidden.reshape(-1, hidden.shape[-1]).to(logits.device)
        log_lm = torch.log_softmax(logits, dim=-1)
        if log_knn is None:
            log_knn = self.knn_log_probs(queries, vocab)
        elif log_knn.shape != logits.shape:
            raise ValueError(f"`log_knn` must have shape {tuple(logits.shape)}, got {tuple(log_knn.shape)}")
        banned = torch.isneginf(logits)
        if bool(banned.any()):
            log_knn = torch.log_softmax(log_knn.masked_fill(banned, -math.inf), dim=-1)
        if self.lmbda == 0.0:
            mixed = log_lm
        elif self.lmbda == 1.0:
            mixed = log_knn
        else:
            mixed = torch.logaddexp(log_knn + math.log(self.lmbda), log_lm + math.log1p(-self.lmbda))
        if bool(banned.any()):
            mixed = mixed.masked_fill(banned, -math.inf)
            # rows where the kNN put no mass on allowed tokens fall back to the LM alone
            mixed = torch.where(torch.isneginf(mixed).all(-1, keepdim=True), log_lm, mixed)
        return mixed.to(lm_logits.dtype).reshape(lm_logits.shape)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        hidden = self.last_hidden
        if hidden is None:
            raise ValueError(
                "KNNLMLogitsProcessor has no hidden state: build it with KNNLMLogitsProcessor.for_model(model, ...) "
                "or call .attach(model) before generate()"
            )
        located, self._located = self._located, None
        if located is not None and located[0] == self._capture.version and hidden.dim() == 3:
            _, rows, positions = located
            rows = torch.arange(hidden.shape[0], device=hidden.device) if rows is None else rows.to(hidden.device)
            positions = (torch.full_like(rows, -1) if positions is None
                         else torch.as_tensor(positions, device=hidden.device).expand_as(rows))
            query = hidden[rows, positions % hidden.shape[1]]
        else:
            query = hidden[:, -1, :] if hidden.dim() == 3 else hidden
        if query.shape[0] != scores.shape[0]:
            raise ValueError(
                f"the hooked hidden state has batch {query.shape[0]} but the scores have batch {scores.shape[0]}"
            )
        return self.interpolate(query.to(scores.device), scores)


@torch.no_grad()
def token_scores(
    model,
    processor: KNNLMLogitsProcessor,
    input_ids: torch.LongTensor,
    attention_mask: torch.LongTensor | None = None,
    chunk_size: int = 256,
    entropies: bool = False,
) -> dict[str, torch.Tensor]:
    """Teacher-forced per-token scores of right-padded ``input_ids`` ``(batch, seq)`` under the LM and the kNN-LM.

    Position ``t`` scores token ``t + 1``. Returns ``(batch, seq - 1)`` float32 tensors (NaN where the target is
    padding): ``log_p_lm`` and ``log_p_knn_lm``, the gold token's log-probability under the base LM and under the
    interpolation (:meth:`KNNLMLogitsProcessor.interpolate`, the processor's own code path); with ``entropies``
    also ``entropy_lm`` and ``entropy_knn``, the entropies (nats) of ``p_LM`` and of the retrieval distribution
    ``p_kNN`` at each position (the quantity Wang et al. (2023) follow along generated text). Full logits of the
    batch are held in memory.
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"`chunk_size` must be a positive integer, got {chunk_size!r}")
    if processor._capture is None:
        processor.attach(model)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1]
    hidden = processor._capture.hidden[:, :-1]
    keep = attention_mask[:, 1:] == 1
    logits, hidden, targets = logits[keep], hidden[keep], input_ids[:, 1:][keep]
    names = ("log_p_lm", "log_p_knn_lm") + (("entropy_lm", "entropy_knn") if entropies else ())
    flat = {name: [] for name in names}
    for s in range(0, targets.shape[0], chunk_size):
        lg, hd, tg = logits[s:s + chunk_size].float(), hidden[s:s + chunk_size], targets[s:s + chunk_size, None]
        log_lm = torch.log_softmax(lg, -1)
        log_knn = processor.knn_log_probs(hd.to(lg.device), lg.shape[-1])
        flat["log_p_lm"].append(log_lm.gather(-1, tg)[:, 0])
        flat["log_p_knn_lm"].append(processor.interpolate(hd, lg, log_knn=log_knn).float().gather(-1, tg)[:, 0])
        if entropies:
            flat["entropy_lm"].append(torch.special.entr(log_lm.exp()).sum(-1))
            flat["entropy_knn"].append(torch.special.entr(log_knn.exp()).sum(-1))
    out = {}
    for name, parts in flat.items():
        full = torch.full(keep.shape, math.nan, dtype=torch.float32, device=keep.device)
        full[keep] = torch.cat(parts).float() if parts else full[keep]
        out[name] = full
    return out


@torch.no_grad()
def evaluate_perplexity(
    model,
    tokenizer,
    texts: Iterable[str],
    processor: KNNLMLogitsProcessor,
    max_length: int = 512,
    batch_size: int = 4,
    chunk_size: int = 256,
) -> dict[str, float]:
    """Teacher-forced perplexity of ``texts`` under the base LM and under the kNN-LM interpolation.

    Texts are tokenised and windowed like :meth:`KNNDatastore.build`. The model runs over the windows (right-padded
    batches); the per-position hidden states captured by ``processor``'s hook are the queries, and the interpolated
    distribution comes from :meth:`KNNLMLogitsProcessor.interpolate` (the processor's own code path), in chunks of
    ``chunk_size`` positions. Full logits of a batch are held in memory (``batch_size * max_length * vocab`` floats).
    Returns ``{"ppl_lm", "ppl_knn", "tokens"}``.
    """
    device = next(model.parameters()).device
    windows = _token_windows(tokenizer, texts, max_length)
    if not windows:
        raise ValueError("no text with at least two tokens to evaluate")
    nll_lm = nll_knn = 0.0
    count = 0
    for start in range(0, len(windows), batch_size):
        ids, mask = _right_padded(windows[start:start + batch_size], device)
        scores = token_scores(model, processor, ids, mask, chunk_size=chunk_size)
        keep = mask[:, 1:] == 1
        nll_lm -= scores["log_p_lm"][keep].double().sum().item()
        nll_knn -= scores["log_p_knn_lm"][keep].double().sum().item()
        count += int(keep.sum())
    return {"ppl_lm": math.exp(nll_lm / count), "ppl_knn": math.exp(nll_knn / count), "tokens": float(count)}
