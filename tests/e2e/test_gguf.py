"""GGUF -> HF folder: a tiny Llama written as llama.cpp writes it (its tensor names, q/k rows
permuted for its rope layout, float32) comes back as an HF folder with the original model's
logits, and converts to a base checkpoint like any other."""

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="the gguf package (the test extra) is not installed")


def _llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row order (its convert script's permute)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_gguf(model, path):
    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    sd = {k: v.float().numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    names = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for i in range(c.num_hidden_layers):
        for hf, cpp in names.items():
            t = sd[f"model.layers.{i}.{hf}.weight"]
            if hf == "self_attn.q_proj":
                t = _llama_cpp_permute(t, c.num_attention_heads)
            elif hf == "self_attn.k_proj":
                t = _llama_cpp_permute(t, c.num_key_value_heads)
            w.add_tensor(f"blk.{i}.{cpp}.weight", np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_a_gguf_file_becomes_an_hf_folder_with_the_same_logits(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from milora_megatron.checkpoint.base import BaseCheckpoint
    from milora_megatron.convert.gguf import gguf_to_hf
    from milora_megatron.convert.importer import convert_hf_to_megatron

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=False)
    original = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in original.parameters():
            p.normal_(0.0, 0.3)
    _write_gguf(original, tmp_path / "tiny.gguf")
    out = gguf_to_hf(str(tmp_path / "tiny.gguf"), str(tmp_path / "hf"), dtype="float32")
    restored = AutoModelForCausalLM.from_pretrained(out).eval()
    tokens = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = original(tokens).logits, restored(tokens).logits
    assert want.std() > 0.5 and (got - want).abs().max() <= 1e-4
    ckpt = convert_hf_to_megatron(out, str(tmp_path / "ckpt"), tp=2, progress=False)
    assert BaseCheckpoint(ckpt).shape.heads == 4
    with pytest.raises(FileExistsError):
        gguf_to_hf(str(tmp_path / "tiny.gguf"), out)
