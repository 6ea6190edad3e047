"""A small byte-level BPE tokenizer trained in the test session (nothing downloaded), with InternVL-X's tokens."""

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

CORPUS = [
    "What digit is in the top-left? Read the digits left to right.",
    "The image shows a cat sitting on a red chair next to a window.",
    "Describe the picture in detail, including specific numbers.",
    "你好，世界。这是一张图片。请描述图像中的内容。",
    "0123456789 3.14159 2026-11-22   multiple   spaces\tand tabs\nnew lines",
] * 20


def build_tokenizer(prepare_tokenizer) -> PreTrainedTokenizerFast:
    """Train the tokenizer, wrap it for Transformers and add the InternVL-X special tokens with `prepare_tokenizer`."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>"
    )
    prepare_tokenizer(fast)
    return fast
