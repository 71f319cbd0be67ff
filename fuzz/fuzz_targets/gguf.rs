//! GGUF reader on arbitrary bytes: parsing, hyperparameters, tokenizer metadata and every
//! tensor's byte range must fail cleanly or succeed, never panic or over-allocate.
#![no_main]

use backlens::arch::HParams;
use backlens::weights::gguf::GgufFile;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(file) = GgufFile::from_bytes("fuzz.gguf", data.to_vec()) else {
        return;
    };
    let _ = HParams::from_gguf(&file);
    for t in &file.tensors {
        assert_eq!(file.tensor_bytes(t).len() as u64, t.size);
    }
});
