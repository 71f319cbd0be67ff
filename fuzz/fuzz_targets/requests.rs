//! Edit-request JSON reader on arbitrary text.
#![no_main]

use backlens::edit::EditRequest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(requests) = EditRequest::parse(text) {
            assert!(requests.iter().all(|r| r.validate().is_ok()));
        }
    }
});
