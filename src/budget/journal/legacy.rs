//! The journal of Aura before `journal_dir` (its `ledger_journal` file): JSON lines, one per
//! op the store had not taken when that Aura stopped or lost the store, with no period. At
//! start it is replayed once, as that Aura would have (its spend in the current period; each
//! holder is gone, so its lease is closed), then deleted with the rest of the replay.

use std::io;
use std::path::Path;

use serde::Deserialize;

use crate::auth::KeyId;
use crate::budget::op::{Holder, Op, Settlement, Spend};

#[derive(Deserialize)]
struct Entry {
    holder: String,
    seq: u64,
    key: String,
    spent: u64,
    from_lease: u64,
    returned: u64,
}

/// The ops of the file at `path`, none when there is no file. A line that does not read is an
/// error: its spend would be lost, so Aura does not start until an operator looks.
pub fn read(path: &Path, period: u64) -> io::Result<Option<Vec<Op>>> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut ops = Vec::new();
    for (n, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let unreadable = |why: &str| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{} line {}: {why}: an earlier Aura's journal, not replayed",
                    path.display(),
                    n + 1
                ),
            )
        };
        let entry: Entry = serde_json::from_str(line).map_err(|e| unreadable(&e.to_string()))?;
        let key = KeyId::parse(&entry.key).ok_or_else(|| unreadable("not a key id"))?;
        let mut op = Op::new(Holder::from(entry.holder), entry.seq, key, period);
        op.settle = Settlement {
            spent: Spend::of(period, entry.spent),
            from_lease: entry.from_lease,
            returned: entry.returned,
        };
        op.close = true;
        ops.push(op);
    }
    Ok(Some(ops))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(name: &str, text: &str) -> std::path::PathBuf {
        let path =
            std::env::temp_dir().join(format!("aura-legacy-journal-{}-{name}", std::process::id()));
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn an_earlier_auras_journal_becomes_ops_that_close_its_leases() {
        let key = KeyId::of("sk-legacy");
        let path = file(
            "ok",
            &format!(
                "{{\"holder\":\"n/b/0\",\"seq\":7,\"key\":\"{key}\",\"spent\":1200,\"from_lease\":1000,\"returned\":0}}\n\n"
            ),
        );
        let ops = read(&path, 20_000).unwrap().unwrap();
        assert_eq!(ops.len(), 1);
        let op = &ops[0];
        assert_eq!(
            (&*op.holder, op.seq, op.key, op.period),
            ("n/b/0", 7, key, 20_000)
        );
        assert_eq!(op.settle.spent, Spend::of(20_000, 1200));
        assert_eq!(op.settle.from_lease, 1000);
        assert!(op.close && op.ask.is_none());
        let _ = std::fs::remove_file(&path);
        assert!(
            read(&path, 0).unwrap().is_none(),
            "no file, nothing to replay"
        );
    }

    #[test]
    fn a_line_that_does_not_read_stops_the_start() {
        let path = file("bad", "{\"holder\":\"n/b/0\",\"seq\":7}\n");
        let error = read(&path, 0).unwrap_err().to_string();
        assert!(error.contains("line 1"), "{error}");
        let _ = std::fs::remove_file(&path);
    }
}
