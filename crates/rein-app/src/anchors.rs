//! Audit anchors (`rein_core::anchor`): made by `rein audit anchor` and, every `[audit]
//! anchor_every`, by `rein serve`; checked by `rein audit verify --all-tenants`.
//!
//! The anchor file (`[audit] anchor_file`) gets each anchor as a JSON line. Kept where the
//! database's writers cannot write (another disk, host or account), it is what catches a
//! database rewritten with its anchors: its last anchor must be the database's, and must still
//! match what the store holds.

use crate::error::{Error, Result};
use rein_core::RunId;
use rein_core::anchor::{Anchor, RunsDigest, check_anchor, verify_anchors};
use rein_store::Store;
use std::io::Write;
use std::path::Path;

/// How far behind its time an anchor's cutoff is by default: runs created in this last stretch,
/// on clocks a little apart, are left to the next anchor.
pub const CUTOFF_LAG: std::time::Duration = std::time::Duration::from_secs(60);

/// Runs read at a time while their digest is computed.
const PAGE: u32 = 1000;

/// Makes the next anchor as of `now_ms`, covering the runs created `lag` before, stores it,
/// and appends it to `file` if given. `None` when another process anchored at the same
/// position first.
pub async fn make(
    store: &dyn Store,
    now_ms: i64,
    lag: std::time::Duration,
    file: Option<&Path>,
) -> Result<Option<Anchor>> {
    let last = store.last_anchor().await?;
    let admin_head = match store.admin_log_head().await? {
        Some(seq) => admin_hash_at(store, seq).await?.map(|hash| (seq, hash)),
        None => None,
    };
    let cutoff_ms = now_ms - i64::try_from(lag.as_millis()).unwrap_or(i64::MAX / 2);
    let runs = runs_digest(store, cutoff_ms).await?;
    let anchor = Anchor::after(last.as_ref(), now_ms, cutoff_ms, admin_head, runs);
    if !store.append_anchor(&anchor).await? {
        return Ok(None);
    }
    if let Some(file) = file {
        let line = serde_json::to_string(&anchor)
            .map_err(|e| Error::unavailable("cannot write an anchor as JSON", e))?;
        let mut out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(file)
            .map_err(|e| {
                Error::unavailable(format!("cannot open the anchor file {}", file.display()), e)
            })?;
        writeln!(out, "{line}")
            .and_then(|()| out.sync_data())
            .map_err(|e| {
                Error::unavailable(
                    format!("cannot write the anchor file {}", file.display()),
                    e,
                )
            })?;
    }
    Ok(Some(anchor))
}

/// The hash of the admin log's entry at `seq`, if it holds one there.
async fn admin_hash_at(store: &dyn Store, seq: u64) -> Result<Option<String>> {
    Ok(store
        .admin_log(seq, 1)
        .await?
        .into_iter()
        .next()
        .filter(|e| e.seq == seq)
        .map(|e| e.hash))
}

/// The runs created by `cutoff_ms`, digested in id order.
async fn runs_digest(store: &dyn Store, cutoff_ms: i64) -> Result<(u64, String)> {
    let mut digest = RunsDigest::default();
    let mut after: Option<RunId> = None;
    loop {
        let page = store.anchor_runs(cutoff_ms, after.as_ref(), PAGE).await?;
        page.iter().for_each(|run| digest.add(run));
        if page.len() < PAGE as usize {
            return Ok(digest.finish());
        }
        after = page.last().map(|run| RunId::new(run.id.clone()));
    }
}

/// What the anchors say is wrong with the store now: the anchors' own chain, the anchor file's
/// last anchor against the database's, and the latest anchor against what the store holds.
/// Also how many anchors there are.
pub async fn check(store: &dyn Store, file: Option<&Path>) -> Result<(usize, Vec<String>)> {
    let mut anchors = Vec::new();
    loop {
        let page = store.anchors(anchors.len() as u64, PAGE).await?;
        let done = page.len() < PAGE as usize;
        anchors.extend(page);
        if done {
            break;
        }
    }
    let mut problems = Vec::new();
    if let Err(problem) = verify_anchors(&anchors) {
        problems.push(problem);
    }
    let mut latest = anchors.last().cloned();
    if let Some(file) = file {
        let text = match std::fs::read_to_string(file) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => {
                return Err(Error::unavailable(
                    format!("cannot read the anchor file {}", file.display()),
                    e,
                ));
            }
        };
        if let Some(line) = text.lines().rev().find(|l| !l.trim().is_empty()) {
            let outside: Anchor = serde_json::from_str(line).map_err(|e| {
                Error::unavailable(
                    format!(
                        "the anchor file {} ends with a line that is not an anchor",
                        file.display()
                    ),
                    e,
                )
            })?;
            if anchors.get(outside.seq as usize) != Some(&outside) {
                problems.push(format!(
                    "audit anchor {} in {} is not in the database as written: the database's anchors were removed or rewritten",
                    outside.seq,
                    file.display()
                ));
            }
            if outside.digest() != outside.hash {
                problems.push(format!(
                    "audit anchor {} in {}: its fields do not match its hash (the file was altered)",
                    outside.seq,
                    file.display()
                ));
            }
            // The file's anchor is the one the database's writers could not touch.
            latest = Some(outside);
        }
    }
    if let Some(anchor) = latest {
        let admin_entry = match &anchor.admin_head {
            Some((seq, _)) => admin_hash_at(store, *seq).await?,
            None => None,
        };
        let (runs, sha) = runs_digest(store, anchor.cutoff_ms).await?;
        problems.extend(check_anchor(&anchor, admin_entry.as_deref(), (runs, &sha)));
    }
    Ok((anchors.len(), problems))
}
