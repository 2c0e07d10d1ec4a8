"""Runs Hugging Face transformers (torch, CPU) for the parity tests; Python 3.11 venv.

python hf_reference.py make  KIND DIR TOKENS.npy OUT.npy [PROMPT_LEN NEW GEN.npy]  # random tiny
    model (KIND in tiny_config); optionally also greedy-generates NEW tokens after the
    first PROMPT_LEN tokens (HF's own KV caches) into GEN.npy
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
    if kind == "mistral":
        return transformers.MistralConfig(rope_theta=1e6, sliding_window=6, **common)
    return family_config(kind, common)


# The families below get their weights perturbed after init (see PERTURBED): their
# norms start at 0 (Gemma) and biases at 0 (Qwen2), which would hide a wrong mapping.
# initializer_range 0.2 makes attention and final logits large enough (~10) that the
# soft caps (3 and 2) change them. Windows of 6 are shorter than the 20-token inputs.
PERTURBED = ("qwen2", "qwen3", "gemma2", "gemma3")


def family_config(kind, common):
    if kind == "qwen2":  # layer 0 global, layer 1 sliding (max_window_layers=1)
        return transformers.Qwen2Config(
            rope_theta=1e6, use_sliding_window=True, sliding_window=6, max_window_layers=1, **common
        )
    if kind == "qwen3":  # head_dim 32 != hidden / heads
        return transformers.Qwen3Config(rope_theta=1e6, head_dim=32, **common)
    gemma = dict(
        common,
        head_dim=16,
        query_pre_attn_scalar=24,
        sliding_window=6,
        initializer_range=0.2,
        tie_word_embeddings=True,
    )
    if kind == "gemma2":  # layers: sliding, global, sliding. Untied: with tied large
        # embeddings greedy decoding just repeats the last token (Gemma 3 stays tied).
        gemma.update(num_hidden_layers=3, tie_word_embeddings=False)
        return transformers.Gemma2Config(
            attn_logit_softcapping=3.0, final_logit_softcapping=2.0, **gemma
        )
    assert kind == "gemma3", kind
    # 5:1 like the real models would need 6+ layers; 2:1 keeps the test small. Global
    # layers: base 1e6 with linear scaling x2; local layers: base 1e4, unscaled.
    gemma.update(num_hidden_layers=3)
    rope = {
        "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
    }
    return transformers.Gemma3TextConfig(
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        rope_parameters=rope,
        final_logit_softcapping=2.0,
        **gemma,
    )


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
        if kind in PERTURBED:
            with torch.no_grad():
                for param in model.parameters():
                    param.add_(0.1 * torch.randn_like(param))
        model.save_pretrained(path, safe_serialization=True)
        if len(sys.argv) > 6:
            prompt_len, new, gen_path = int(sys.argv[6]), int(sys.argv[7]), sys.argv[8]
            prompt = torch.as_tensor(np.load(tokens_path)[:, :prompt_len], dtype=torch.long)
            model.generation_config.eos_token_id = None  # exactly NEW tokens, like ours
            with torch.no_grad():
                out = model.generate(  # explicit mask: token 0 is Gemma's pad id
                    prompt,
                    attention_mask=torch.ones_like(prompt),
                    max_new_tokens=new,
                    do_sample=False,
                )
            np.save(gen_path, out[:, prompt_len:].numpy())
    else:
        path, tokens_path, out_path = sys.argv[2:5]
        model = transformers.AutoModelForCausalLM.from_pretrained(
            path, torch_dtype=torch.float32, attn_implementation="eager"
        ).eval()
    np.save(out_path, logits(model, np.load(tokens_path)))


if __name__ == "__main__":
    main()
