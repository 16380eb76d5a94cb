"""Tokenizers and chat templates against expected strings and token ids (`docs/llada.md` §4, §9, §10.2).

HF tokenizers are tiny BPEs trained in the test with LLaDA's / Dream's real special ids
(`hf_fixtures`), so the ids checked below are the real checkpoints' constants.
"""

import json

import pytest

from tests.helpers import hf_fixtures

from dmpo_jax.models.config import get_preset  # noqa: E402
from dmpo_jax.models.tokenizer import (ByteTokenizer, HFTokenizer, load_tokenizer,  # noqa: E402
                                       render_chatml, render_llama3_chat)

BOS, EOS, MASK, START, END, EOT = 126080, 126081, 126336, 126346, 126347, 126348
IM_START, IM_END, DREAM_EOS, DREAM_MASK = 151644, 151645, 151643, 151666

QUESTION = "\nWhat is 2+2? Answer briefly.\n"  # d1-style leading/trailing newlines


@pytest.fixture(scope="module")
def llada_tok(tmp_path_factory):
  folder = tmp_path_factory.mktemp("llada_tok")
  hf_fixtures.write_tokenizer(folder, hf_fixtures.llada_real_ids_tokenizer(), {
      "add_bos_token": False, "add_eos_token": False, "bos_token": "<|startoftext|>",
      "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"})
  return load_tokenizer(folder)


@pytest.fixture(scope="module")
def dream_tok(tmp_path_factory):
  folder = tmp_path_factory.mktemp("dream_tok")
  hf_fixtures.write_tokenizer(folder, hf_fixtures.dream_real_ids_tokenizer())
  return load_tokenizer(folder)


def test_llada_special_ids(llada_tok):
  assert isinstance(llada_tok, HFTokenizer) and llada_tok.chat_format == "llama3"
  assert (llada_tok.mask_token_id, llada_tok.eos_token_id, llada_tok.pad_token_id,
          llada_tok.eot_token_id, llada_tok.bos_token_id) == (MASK, EOS, EOS, EOT, BOS)
  assert llada_tok.vocab_size == EOT + 1  # highest defined id + 1; the embedding has 126464 rows


def test_llada_chat_template_string(llada_tok):
  rendered = llada_tok.apply_chat_template([{"role": "user", "content": QUESTION}])
  assert rendered == ("<|startoftext|><|start_header_id|>user<|end_header_id|>\n\n"
                      "What is 2+2? Answer briefly.<|eot_id|>"
                      "<|start_header_id|>assistant<|end_header_id|>\n\n")
  with_system = llada_tok.apply_chat_template(
      [{"role": "system", "content": " Be terse. "}, {"role": "user", "content": "Hi"},
       {"role": "assistant", "content": "Hello!\n"}, {"role": "user", "content": "2+2?"}],
      prefill="<reasoning>")
  assert with_system == (
      "<|startoftext|><|start_header_id|>system<|end_header_id|>\n\nBe terse.<|eot_id|>"
      "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
      "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
      "<|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|>"
      "<|start_header_id|>assistant<|end_header_id|>\n\n<reasoning>")


def test_llada_chat_token_ids(llada_tok):
  raw = llada_tok.backend
  piece = lambda s: raw.encode(s, add_special_tokens=False).ids  # noqa: E731
  ids = llada_tok.encode_chat([{"role": "user", "content": QUESTION}], prefill="<reasoning>")
  expected = ([BOS, START] + piece("user") + [END] + piece("\n\nWhat is 2+2? Answer briefly.")
              + [EOT, START] + piece("assistant") + [END] + piece("\n\n<reasoning>"))
  assert ids == expected
  assert ids[:2] == [BOS, START] and ids.count(EOT) == 1 and ids.count(START) == 2
  assert MASK not in ids and all(i < 126464 for i in ids)
  assert llada_tok.decode(ids, skip_special_tokens=False) == llada_tok.apply_chat_template(
      [{"role": "user", "content": QUESTION}], prefill="<reasoning>")


def test_llada_decode_skips_specials_and_padding_rows(llada_tok):
  text = "The answer is 42."
  ids = [BOS] + llada_tok.encode(text) + [EOT, EOS, EOS, MASK, 126400]  # 126400: embedding padding row
  assert llada_tok.decode(ids) == text
  assert llada_tok.decode(ids, skip_special_tokens=False) == (
      "<|startoftext|>" + text + "<|eot_id|><|endoftext|><|endoftext|><|mdm_mask|>")
  assert llada_tok.batch_decode([ids, llada_tok.encode("Hi")]) == [text, "Hi"]
  assert llada_tok.encode("<|mdm_mask|>") == [MASK]


