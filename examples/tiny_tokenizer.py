"""A small byte-level BPE tokenizer trained on a given corpus, with InternVL-X's special tokens (no download)."""

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast


def train_tokenizer(corpus: list[str], prepare_tokenizer, vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """Train on `corpus`, wrap for Transformers (BOS added), then add the InternVL-X tokens with `prepare_tokenizer`
    (the bundle's `processing_internvl_x.prepare_tokenizer`)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(corpus, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>"
    )
    prepare_tokenizer(fast)
    return fast
