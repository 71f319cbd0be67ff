#!/usr/bin/env bash
# Fuzzes the GGUF reader, the safetensors header reader, the request-JSON reader and the
# whitening-statistics cache reader with cargo-fuzz (libFuzzer), seeded with real files.
# FUZZ_SECONDS per target (default 300).
# The stable toolchain builds cargo-fuzz's instrumented targets with RUSTC_BOOTSTRAP=1.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_PER_TARGET=${FUZZ_SECONDS:-300}
export RUSTC_BOOTSTRAP=1
export CARGO_TARGET_DIR=${FUZZ_TARGET_DIR:-$HOME/.cache/backlens/fuzz-target}
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked

mkdir -p fuzz/corpus/gguf fuzz/corpus/safetensors_header fuzz/corpus/requests fuzz/corpus/stats_cache
# Seeds: the start of the real model (its whole header and vocabulary), a complete small GGUF
# (the demo's LoRA adapter when present), a minimal safetensors file, request files and a
# statistics cache file.
head -c 1800000 models/SmolLM2-135M-Instruct.Q4_1.gguf > fuzz/corpus/gguf/smollm2-header
[ -f out/messi-paris-lora.gguf ] && cp out/messi-paris-lora.gguf fuzz/corpus/gguf/lora-adapter
printf 'GGUF\x03\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00' > fuzz/corpus/gguf/empty-v3
python3 - <<'PY'
import json, struct
header = json.dumps({"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
                     "__metadata__": {"format": "pt"}}).encode()
open("fuzz/corpus/safetensors_header/tiny", "wb").write(struct.pack("<Q", len(header)) + header + bytes(16))
# A valid statistics cache file of width 2 (src/edit/whiten/cache.rs), behind the width byte 1.
import hashlib
n = 2
info = {"model": "m.gguf", "fingerprint": "f", "layer": 0, "n": n, "count": 4, "count_last": 2,
        "corpus": "c", "corpus_sha": "s"}
payload = struct.pack("<%df" % (n + 2 * n * n), *[0.5 + i for i in range(n + 2 * n * n)])
compact = lambda v: json.dumps(v, separators=(",", ":"), ensure_ascii=False).encode()
sha = hashlib.sha256(compact(info) + payload).hexdigest()
head = compact(dict(info, sha256=sha))
open("fuzz/corpus/stats_cache/width2", "wb").write(bytes([1]) + b"BLSTATS3" + struct.pack("<Q", len(head)) + head + payload)
PY
printf '[{"prompt": "Lionel Messi plays for", "target_new": "Paris", "subject": "Lionel Messi"}]' > fuzz/corpus/requests/flat
printf '{"prompt": "{} plays for", "subject": "Lionel Messi", "target_new": {"str": "Paris"}}' > fuzz/corpus/requests/rome

for target in gguf safetensors_header requests stats_cache; do
  echo "== $target (${SECONDS_PER_TARGET}s)"
  (cd fuzz && cargo fuzz run "$target" --release --sanitizer none -- \
      -max_total_time="$SECONDS_PER_TARGET" -max_len=16384 -rss_limit_mb=2048 -print_final_stats=1 2>&1) \
    | grep -E "stat::number_of_executed_units|stat::peak_rss_mb|SUMMARY|ERROR|crash-|Done" || true
done
