//! Audit anchors: what the hash chains cannot see.
//!
//! Each run's log is a chain and so is the admin log, but a chain cannot tell that it was cut
//! short at its end, or that a whole run was removed. An anchor is a commitment, made now and
//! then, to the admin log's head and to every run created before a cutoff: their number and one
//! digest of their ids, with the final head of each that had ended by then (an ended run's log
//! can change no more). Anchors are chained like the admin log, stored in the database and,
//! when the operator names one, appended to a file outside it. The audit recomputes the latest
//! anchor from what the store holds now: a run removed, an ended run's log rewritten or cut, or
//! the admin log cut back past the anchored head no longer matches.
//!
//! Whoever can write the database can also rewrite its anchors consistently; the anchor file,
//! kept where the database's writers cannot write, is what catches that.

use crate::event::{GENESIS_HASH, hex};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// One anchor.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Anchor {
    /// Position among the anchors: 0, 1, 2, ...
    pub seq: u64,
    /// When it was made, ms since the epoch.
    pub ts_ms: i64,
    /// The runs it covers were created by this time, ms since the epoch (a while before
    /// `ts_ms`, so runs being created as it is made, on clocks a little apart, are left to the
    /// next anchor).
    pub cutoff_ms: i64,
    /// The admin log's head then: its last entry's position and hash (`None`: it was empty).
    pub admin_head: Option<(u64, String)>,
    /// How many runs it covers.
    pub runs: u64,
    /// SHA-256 (hex) of the covered runs, by [`RunsDigest`].
    pub runs_sha256: String,
    /// The hash of the anchor before (the genesis hash for the first).
    pub prev_hash: String,
    /// This anchor's hash ([`Anchor::digest`]).
    pub hash: String,
}

impl Anchor {
    /// The anchor after `last` (the first when `None`).
    pub fn after(
        last: Option<&Anchor>,
        ts_ms: i64,
        cutoff_ms: i64,
        admin_head: Option<(u64, String)>,
        (runs, runs_sha256): (u64, String),
    ) -> Anchor {
        let mut anchor = Anchor {
            seq: last.map_or(0, |a| a.seq + 1),
            ts_ms,
            cutoff_ms,
            admin_head,
            runs,
            runs_sha256,
            prev_hash: last.map_or_else(|| GENESIS_HASH.to_string(), |a| a.hash.clone()),
            hash: String::new(),
        };
        anchor.hash = anchor.digest();
        anchor
    }

    /// The hash its fields should have, under `rein-anchor-v1`.
    pub fn digest(&self) -> String {
        let mut h = Sha256::new();
        h.update(b"rein-anchor-v1\0");
        h.update(self.seq.to_be_bytes());
        h.update(self.ts_ms.to_be_bytes());
        h.update(self.cutoff_ms.to_be_bytes());
        match &self.admin_head {
            Some((seq, hash)) => {
                h.update([1]);
                h.update(seq.to_be_bytes());
                h.update(hash.as_bytes());
            }
            None => h.update([0]),
        }
        h.update(b"\0");
        h.update(self.runs.to_be_bytes());
        h.update(self.runs_sha256.as_bytes());
        h.update(b"\0");
        h.update(self.prev_hash.as_bytes());
        hex(&h.finalize())
    }
}

/// Checks anchors in order from the first: each links to the one before and matches its hash.
/// The first problem, by position.
pub fn verify_anchors(anchors: &[Anchor]) -> Result<(), String> {
    let mut prev = GENESIS_HASH.to_string();
    for (i, anchor) in anchors.iter().enumerate() {
        if anchor.seq != i as u64 {
            return Err(format!(
                "audit anchor {}: expected position {i} (an anchor was removed)",
                anchor.seq
            ));
        }
        if anchor.prev_hash != prev {
            return Err(format!(
                "audit anchor {}: its link to the anchor before does not match (an anchor was removed or replaced)",
                anchor.seq
            ));
        }
        if anchor.digest() != anchor.hash {
            return Err(format!(
                "audit anchor {}: its fields do not match its hash (it was altered)",
                anchor.seq
            ));
        }
        prev = anchor.hash.clone();
    }
    Ok(())
}

/// One run as an anchor covers it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AnchoredRun {
    /// Its id.
    pub id: String,
    /// Its tenant.
    pub tenant: String,
    /// For a run that had ended by the cutoff: its event count and last event's hash.
    pub ended: Option<(u64, String)>,
}

/// The digest of the runs an anchor covers, fed in id order.
pub struct RunsDigest {
    hasher: Sha256,
    count: u64,
}

impl Default for RunsDigest {
    fn default() -> Self {
        let mut hasher = Sha256::new();
        hasher.update(b"rein-anchor-runs-v1\0");
        RunsDigest { hasher, count: 0 }
    }
}

