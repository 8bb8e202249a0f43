#!/usr/bin/env bash
# Writes the World English Bible (public domain; https://ebible.org/web/) as plain UTF-8
# text, one verse per line, for `dtopp reproduce --data PATH` and `dtopp train --data PATH`.
#
#   bash data/fetch-world-english-bible.sh [OUT]      (default: data/world-english-bible.txt)
#
# The text comes from Debian's sword-text-web package (module engWEB2015eb, the WEB with
# the Deuterocanon) read by diatheke, both from Debian's own archive, so no other network
# is needed. The licence travels in /usr/share/doc/sword-text-web/copyright: "The World
# English Bible is in the Public Domain." (the name is eBible.org's trademark, so a changed
# text must not be called the WEB; this file only drops markup and verse references).
#
# About 4.9 MB; the script checks its size and prints its sha256 so that runs can name
# the exact text. It is not committed: 6 MB of someone else's text would outweigh every
# source file here, and Debian keeps it reproducibly.
set -euo pipefail
out=${1:-data/world-english-bible.txt}
module=engWEB2015eb

modules=$(diatheke -b system -k modulelist 2> /dev/null || true)
if ! grep -q "^$module " <<< "$modules"; then
    if [ "$(id -u)" = 0 ]; then sudo=""; else sudo="sudo"; fi
    echo "installing diatheke and sword-text-web (Debian packages)" >&2
    $sudo apt-get install -y -q --no-install-recommends diatheke sword-text-web > /dev/null
fi

tmp=$(mktemp)
trap 'rm -f "$tmp"' EXIT
# OSIS, not diatheke's plain output: the module joins some words with no space between
# their <w> elements (plain output prints "Godcreated"); a space is put back first. Each
# line is "[heading]  Book c:v: verse"; the heading and reference go (diatheke repeats a
# psalm's superscription before many later verses, so superscriptions are dropped).
diatheke -b "$module" -f OSIS -k "Genesis 1:1-Revelation 22:21" > "$tmp"
perl -CSD -pe '
    s{^.*?[A-Za-z] \d{1,3}:\d{1,3}:\s*}{};   # [heading] Book c:v:
    s{<title[^>]*>.*?</title>}{}g;           # a superscription inside a verse line
    s{</w><w}{</w> <w}g;
    s{<[^>]*>}{}g;
    s{&lt;}{<}g; s{&gt;}{>}g; s{&quot;}{"}g; s{&apos;}{\x27}g; s{&amp;}{&}g;
    s{ +}{ }g; s{^ | $}{}g;
' "$tmp" | grep -v -e "^($module)$" -e '^$' > "$out"

bytes=$(wc -c < "$out")
if [ "$bytes" -lt 4000000 ]; then
    echo "error: $out has only $bytes bytes; expected about 4.9 MB (is the module complete?)" >&2
    exit 1
fi
echo "$out: $bytes bytes, $(wc -l < "$out") lines, sha256 $(sha256sum "$out" | cut -d' ' -f1)" >&2
