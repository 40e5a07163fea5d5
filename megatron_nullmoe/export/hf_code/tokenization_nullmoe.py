"""NullMoETokenizer: the sentencepiece model megatron_nullmoe trained with, unchanged.

Written by megatron_nullmoe.export; loaded with `trust_remote_code=True`. Ids are the
sentencepiece model's own (0 <pad>, 1 <unk>, 2 <s>, 3 </s>), and text is encoded exactly as the
trainer encodes it (`SentencePieceProcessor.encode`); `<s>` is prepended by default, as the
trainer's documents begin with it.
"""

import os
import shutil

import sentencepiece as spm
from transformers import PreTrainedTokenizer

VOCAB_FILES_NAMES = {"vocab_file": "tokenizer.model"}


class NullMoETokenizer(PreTrainedTokenizer):
    vocab_files_names = VOCAB_FILES_NAMES
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                 pad_token="<pad>", add_bos_token=True, add_eos_token=False, **kwargs):
        self.vocab_file = vocab_file
        self.sp_model = spm.SentencePieceProcessor()
        self.sp_model.Load(vocab_file)
        self.add_bos_token, self.add_eos_token = add_bos_token, add_eos_token
        super().__init__(bos_token=bos_token, eos_token=eos_token, unk_token=unk_token,
                         pad_token=pad_token, add_bos_token=add_bos_token,
                         add_eos_token=add_eos_token, **kwargs)

    @property
    def vocab_size(self):
        return self.sp_model.GetPieceSize()

    def get_vocab(self):
        vocab = {self.sp_model.IdToPiece(i): i for i in range(self.vocab_size)}
        vocab.update(self.added_tokens_encoder)
        return vocab

    def _tokenize(self, text, **kwargs):
        return self.sp_model.encode(text, out_type=str)

    def _convert_token_to_id(self, token):
        return self.sp_model.PieceToId(token)

    def _convert_id_to_token(self, index):
        return self.sp_model.IdToPiece(int(index))

    def convert_tokens_to_string(self, tokens):
        """Pieces decode as sentencepiece decodes them; special control tokens (<s>, </s>, <pad>)
        are written out as themselves (transformers 5 decodes them through here unless
        skip_special_tokens, and lm-evaluation-harness checks that <s> decodes to "<s>")."""
        special, out, pieces = set(self.all_special_tokens), [], []
        for token in tokens:
            if token in special and self.sp_model.IsControl(self.sp_model.PieceToId(token)):
                out.append(self.sp_model.decode([self.sp_model.PieceToId(p) for p in pieces]) + token)
                pieces = []
            else:
                pieces.append(token)
        ids = [self.sp_model.PieceToId(p) for p in pieces]
        return "".join(out) + self.sp_model.decode([i for i in ids if not self.sp_model.IsControl(i)])

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        bos = [self.bos_token_id] if self.add_bos_token else []
        eos = [self.eos_token_id] if self.add_eos_token else []
        out = bos + token_ids_0 + eos
        if token_ids_1 is not None:
            out = out + bos + token_ids_1 + eos
        return out

    def get_special_tokens_mask(self, token_ids_0, token_ids_1=None, already_has_special_tokens=False):
        if already_has_special_tokens:
            return super().get_special_tokens_mask(token_ids_0, token_ids_1, True)
        bos = [1] if self.add_bos_token else []
        eos = [1] if self.add_eos_token else []
        mask = bos + [0] * len(token_ids_0) + eos
        if token_ids_1 is not None:
            mask = mask + bos + [0] * len(token_ids_1) + eos
        return mask

    def save_vocabulary(self, save_directory, filename_prefix=None):
        out = os.path.join(save_directory, (filename_prefix + "-" if filename_prefix else "")
                           + VOCAB_FILES_NAMES["vocab_file"])
        if os.path.abspath(self.vocab_file) != os.path.abspath(out):
            shutil.copyfile(self.vocab_file, out)
        return (out,)
