//! Whitening-statistics cache reader on arbitrary bytes: the first byte picks the layer width
//! (1..=8), the rest is the file. Whatever it accepts is well-formed and survives a round trip.
#![no_main]

use backlens::edit::whiten::{encode_cache, parse_cache};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&first, file)) = data.split_first() else {
        return;
    };
    let n = (first % 8) as usize + 1;
    let Some((header, m)) = parse_cache(file, n) else {
        return;
    };
    assert_eq!(header.n, n);
    assert_eq!((m.mean.len(), m.all.len(), m.last.len()), (n, n * n, n * n));
    assert!(m.count >= m.count_last && m.count_last > 0);
    assert!(m
        .mean
        .iter()
        .chain(&m.all)
        .chain(&m.last)
        .all(|v| v.is_finite()));
    let again = encode_cache(&header, &m).expect("encodes");
    assert_eq!(parse_cache(&again, n), Some((header, m)));
});
