//! safetensors shard reader on arbitrary bytes.
#![no_main]

use backlens::weights::safetensors::Shard;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(shard) = Shard::from_bytes("fuzz.safetensors", data.to_vec()) else {
        return;
    };
    for (_, info) in shard.metadata.tensors() {
        let _ = shard.bytes(info);
    }
});
