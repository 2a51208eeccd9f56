"""A tiny, randomly initialised chat model and a tokenizer trained offline on a chat JSONL.

For tests, the demo and local mode: it plays the "configured base model path" of the
``selfhosted`` provider without downloading anything from a model hub. Needs the
``requirements-selfhosted.txt`` extra.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# A ChatML-like template; the tokenizer's special tokens below are the markers it uses.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _texts(dataset_path: Path) -> Iterator[str]:
    with dataset_path.open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                for message in json.loads(line)["messages"]:
                    yield f"{message['role']}\n{message['content']}"


def build_tiny_tokenizer(dataset_path: str | Path, output_dir: str | Path, *, vocab_size: int = 512) -> Any:
    """Train a byte-level BPE tokenizer on ``dataset_path``; save it with the chat template.

    Needs ``tokenizers`` and ``transformers`` but not torch: enough for token counting.

    :returns: the ``PreTrainedTokenizerFast`` (also saved in ``output_dir``: ``tokenizer.json``,
        ``tokenizer_config.json``, ``chat_template.jinja``).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(_texts(Path(dataset_path)), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<|pad|>",
        eos_token="<|im_end|>",
        bos_token="<|im_start|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(output)
    return fast


def build_tiny_chat_model(
    dataset_path: str | Path,
    output_dir: str | Path,
    *,
    vocab_size: int = 512,
    hidden_size: int = 48,
    layers: int = 2,
    seed: int = 0,
) -> Path:
    """Train a byte-level BPE tokenizer on ``dataset_path`` and save it with a random tiny Llama.

    :returns: ``output_dir``, loadable with ``AutoModelForCausalLM``/``AutoTokenizer`` offline.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    output = Path(output_dir)
    fast = build_tiny_tokenizer(dataset_path, output, vocab_size=vocab_size)

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        pad_token_id=fast.pad_token_id,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(output, safe_serialization=True)
    return output


if __name__ == "__main__":  # pragma: no cover - a developer's helper
    import sys

    print(build_tiny_chat_model(sys.argv[1], sys.argv[2]))
