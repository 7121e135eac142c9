//! Budget holds and settlements written with their events.

use super::*;
use crate::{Settlement, Store, StoreError};
use rein_core::budget::{Amount, Reservation, Standing};
use rein_core::{EventKind, RunId, RunStatus, TenantId, Usd};

pub async fn budget_changes_and_their_events_commit_together(store: &dyn Store) {
    let (t1, r1) = (TenantId::new("t1"), RunId::new("r1"));
    let scope = one_dollar_cap("tenant:t1:2026-11-27");
    let scopes = [scope.clone()];
    let hold = |id, dollars| hold_in(id, &scopes, dollars);
    let standing = || store.standing(&scope.key, 1);
    let mut log = Log::new(info("r1", "t1", "s", 1));
    log.seal(EventKind::BudgetReserved {
        step: 1,
        reservation: "h1".into(),
        scopes: vec![scope.key.clone()],
        amount: amount(0.6, 100),
    });
    let new_run = Some((&log.run, Some(lease("w", 10))));

    // Past the cap: refused, and neither the run nor its events are written.
    let refused = store
        .reserve_and_write(&t1, new_run, &log.sealed, hold("h0", 1.5))
        .await
        .unwrap();
    assert!(
        matches!(refused, Reservation::Refused { .. }),
        "{refused:?}"
    );
    let missing = store.run(&t1, &r1).await.unwrap_err();
    assert!(matches!(missing, StoreError::NotFound(_)), "{missing}");
    assert_eq!(standing().await.unwrap(), Standing::default());

    // Granted: the hold, the run and its events, together.
    let granted = store
        .reserve_and_write(&t1, new_run, &log.sealed, hold("h1", 0.6))
        .await
        .unwrap();
    assert_eq!(granted, Reservation::Granted);
    assert_eq!(store.events(&t1, &r1).await.unwrap(), log.sealed);
    assert_eq!(standing().await.unwrap().reserved, amount(0.6, 100));

    // A second hold that no longer fits: the events that would go with it are not appended.
    let mut more = Log {
        run: log.run.clone(),
        sealed: log.sealed.clone(),
    };
    more.seal(responded("m", 1, 1, 0.0));
    let refused = store
        .reserve_and_write(&t1, None, &more.sealed[2..], hold("h2", 0.6))
        .await
        .unwrap();
    assert!(
        matches!(refused, Reservation::Refused { .. }),
        "{refused:?}"
    );
    assert_eq!(store.events(&t1, &r1).await.unwrap().len(), 2);

    // Events that cannot be appended (a position already taken) undo their settlement.
    let answer = log.seal(responded("m", 60, 40, 0.4));
    let settled = log.seal(EventKind::BudgetSettled {
        step: 1,
        reservation: "h1".into(),
        amount: amount(0.4, 100),
    });
    let settlement = Settlement {
        id: "h1",
        scopes: &scopes,
        actual: amount(0.4, 100),
        warn_percent: 75,
        end: 1,
    };
    let taken = store
        .settle_and_write(&t1, None, &log.sealed[1..], settlement)
        .await
        .unwrap_err();
    assert!(matches!(taken, StoreError::Conflict { .. }), "{taken}");
    assert_eq!(
        standing().await.unwrap(),
        Standing {
            spent: Amount::default(),
            reserved: amount(0.6, 100),
        },
        "the settlement went with its events"
    );

    // Settled with its events: spend counted, the hold released, the answer on the run.
    let after = store
        .settle_and_write(&t1, None, &[answer, settled], settlement)
        .await
        .unwrap();
    let counted = Standing {
        spent: amount(0.4, 100),
        reserved: Amount::default(),
    };
    assert_eq!(after, [counted]);
    assert_eq!(standing().await.unwrap(), counted);
    assert_eq!(store.events(&t1, &r1).await.unwrap(), log.sealed);
    let run = store.run(&t1, &r1).await.unwrap();
    assert_eq!(run.progress.cost, Usd::from_dollars(0.4).unwrap());

    // Settling again counts nothing; its events are still written.
    let more = log.seal(responded("m", 0, 0, 0.0));
    let again = store
        .settle_and_write(&t1, None, &[more], settlement)
        .await
        .unwrap();
    assert_eq!(again, [counted]);
    assert_eq!(store.events(&t1, &r1).await.unwrap(), log.sealed);

    // A settlement that crosses a warning line (75% of the cap) leaves out the events that end
    // the run: its warning must be recorded before them.
    let from = log.sealed.len();
    log.seal(EventKind::BudgetReserved {
        step: 2,
        reservation: "h2".into(),
        scopes: vec![scope.key.clone()],
        amount: amount(0.5, 100),
    });
    log.seal(responded("m", 60, 40, 0.4));
    log.seal(EventKind::BudgetSettled {
        step: 2,
        reservation: "h2".into(),
        amount: amount(0.4, 100),
    });
    log.seal(finished(serde_json::json!("done")));
    let granted = store
        .reserve_and_write(&t1, None, &log.sealed[from..from + 1], hold("h2", 0.5))
        .await
        .unwrap();
    assert_eq!(granted, Reservation::Granted);
    let crossing = Settlement {
        id: "h2",
        actual: amount(0.4, 100),
        ..settlement
    };
    let after = store
        .settle_and_write(&t1, None, &log.sealed[from + 1..], crossing)
        .await
        .unwrap();
    assert_eq!(after[0].spent, amount(0.8, 200));
    let written = store.events(&t1, &r1).await.unwrap();
    assert_eq!(
        written,
        log.sealed[..log.sealed.len() - 1],
        "all but the end"
    );
    assert_eq!(
        store.run(&t1, &r1).await.unwrap().progress.status,
        RunStatus::Running
    );
}
