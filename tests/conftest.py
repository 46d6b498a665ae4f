"""Shared fixtures: tiny random models of two architectures (fast unit tests) and the real default model."""

from __future__ import annotations

import os

import pytest
import torch

# One intra-op thread: on the 2-core CI machine batch-1 generation of the default model is as fast with one thread as
# with two (measured: 2.78-2.95 s vs 2.87-2.99 s for 40 tokens), and two threads collapse (7-16x slower) as soon as
# anything else runs on the machine (the suite runs on two xdist workers). The notebooks' kernels inherit the
# environment variable.
torch.set_num_threads(1)
os.environ["OMP_NUM_THREADS"] = "1"


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=512,
                     bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


@pytest.fixture(scope="session")
def tiny_llama():
    return _tiny_llama()


@pytest.fixture(scope="session")
def tiny_gpt2():
    return _tiny_gpt2()


@pytest.fixture(scope="session", params=["llama", "gpt2"])
def tiny_model(request):
    """A tiny random causal LM, parametrised over two architectures (vocab 128, eos 2, pad 0)."""
    return _tiny_llama() if request.param == "llama" else _tiny_gpt2()


@pytest.fixture(scope="session")
def smollm():
    """``(model, tokenizer)`` of the embedded default model SmolLM2-135M-Instruct (fp32, CPU)."""
    from hf_decoding_ext.core.models import load_model

    return load_model()
