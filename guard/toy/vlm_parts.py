"""The tiny LLaVA's parts: tokenizer, chat template, processor and model configuration.

Everything is built with the libraries' own classes and saved with ``save_pretrained``, so the
guard and the stand-in upstream load the toy VLM exactly as they would load
``llava-hf/llava-1.5-7b-hf`` (``AutoProcessor`` + ``LlavaForConditionalGeneration``).
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from guard.toy.data import DIGITS, SIZE

IMAGE_TOKEN = "<image>"
SPECIALS = ("<pad>", "<s>", "</s>", "<unk>", IMAGE_TOKEN)
PATCH = 4  # 64 patch tokens; LLaVA's "default" strategy drops CLS
MEAN = [0.5, 0.5, 0.5]  # images in [-1, 1], like the diffusion model's
STD = [0.5, 0.5, 0.5]

QUESTIONS = (
    "What digit is in the image?",
    "Which digit is shown?",
    "What number is in this picture?",
    "Name the digit in the image.",
    "Which number do you see?",
)
# LLaVA-1.5's conversation format, for OpenAI-style content lists or plain strings.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% elif part['type'] == 'text' %}"
    "{{ part['text'] }}{% endif %}{% endfor %}{% endif %} "
    "{% elif message['role'] == 'assistant' %}ASSISTANT: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'text' %}"
    "{{ part['text'] }}{% endif %}{% endfor %}{% endif %}</s>"
    "{% elif message['role'] == 'system' %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'text' %}"
    "{{ part['text'] }}{% endif %}{% endfor %}{% endif %} "
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def answer(label: int) -> str:
    return f"The digit is {DIGITS[label]}."


def train_tokenizer(corpus: Iterable[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer: any text is representable, corpus words are single tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        padding_side="left",  # batched generation continues every row from its end
        model_max_length=256,
    )


def corpus(extra: Iterable[str] = ()) -> list[str]:
    texts = [*QUESTIONS, *(answer(i) for i in range(10)), "USER: ASSISTANT:", *extra]
    # Repetition weights the merges towards whole words of the toy language.
    return texts * 20


def build_processor(tokenizer: PreTrainedTokenizerFast, patch: int = PATCH) -> LlavaProcessor:
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": SIZE},
        crop_size={"height": SIZE, "width": SIZE},
        image_mean=MEAN,
        image_std=STD,
        do_convert_rgb=True,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        num_additional_image_tokens=1,  # the CLS token the vision tower adds
    )


def vision_config(width: int = 128, layers: int = 3, patch: int = PATCH) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        image_size=SIZE,
        patch_size=patch,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=layers,
        num_attention_heads=4,
        projection_dim=width,
    )


def llava_config(
    tokenizer: PreTrainedTokenizerFast, *, vision: CLIPVisionConfig, width: int, layers: int
) -> LlavaConfig:
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,  # a 3-layer tower: its last layer is the trained one
        image_seq_length=(SIZE // vision.patch_size) ** 2,
    )
