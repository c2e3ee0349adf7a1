"""The exported HF tokenizer gives our ids (sample text, specials), after a save/reload, and adds
no BOS of its own: the chat template writes it (hf/processor.py)."""

import pytest

from megatron_unihetero.data import tokenizer as T
from megatron_unihetero.hf.processor import SAMPLE_TEXTS, check_token_ids, hf_tokenizer

TEXT = "a large red circle at the top left"


def _reloaded_matches(path, tmp_path):
    from transformers import AutoTokenizer

    ours, fast = hf_tokenizer(path)
    fast.save_pretrained(str(tmp_path / "saved"))
    again = AutoTokenizer.from_pretrained(str(tmp_path / "saved"))
    check_token_ids(ours, again, SAMPLE_TEXTS + (TEXT,))
    assert again(TEXT)["input_ids"] == ours.encode(TEXT)
    assert again(again.bos_token + TEXT)["input_ids"] == [ours.bos_id] + ours.encode(TEXT)
    return ours, again


def test_trained_sentencepiece(tmp_path):
    from megatron_unihetero.data.preprocess.fixtures import train_tiny_tokenizer

    _reloaded_matches(train_tiny_tokenizer(str(tmp_path / "tok")), tmp_path)


def test_sentencepiece_with_appended_specials(tmp_path):
    import sentencepiece as spm

    words = [TEXT, "a small blue square at the top", "the green triangle in the center"] * 50
    spm.SentencePieceTrainer.train(sentence_iterator=iter(words), model_prefix=str(tmp_path / "plain"),
                                   vocab_size=40, hard_vocab_limit=False, minloglevel=2)
    ours, again = _reloaded_matches(str(tmp_path / "plain.model"), tmp_path)
    assert ours.appended == list(T.SPECIAL_TOKENS)
    assert again.convert_tokens_to_ids(T.PAD_TOKEN) == ours.pad_id == ours.base_vocab_size + 3


def test_hf_tokenizer_folder(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>"] + TEXT.split())}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    # Llama's tokenizer.json adds BOS in its post-processor: the export's must not.
    core.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                        special_tokens=[("<s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(tmp_path / "hf")
    assert AutoTokenizer.from_pretrained(str(tmp_path / "hf"))(TEXT)["input_ids"][0] == 1
    ours, fast = hf_tokenizer(str(tmp_path / "hf"))
    text = f"{TEXT} {T.IMAGE_START_TOKEN}{T.IMAGE_TOKEN}{T.IMAGE_END_TOKEN} red"
    check_token_ids(ours, fast, (TEXT, text))
    fast.save_pretrained(tmp_path / "saved")
    for tokenizer in (fast, AutoTokenizer.from_pretrained(str(tmp_path / "saved"))):
        assert tokenizer(TEXT)["input_ids"] == ours.encode(TEXT)
        assert tokenizer("<s>" + TEXT)["input_ids"] == [ours.bos_id] + ours.encode(TEXT)


def test_bad_tokenizer_path_is_named(tmp_path):
    from megatron_unihetero.hf import ConversionError

    with pytest.raises(ConversionError, match="nowhere"):
        hf_tokenizer(str(tmp_path / "nowhere"))
