//! The checker must reproduce every known verdict of the shared Jepsen etcd histories.

use std::path::PathBuf;

use keel_jepsen::linearizable::{Verdict, check};

#[test]
fn reproduces_every_shared_verdict() {
    let dir =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/histories/etcd-register");
    let verdicts = std::fs::read_to_string(dir.join("verdicts.tsv")).unwrap_or_else(|e| {
        panic!(
            "the shared histories are required beside the clone ({}): {e}",
            dir.display()
        )
    });
    let mut checked = 0;
    for line in verdicts.lines().skip(1) {
        let mut cols = line.split('\t');
        let (Some(file), Some(expected)) = (cols.next(), cols.next()) else {
            continue;
        };
        let text = std::fs::read_to_string(dir.join(file)).unwrap();
        let ops = keel_jepsen::jepsen_log::parse(&text).unwrap_or_else(|e| panic!("{file}: {e}"));
        let start = std::time::Instant::now();
        let got = match check(&ops, 50_000_000) {
            Verdict::Linearizable => "true",
            Verdict::Violation { .. } => "false",
            Verdict::Unknown => "unknown",
        };
        assert_eq!(got, expected.trim(), "{file}");
        assert!(
            start.elapsed().as_secs() < 10,
            "{file} took {:?}",
            start.elapsed()
        );
        checked += 1;
    }
    assert_eq!(checked, 69);
}
