"""Tiny random checkpoints made with transformers (the test oracle), cached per test session.

Each entry of ``SPECS`` is a transformers config with deliberately awkward settings (short GPT-Neo window,
partial rotary, GQA, llama3 rope scaling, biases, sliding window ...). ``make_checkpoint`` writes a Hugging
Face folder (config.json, model.safetensors, tokenizer files, generation_config.json) that prosa must load and
run exactly like transformers does.
"""
from __future__ import annotations

from pathlib import Path

# A small byte-level BPE trained on this text; every byte is in the alphabet so any string encodes.
CORPUS = [
    "A story about a man and a dog. The dog ran to the park and the man followed him.",
    "You: hello!, how are you?\nHe: I am fine, thanks.\nYou: Do you like pizza?\nHe: Yes, I love pizza.",
    "Ação, coração, pão e feijão. Olá, como você está? Eu estou bem, obrigado.",
    "日本語のテキストと中文的文本。 🙂 👍🏽 emoji 👨‍👩‍👧 family.",
    "def main():\n    print('hello world')\n    return 0\n",
    "Once upon a time there was a little model that generated text on a laptop CPU.",
] * 20

EOS = "<|endoftext|>"
VOCAB_SIZE = 384
HIDDEN = 64
HEADS = 4
CONTEXT = 128

# name -> (transformers config class name, kwargs). Sizes are tiny; settings are the awkward ones.
SPECS: dict[str, tuple[str, dict]] = {
    "gpt2": ("GPT2Config", dict(n_layer=2, n_embd=HIDDEN, n_head=HEADS, n_positions=CONTEXT)),
    "gpt_neo": ("GPTNeoConfig", dict(num_layers=4, hidden_size=HIDDEN, num_heads=HEADS,
                                     attention_types=[[["global", "local"], 2]], window_size=7,
                                     max_position_embeddings=CONTEXT)),
    "gptj": ("GPTJConfig", dict(n_layer=2, n_embd=HIDDEN, n_head=HEADS, rotary_dim=6, n_positions=CONTEXT)),
    "gpt_neox": ("GPTNeoXConfig", dict(num_hidden_layers=2, hidden_size=HIDDEN, num_attention_heads=HEADS,
                                       intermediate_size=4 * HIDDEN, rotary_pct=0.25, use_parallel_residual=True,
                                       max_position_embeddings=CONTEXT)),
    "gpt_neox_seq": ("GPTNeoXConfig", dict(num_hidden_layers=2, hidden_size=HIDDEN, num_attention_heads=HEADS,
                                           intermediate_size=4 * HIDDEN, rotary_pct=0.25,
                                           use_parallel_residual=False, max_position_embeddings=CONTEXT)),
    "llama": ("LlamaConfig", dict(num_hidden_layers=2, hidden_size=HIDDEN, num_attention_heads=HEADS,
                                  num_key_value_heads=2, intermediate_size=96, max_position_embeddings=CONTEXT,
                                  tie_word_embeddings=False,
                                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    "llama_linear": ("LlamaConfig", dict(num_hidden_layers=2, hidden_size=HIDDEN, num_attention_heads=HEADS,
                                         num_key_value_heads=1, intermediate_size=96,
                                         max_position_embeddings=CONTEXT, tie_word_embeddings=True,
                                         rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "qwen2": ("Qwen2Config", dict(num_hidden_layers=2, hidden_size=HIDDEN, num_attention_heads=HEADS,
                                  num_key_value_heads=2, intermediate_size=96, max_position_embeddings=CONTEXT,
                                  tie_word_embeddings=True)),
    "mistral": ("MistralConfig", dict(num_hidden_layers=2, hidden_size=HIDDEN, num_attention_heads=HEADS,
                                      num_key_value_heads=2, intermediate_size=96, max_position_embeddings=CONTEXT,
                                      sliding_window=8, tie_word_embeddings=False)),
}


def make_tokenizer_folder(path: Path, *, add_bos: bool = False) -> None:
    """Train a tiny byte-level BPE and save it the way transformers does (tokenizer.json + tokenizer_config.json)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=EOS)
    if add_bos:
        fast.add_bos_token = True
    fast.save_pretrained(path)


def make_checkpoint(name: str, path: Path, *, safe_serialization: bool = True,
                    max_shard_size: str | None = None, seed: int = 0) -> Path:
    """Write a tiny random checkpoint for ``SPECS[name]`` into ``path`` and return it.

    Args:
        name: a key of SPECS.
        path: target folder (created).
        safe_serialization: False writes pytorch_model.bin instead of model.safetensors.
        max_shard_size: e.g. "40KB" to write a sharded checkpoint with an index.
        seed: torch seed for the random init.
    """
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, GenerationConfig

    cls_name, kwargs = SPECS[name]
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    make_tokenizer_folder(path)
    from tokenizers import Tokenizer as _T

    vocab = _T.from_file(str(path / "tokenizer.json")).get_vocab_size()
    eos_id = _T.from_file(str(path / "tokenizer.json")).token_to_id(EOS)
    config = getattr(transformers, cls_name)(vocab_size=vocab, bos_token_id=eos_id, eos_token_id=eos_id,
                                             initializer_range=0.1, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.save_pretrained(path, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    if not safe_serialization:
        # transformers 5 only writes safetensors; a pytorch_model.bin is a torch.save'd state dict.
        from safetensors.torch import load_file

        torch.save(load_file(path / "model.safetensors"), path / "pytorch_model.bin")
        (path / "model.safetensors").unlink()
    GenerationConfig(bos_token_id=eos_id, eos_token_id=eos_id).save_pretrained(path)
    return path


def make_big_llama(path: Path) -> Path:
    """A Llama checkpoint with ~218 MB of float32 weights in 16 layers (for peak-memory tests), written as two
    shards so that a layer straddles files; random weights, the tiny tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    make_tokenizer_folder(path)
    config = LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=512, intermediate_size=1536, num_hidden_layers=16,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=CONTEXT,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path, max_shard_size="120MB")
    return path


def left_pad(prompts, pad_id: int, device=None):
    """Prompts of different lengths -> (input_ids (B, T), attention_mask (B, T) or None), padded on the left so
    that every sequence's next token is the last column (a padded batch for the plain ``KVCache``)."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    if bool(mask.all()):
        return ids.to(device), None
    return ids.to(device), mask.to(device)
