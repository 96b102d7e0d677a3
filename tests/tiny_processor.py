"""A tiny word-level tokenizer and LLaVA-1.5 processor for tests (no downloads)."""

from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast


SPECIAL_WORDS = ["<unk>", "<s>", "</s>", "USER:", "ASSISTANT:"]


def tiny_tokenizers_model(vocab_size: int = 64) -> Tokenizer:
    """A `tokenizers` word-level model over `vocab_size` words (`<unk>`, `<s>`, `</s>`, `USER:`, `ASSISTANT:`, then
    `w0`, `w1`, ...) that prepends BOS like Llama's tokenizer."""
    words = SPECIAL_WORDS + [f"w{index}" for index in range(vocab_size - len(SPECIAL_WORDS))]
    tokenizer = Tokenizer(models.WordLevel({word: index for index, word in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return tokenizer


def tiny_tokenizer(vocab_size: int = 64) -> PreTrainedTokenizerFast:
    """The tiny model as a transformers tokenizer (what a LLaVA-1.5 checkpoint folder holds: no `<image>` yet)."""
    return PreTrainedTokenizerFast(
        tokenizer_object=tiny_tokenizers_model(vocab_size), bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
