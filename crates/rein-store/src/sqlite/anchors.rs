//! SQLite: audit anchors.

use super::*;
use crate::prelude::*;
use crate::{StoreError, anchor_from_row, anchored_run_from_row};
use rein_core::RunId;
use rein_core::budget::BoxFuture;

impl Anchors for SqliteStore {
    fn anchor_runs<'a>(
        &'a self,
        cutoff_ms: i64,
        after: Option<&'a RunId>,
        limit: u32,
    ) -> BoxFuture<'a, Result<Vec<rein_core::anchor::AnchoredRun>, StoreError>> {
        Box::pin(async move {
            let rows = sqlx::query(
                "SELECT id, tenant,
                        CASE WHEN status IN ('completed', 'failed', 'limit_exceeded', 'cancelled', 'escalated')
                                  AND updated_ms <= ?1 THEN event_count END AS end_count,
                        CASE WHEN status IN ('completed', 'failed', 'limit_exceeded', 'cancelled', 'escalated')
                                  AND updated_ms <= ?1 THEN head_hash END AS end_hash
                 FROM runs WHERE created_ms <= ?1 AND id > ?2 ORDER BY id LIMIT ?3",
            )
            .bind(cutoff_ms)
            .bind(after.map_or("", RunId::as_str))
            .bind(i64::from(limit))
            .fetch_all(&self.reader)
            .await?;
            rows.iter().map(anchored_run_from_row).collect()
        })
    }

    fn append_anchor<'a>(
        &'a self,
        anchor: &'a rein_core::anchor::Anchor,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        let anchor = anchor.clone();
        Box::pin(self.write(move |c| {
            let added = c
                .prepare_cached(
                    "INSERT INTO audit_anchors (seq, ts_ms, cutoff_ms, admin_seq, admin_hash, runs, runs_sha256, prev_hash, hash)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9) ON CONFLICT (seq) DO NOTHING",
                )?
                .execute(rusqlite::params![
                    i64::try_from(anchor.seq).unwrap_or(i64::MAX),
                    anchor.ts_ms,
                    anchor.cutoff_ms,
                    anchor.admin_head.as_ref().map(|(s, _)| i64::try_from(*s).unwrap_or(i64::MAX)),
                    anchor.admin_head.as_ref().map(|(_, h)| h.clone()),
                    i64::try_from(anchor.runs).unwrap_or(i64::MAX),
                    anchor.runs_sha256,
                    anchor.prev_hash,
                    anchor.hash,
                ])?;
            Ok(added == 1)
        }))
    }

    fn anchors(
        &self,
        from: u64,
        limit: u32,
    ) -> BoxFuture<'_, Result<Vec<rein_core::anchor::Anchor>, StoreError>> {
        Box::pin(async move {
            let rows = sqlx::query(
                "SELECT seq, ts_ms, cutoff_ms, admin_seq, admin_hash, runs, runs_sha256, prev_hash, hash
                 FROM audit_anchors WHERE seq >= ? ORDER BY seq LIMIT ?",
            )
            .bind(i64::try_from(from).unwrap_or(i64::MAX))
            .bind(i64::from(limit))
            .fetch_all(&self.reader)
            .await?;
            rows.iter().map(anchor_from_row).collect()
        })
    }

    fn last_anchor(&self) -> BoxFuture<'_, Result<Option<rein_core::anchor::Anchor>, StoreError>> {
        Box::pin(async move {
            let row = sqlx::query(
                "SELECT seq, ts_ms, cutoff_ms, admin_seq, admin_hash, runs, runs_sha256, prev_hash, hash
                 FROM audit_anchors ORDER BY seq DESC LIMIT 1",
            )
            .fetch_optional(&self.reader)
            .await?;
            row.as_ref().map(anchor_from_row).transpose()
        })
    }
}
