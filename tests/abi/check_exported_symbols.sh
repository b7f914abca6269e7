#!/bin/sh
# The library exports exactly the committed list of moekit_* symbols: an addition is a
# deliberate API change (update exported_symbols.txt), a removal breaks the ABI.
set -eu
export LC_ALL=C  # byte order, as the committed list is sorted
lib="$1"
expected="$2"
actual=$(nm -D --defined-only "$lib" | awk '$2 ~ /^[TtWwDdBbRrVvi]$/ {print $3}' | sed 's/@.*//' | sort -u)
if ! diff -u "$expected" - <<EOF_ACTUAL
$actual
EOF_ACTUAL
then
  echo "exported symbols of $lib differ from $expected (- expected, + actual)"
  exit 1
fi
echo "exported symbols: $(printf '%s\n' "$actual" | wc -l) as listed"
