"""A LLaVA-style held-out set (logging.eval_sets kind llava, evaluate.py): rows as written, and
every record that cannot be used named by file, record and reason (never a traceback, never a
read outside the image root or of a non-regular file)."""

import json
import os

import pytest

from megatron_unihetero.data.preprocess.fixtures import png_bytes
from megatron_unihetero.eval.data import read_eval_rows, read_llava_qa

GOOD = {"id": "q1", "image": "imgs/a.png", "answers": ["two", "2"], "candidates": ["one", "two"],
        "conversations": [{"from": "human", "value": "<image>\nHow many squares?"},
                          {"from": "gpt", "value": "two"}]}


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(png_bytes(1))
    return tmp_path


def _write(folder, records, name="set.json"):
    path = folder / name
    path.write_text(json.dumps(records))
    return str(path)


def test_rows_as_written(folder):
    text_only = {"conversations": [{"from": "human", "value": "Say hi"}, {"from": "gpt", "value": " hi "}]}
    rows = read_eval_rows(_write(folder, [GOOD, text_only]), kind="auto")
    assert rows[0] == {"id": "q1", "question": "How many squares?", "answer": "two",
                       "image": png_bytes(1), "answers": ["two", "2"], "candidates": ["one", "two"]}
    assert rows[1] == {"id": "1", "question": "Say hi", "answer": "hi"}
    assert len(read_llava_qa(_write(folder, [GOOD] * 5), max_samples=2)) == 2


@pytest.mark.parametrize("record,message", [
    (dict(GOOD, conversations=["a string turn", {"from": "gpt", "value": "x"}]),
     "record 0: wrong_type: conversations\\[0\\] must be"),
    (dict(GOOD, conversations=[{"from": ["human"], "value": "q"}, {"from": "gpt", "value": "a"}]),
     "record 0: bad_conversation: conversations\\[0\\]: speaker"),
    (dict(GOOD, conversations=[{"from": "gpt", "value": "a"}]), "record 0: bad_conversation"),
    (dict(GOOD, image="../outside.png"), "record 0: path_outside_root"),
    (dict(GOOD, image="/etc/passwd"), "record 0: path_outside_root"),
    (dict(GOOD, image="imgs"), "record 0: not_a_regular_file"),
    (dict(GOOD, image="imgs/missing.png"), "record 0: missing_image_file"),
    (dict(GOOD, candidates="one"), "record 0: wrong_type: 'candidates' must be a list"),
    ([1, 2], "record 0: wrong_type: element is a JSON list"),
])
def test_every_unusable_record_is_named(folder, record, message):
    (folder.parent / "outside.png").write_bytes(png_bytes(2))
    path = _write(folder, [record])
    with pytest.raises(ValueError, match=f"{path}: {message}"):
        read_llava_qa(path)


def test_a_fifo_as_an_image_is_refused_without_blocking(folder):
    os.mkfifo(folder / "imgs" / "pipe.png")
    with pytest.raises(ValueError, match="not_a_regular_file"):
        read_llava_qa(_write(folder, [dict(GOOD, image="imgs/pipe.png")]))
