"""Runs Hugging Face transformers (torch, CPU) for the parity tests; Python 3.11 venv.

python hf_reference.py make  llama|llama3|linear|mistral DIR TOKENS.npy OUT.npy  # random tiny model
python hf_reference.py logits DIR TOKENS.npy OUT.npy                # load a directory
"""

import sys

import numpy as np
import torch
import transformers


def tiny_config(kind):
    common = dict(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )
    if kind == "llama":
        return transformers.LlamaConfig(rope_theta=10000.0, **common)
    if kind == "llama3":  # Llama 3.1 RoPE scaling; a small original context so
        # that the 16-dim heads have scaled, blended and kept frequencies
        scaling = dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=32,
        )
        return transformers.LlamaConfig(rope_theta=10000.0, rope_scaling=scaling, **common)
    if kind == "linear":
        scaling = dict(rope_type="linear", factor=4.0)
        return transformers.LlamaConfig(rope_theta=10000.0, rope_scaling=scaling, **common)
    return transformers.MistralConfig(rope_theta=1e6, sliding_window=6, **common)


def logits(model, tokens):
    with torch.no_grad():
        return model(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()


def main():
    mode = sys.argv[1]
    torch.manual_seed(0)
    if mode == "make":
        kind, path, tokens_path, out_path = sys.argv[2:6]
        config = tiny_config(kind)
        config._attn_implementation = "eager"
        model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
        model.save_pretrained(path, safe_serialization=True)
    else:
        path, tokens_path, out_path = sys.argv[2:5]
        model = transformers.AutoModelForCausalLM.from_pretrained(
            path, torch_dtype=torch.float32, attn_implementation="eager"
        ).eval()
    np.save(out_path, logits(model, np.load(tokens_path)))


if __name__ == "__main__":
    main()
