#!/usr/bin/env bash
# Fuzzes the GGUF reader, the LoRA adapter reader, the safetensors header reader, the
# request-JSON reader and the whitening-statistics cache reader with cargo-fuzz (libFuzzer),
# seeded with real files. FUZZ_SECONDS per target (default 300).
# The stable toolchain builds cargo-fuzz's instrumented targets with RUSTC_BOOTSTRAP=1.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_PER_TARGET=${FUZZ_SECONDS:-300}
export RUSTC_BOOTSTRAP=1
export CARGO_TARGET_DIR=${FUZZ_TARGET_DIR:-$HOME/.cache/backlens/fuzz-target}
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked

mkdir -p fuzz/corpus/gguf fuzz/corpus/lora fuzz/corpus/safetensors_header fuzz/corpus/requests fuzz/corpus/stats_cache
# Seeds: the start of the real model (its whole header and vocabulary), a complete small GGUF
# (the demo's LoRA adapter when present), a minimal safetensors file, request files and a
# statistics cache file.
head -c 1800000 models/SmolLM2-135M-Instruct.Q4_1.gguf > fuzz/corpus/gguf/smollm2-header
[ -f out/messi-paris-lora.gguf ] && cp out/messi-paris-lora.gguf fuzz/corpus/gguf/lora-adapter
[ -f out/messi-paris-lora.gguf ] && cp out/messi-paris-lora.gguf fuzz/corpus/lora/messi-paris
printf 'GGUF\x03\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00' > fuzz/corpus/gguf/empty-v3
python3 - <<'PY'
import json, struct
header = json.dumps({"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
                     "__metadata__": {"format": "pt"}}).encode()
open("fuzz/corpus/safetensors_header/tiny", "wb").write(struct.pack("<Q", len(header)) + header + bytes(16))

# A valid adapter for the lora target's in-memory base (fuzz_targets/lora.rs): a rank-1 pair on
# blk.0.ffn_down.weight, a flipped pair on token_embd.weight and a skipped norm vector.
def s(text):
    b = text.encode()
    return struct.pack("<Q", len(b)) + b
kv = [("general.type", 8, s("adapter")), ("general.architecture", 8, s("llama")),
      ("adapter.type", 8, s("lora")), ("adapter.lora.alpha", 6, struct.pack("<f", 1.0))]
tensors = [("blk.0.ffn_down.weight.lora_a", [16, 1]), ("blk.0.ffn_down.weight.lora_b", [1, 8]),
           ("token_embd.weight.lora_a", [1, 32]), ("token_embd.weight.lora_b", [1, 8]),
           ("blk.0.attn_norm.weight", [8])]
head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kv))
for key, code, value in kv:
    head += s(key) + struct.pack("<I", code) + value
data, offset = b"", 0
for name, dims in tensors:
    n = 1
    for d in dims:
        n *= d
    head += s(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
    head += struct.pack("<IQ", 0, offset)
    blob = struct.pack("<%df" % n, *[0.25] * n)
    blob += bytes(-len(blob) % 32)
    data, offset = data + blob, offset + len(blob)
head += bytes(-len(head) % 32)
open("fuzz/corpus/lora/valid", "wb").write(head + data)
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

for target in gguf lora safetensors_header requests stats_cache; do
  echo "== $target (${SECONDS_PER_TARGET}s)"
  (cd fuzz && cargo fuzz run "$target" --release --sanitizer none -- \
      -max_total_time="$SECONDS_PER_TARGET" -max_len=16384 -rss_limit_mb=2048 -print_final_stats=1 2>&1) \
    | grep -E "stat::number_of_executed_units|stat::peak_rss_mb|SUMMARY|ERROR|crash-|Done" || true
done