def test_dream_chatml(dream_tok):
  assert dream_tok.chat_format == "chatml"
  assert (dream_tok.mask_token_id, dream_tok.eos_token_id, dream_tok.pad_token_id,
          dream_tok.eot_token_id, dream_tok.bos_token_id) == (DREAM_MASK, DREAM_EOS, DREAM_EOS, IM_END, None)
  rendered = dream_tok.apply_chat_template([{"role": "user", "content": QUESTION}])
  assert rendered == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                      f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n")
  custom = render_chatml([{"role": "system", "content": "Solve it."}, {"role": "user", "content": "1+1"}],
                         prefill="Sure")
  assert custom == ("<|im_start|>system\nSolve it.<|im_end|>\n<|im_start|>user\n1+1<|im_end|>\n"
                    "<|im_start|>assistant\nSure")
  raw = dream_tok.backend
  piece = lambda s: raw.encode(s, add_special_tokens=False).ids  # noqa: E731
  ids = dream_tok.encode_chat([{"role": "user", "content": "1+1"}])
  assert ids == ([IM_START] + piece("system\nYou are a helpful assistant.") + [IM_END] + piece("\n")
                 + [IM_START] + piece("user\n1+1") + [IM_END] + piece("\n") + [IM_START]
                 + piece("assistant\n"))
  assert dream_tok.decode(ids) == "system\nYou are a helpful assistant.\nuser\n1+1\nassistant\n"


def test_byte_tokenizer_matches_tiny_preset():
  tok = load_tokenizer("byte")
  assert isinstance(tok, ByteTokenizer)
  preset = get_preset("tiny")
  assert tok.vocab_size == preset.vocab_size == 264
  assert (tok.mask_token_id, tok.eos_token_id, tok.pad_token_id, tok.eot_token_id, tok.bos_token_id) == (
      preset.mask_token_id, preset.eos_token_id, preset.pad_token_id, preset.eot_token_id,
      preset.bos_token_id) == (256, 257, 257, 258, 259)
  assert tok.encode("<|start_header_id|><|end_header_id|>") == [260, 261]


def test_byte_tokenizer_round_trip_and_chat():
  tok = ByteTokenizer()
  text = "Héllo wörld ✓ 数学\n\ttabs"
  ids = tok.encode(text)
  assert ids == list(text.encode("utf-8")) and max(ids) < 256
  assert tok.decode(ids) == text
  chat = tok.encode_chat([{"role": "user", "content": " Hi\n"}], prefill="<reasoning>")
  assert chat == ([259, 260] + list(b"user") + [261] + list(b"\n\nHi") + [258, 260]
                  + list(b"assistant") + [261] + list(b"\n\n<reasoning>"))
  assert tok.decode(chat) == "user\n\nHiassistant\n\n<reasoning>"
  assert tok.decode(chat, skip_special_tokens=False) == tok.apply_chat_template(
      [{"role": "user", "content": " Hi\n"}], prefill="<reasoning>")
  assert tok.batch_decode([[104, 105, 257, 257], [256, 104]]) == ["hi", "h"]
  assert tok.decode([0xE2, 0x9C]) == "\ufffd"  # truncated UTF-8 from a model sample
  with pytest.raises(ValueError, match="264"):
    tok.decode([264])


def test_render_llama3_requires_messages():
  with pytest.raises(ValueError, match="at least one message"):
    render_llama3_chat([], bos_token="<s>", eot_token="</s>")
  with pytest.raises(ValueError, match="'role' and 'content'"):
    render_chatml([{"content": "x"}])


def test_config_json_ids_take_precedence(tmp_path):
  """Specials at 0..5 in the BPE; config.json's ids win over tokenizer_config.json's strings."""
  hf_fixtures.write_tokenizer(tmp_path, hf_fixtures.train_tiny_bpe(), {"eos_token": "<|eot_id|>"})
  tok = load_tokenizer(tmp_path)
  assert (tok.mask_token_id, tok.eos_token_id, tok.eot_token_id, tok.bos_token_id) == (5, 4, 4, 0)
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "llada", "eos_token_id": 1}))
  tok = load_tokenizer(tmp_path)
  assert tok.eos_token_id == 1 and tok.chat_format == "llama3"


def test_load_tokenizer_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="tokenizer.json"):
    load_tokenizer(tmp_path)
  with pytest.raises(FileNotFoundError, match="'gpt2'"):
    load_tokenizer("gpt2")
