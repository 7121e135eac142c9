//! The driver's budget work: reservations before a model call, settlements after, warnings on
//! crossing a line, and rate-limit throttling.

use crate::*;
use rein_core::budget::{self, Amount, Reservation, Scope, Standing};
use rein_core::rate::{OverLimit, RateState, Take};
use rein_core::{Event, EventKind, ModelCall};
use rein_store::Hold;
use std::time::Duration;

impl Driver<'_> {
    /// Reserves the worst case of `call` in every capped shared scope and records the call as
    /// requested (`model_requested`, with the staged events and `budget_reserved` before it).
    /// Returns the reservation to settle, or `Err(())` inside `Ok` when a scope refused (the
    /// refusal is recorded instead, and the engine ends the run).
    pub(crate) async fn reserve(
        &mut self,
        call: &ModelCall,
    ) -> Result<Result<Option<(String, Vec<Scope>)>, ()>, RuntimeError> {
        let governor = self.runtime.governor.clone();
        let now = now_ms();
        let scopes = governor.as_ref().map_or_else(Vec::new, |g| {
            g.budgets
                .policy(&self.tenant)
                .scopes(&self.tenant, &self.user, &self.session, now)
        });
        let Some(governor) = governor.filter(|_| !scopes.is_empty()) else {
            self.record(call.requested()).await?;
            return Ok(Ok(None));
        };
        let amount = Amount {
            usd: call.worst_case_cost,
            tokens: call.estimated_input_tokens + u64::from(call.max_output_tokens),
        };
        let id = uuid::Uuid::now_v7().to_string();
        let hold = Hold {
            id: &id,
            scopes: &scopes,
            amount,
            now_ms: now,
            expires_ms: self
                .engine
                .deadline_ms()
                .unwrap_or(now)
                .saturating_add(RESERVATION_GRACE_MS),
        };
        let reserved = EventKind::BudgetReserved {
            step: call.step,
            reservation: id.clone(),
            scopes: scopes.iter().map(|s| s.key.clone()).collect(),
            amount,
        };
        let answer = if self.runtime.budget_in_store() {
            // One transaction: the hold, and the events up to the call's `model_requested`
            // (folded into the engine only once they are written).
            let mark = (self.next_seq, self.prev_hash.clone());
            let events = [self.seal(reserved), self.seal(call.requested())];
            let store = &self.runtime.store;
            let answer = store
                .reserve_and_write(&self.tenant, self.new_run(), &self.unsaved, hold)
                .await?;
            if answer == Reservation::Granted {
                for event in &events {
                    self.fold(event)?;
                }
                self.saved();
                return Ok(Ok(Some((id, scopes))));
            }
            self.unseal(mark);
            answer
        } else {
            let answer = governor
                .counters
                .reserve(hold.id, hold.scopes, amount, now, hold.expires_ms)
                .await?;
            if answer == Reservation::Granted {
                // Written with the call's `model_requested`, before the call goes out.
                self.stage(reserved)?;
                self.record(call.requested()).await?;
                return Ok(Ok(Some((id, scopes))));
            }
            answer
        };
        if let Reservation::Refused { scope, standing } = answer {
            self.record(EventKind::BudgetRefused {
                step: call.step,
                scope,
                standing,
                amount,
            })
            .await?;
        }
        Ok(Err(()))
    }

    /// Settles every reservation the log shows as held but not settled (the process stopped,
    /// or the counters failed, in between), with the cost the log recorded for its step, or
    /// nothing if the call was never answered. Settling is idempotent, so a settlement that
    /// landed just before the crash is not counted twice.
    pub(crate) async fn settle_leftovers(&mut self, events: &[Event]) -> Result<(), RuntimeError> {
        let settled: std::collections::HashSet<&str> = events
            .iter()
            .filter_map(|e| match &e.kind {
                EventKind::BudgetSettled { reservation, .. } => Some(reservation.as_str()),
                _ => None,
            })
            .collect();
        let open: Vec<(u32, String, Vec<String>)> = events
            .iter()
            .filter_map(|e| match &e.kind {
                EventKind::BudgetReserved {
                    step,
                    reservation,
                    scopes,
                    ..
                } if !settled.contains(reservation.as_str()) => {
                    Some((*step, reservation.clone(), scopes.clone()))
                }
                _ => None,
            })
            .collect();
        for (step, id, keys) in open {
            let spent = events
                .iter()
                .rev()
                .find_map(|e| match &e.kind {
                    EventKind::ModelResponded {
                        step: s,
                        usage,
                        cost,
                        ..
                    } if *s == step => Some(Amount {
                        usd: *cost,
                        tokens: usage.total(),
                    }),
                    _ => None,
                })
                .unwrap_or_default();
            let scopes: Vec<Scope> = keys
                .into_iter()
                .map(|key| Scope {
                    key,
                    cap: Default::default(),
                })
                .collect();
            self.runtime.counters.settle(&id, &scopes, spent).await?;
            self.record(EventKind::BudgetSettled {
                step,
                reservation: id,
                amount: spent,
            })
            .await?;
        }
        Ok(())
    }

    /// Records a `budget_warning` for each scope whose warning line this settlement crossed.
    pub(crate) async fn warn_on_crossing(
        &mut self,
        governor: &Governor,
        scopes: Vec<Scope>,
        standings: Vec<Standing>,
        spent: Amount,
    ) -> Result<(), RuntimeError> {
        self.runtime.meters.apply(
            scopes.iter().zip(&standings).flat_map(|(scope, standing)| {
                rein_core::meter::budget_utilisation(scope, standing)
            }),
        );
        let percent = governor.budgets.warn_percent;
        for (scope, after) in budget::warnings(&scopes, &standings, &spent, percent) {
            self.record(EventKind::BudgetWarning {
                scope: scope.clone(),
                spent: after,
                percent,
            })
            .await?;
        }
        Ok(())
    }

    /// Takes `call` from every rate limit it falls under, waiting when the policy allows.
    /// Returns false when it was rejected (recorded; the engine ends the run).
    pub(crate) async fn throttle(&mut self, call: &ModelCall) -> Result<bool, RuntimeError> {
        let Some(limits) = self.runtime.rate_limits.clone() else {
            return Ok(true);
        };
        let tokens = call.estimated_input_tokens + u64::from(call.max_output_tokens);
        for (key, limit, amount) in limits.takes(&self.tenant, &self.user, &self.session, tokens) {
            loop {
                let now = now_ms();
                let counters = self.runtime.counters.clone();
                let (take, _) = cells::update(counters.as_ref(), &key, |s: &RateState| {
                    s.take(&limit, amount, now)
                })
                .await?;
                let wait_ms = match take {
                    Take::Granted => break,
                    Take::Wait { wait_ms } => wait_ms,
                    Take::TooLarge => 0,
                };
                let left = i64::try_from(self.remaining().as_millis()).unwrap_or(i64::MAX);
                let delay = match limits.over_limit {
                    OverLimit::Delay { max_wait_ms } => {
                        wait_ms > 0 && wait_ms <= max_wait_ms && wait_ms < left
                    }
                    OverLimit::Reject => false,
                };
                self.record(EventKind::RateLimited {
                    step: call.step,
                    scope: key.clone(),
                    wait_ms,
                    delayed: delay,
                })
                .await?;
                if !delay {
                    return Ok(false);
                }
                tokio::time::sleep(Duration::from_millis(u64::try_from(wait_ms).unwrap_or(0)))
                    .await;
            }
        }
        Ok(true)
    }
}