impl RunsDigest {
    /// Takes in the next run.
    pub fn add(&mut self, run: &AnchoredRun) {
        self.count += 1;
        self.hasher.update(run.id.as_bytes());
        self.hasher.update(b"\0");
        self.hasher.update(run.tenant.as_bytes());
        self.hasher.update(b"\0");
        if let Some((events, head)) = &run.ended {
            self.hasher.update(events.to_be_bytes());
            self.hasher.update(head.as_bytes());
        }
        self.hasher.update(b"\n");
    }

    /// The number of runs and their digest.
    pub fn finish(self) -> (u64, String) {
        (self.count, hex(&self.hasher.finalize()))
    }
}

/// What the store holds now, against an anchor: each difference, as a line for the audit.
/// `admin_entry` is the admin log's entry at the anchored head's position, if it has one;
/// `runs` the digest of the runs covered now, by the anchor's own cutoff.
pub fn check_anchor(
    anchor: &Anchor,
    admin_entry: Option<&str>,
    (runs, runs_sha256): (u64, &str),
) -> Vec<String> {
    let mut problems = Vec::new();
    if let Some((seq, hash)) = &anchor.admin_head
        && admin_entry != Some(hash.as_str())
    {
        problems.push(format!(
            "the admin log no longer holds entry {seq} as audit anchor {} recorded it: it was cut back or rewritten",
            anchor.seq
        ));
    }
    if runs < anchor.runs {
        problems.push(format!(
            "{} run(s) created before audit anchor {} are missing from the store: they were removed",
            anchor.runs - runs,
            anchor.seq
        ));
    } else if runs > anchor.runs {
        problems.push(format!(
            "{} run(s) dated before audit anchor {}'s cutoff are stored that it did not record: they were added since, or the clocks of the processes that wrote them are further apart than the anchor's lag",
            runs - anchor.runs,
            anchor.seq
        ));
    } else if runs_sha256 != anchor.runs_sha256 {
        problems.push(format!(
            "the runs created before audit anchor {} are not the ones it recorded: a run was removed and another added, or an ended run's log was rewritten or cut",
            anchor.seq
        ));
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(id: &str, ended: Option<(u64, &str)>) -> AnchoredRun {
        AnchoredRun {
            id: id.into(),
            tenant: "acme".into(),
            ended: ended.map(|(n, h)| (n, h.to_string())),
        }
    }

    fn digest(runs: &[AnchoredRun]) -> (u64, String) {
        let mut d = RunsDigest::default();
        runs.iter().for_each(|r| d.add(r));
        d.finish()
    }

    #[test]
    fn anchors_chain_and_any_change_is_found() {
        let first = Anchor::after(None, 10, 5, None, (0, "x".into()));
        let second = Anchor::after(Some(&first), 20, 15, Some((3, "h".into())), (2, "y".into()));
        verify_anchors(&[first.clone(), second.clone()]).unwrap();
        let mut altered = second.clone();
        altered.runs = 1;
        assert!(
            verify_anchors(&[first.clone(), altered])
                .unwrap_err()
                .contains("altered")
        );
        assert!(verify_anchors(&[second]).unwrap_err().contains("removed"));
    }

    #[test]
    fn a_removed_run_a_rewritten_end_or_a_cut_admin_log_is_found() {
        let runs = [run("r1", Some((9, "h1"))), run("r2", None)];
        let (n, sha) = digest(&runs);
        let anchor = Anchor::after(None, 100, 40, Some((4, "a4".into())), (n, sha.clone()));
        assert!(check_anchor(&anchor, Some("a4"), (n, &sha)).is_empty());
        let (n1, sha1) = digest(&runs[1..]);
        let removed = check_anchor(&anchor, Some("a4"), (n1, &sha1));
        assert!(
            removed[0].contains("1 run(s) created before audit anchor 0 are missing"),
            "{removed:?}"
        );
        let (n2, sha2) = digest(&[run("r1", Some((8, "h0"))), run("r2", None)]);
        let rewritten = check_anchor(&anchor, Some("a4"), (n2, &sha2));
        assert!(rewritten[0].contains("rewritten or cut"), "{rewritten:?}");
        let cut = check_anchor(&anchor, None, (n, &sha));
        assert!(cut[0].contains("no longer holds entry 4"), "{cut:?}");
        let (n3, sha3) = digest(&[runs[0].clone(), runs[1].clone(), run("r0", None)]);
        let added = check_anchor(&anchor, Some("a4"), (n3, &sha3));
        assert!(
            added[0].contains(
                "1 run(s) dated before audit anchor 0's cutoff are stored that it did not record"
            ),
            "{added:?}"
        );
    }
}
